"""The real trainer's step against a bare PyTorch loop of the same modules, in one process.

The trainer (``lcm_dist.train.trainer.Trainer``: shards streamed by the loader, phi paged through the
write-back cache from a Zarr store, the generator under a DeepSpeed engine) and a bare loop
(the same latent net and generator, phi in one RAM tensor, ``torch.optim.SGD``, the images
decoded once into RAM, no DeepSpeed, no store) take their steps alternately, one each, so
whatever else the machine does hits both sides alike; the ratio is of the medians over the
pairs after a warm-up. Cases: the CPU presets at 1 and 4 inner steps on a local store, and the
same on an S3 endpoint on loopback (moto, from the test extra).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch

WARMUP = 4
PAIRS = 11
BATCH = 16


def _config(tmp: str, shards: str, preset: str, inner: int, store: dict):
    from lcm_dist.config import config_from_dict

    name = f"{preset}-{inner}-{'s3' if store.get('url', '').startswith('s3') else 'local'}"
    return config_from_dict(
        {
            "run_dir": os.path.join(tmp, name),
            "model": {"preset": preset},
            "data": {"shards": shards, "batch_size": BATCH, "num_workers": 1, "shuffle_buffer": 64},
            "train": {"max_steps": 10**6, "inner_steps": inner, "lr_phi": 1.0},
            "store": store,
            "checkpoint": {"every_steps": 0},
            "log": {"every_steps": 10**6, "image_every_steps": 0, "progress": False},
            "deepspeed": {"optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}}},
        },
        "benchmark config",
    )


class BareLoop:
    """The same modules, trained the plainest way: everything in RAM, torch.optim.SGD."""

    def __init__(self, cfg, images: torch.Tensor):
        from lcm_dist.model.generator import Generator
        from lcm_dist.model.latent_net import BatchedLatentNet, initial_phi

        torch.manual_seed(cfg.train.seed)
        self.cfg, self.images = cfg, images
        self.net = BatchedLatentNet(cfg.model)
        self.generator = Generator(cfg.model)
        params = cfg.deepspeed["optimizer"]["params"]
        self.opt = torch.optim.SGD(self.generator.parameters(), **params)
        self.phi = initial_phi(cfg.model).repeat(images.shape[0], 1)
        self.next = 0

    def step(self) -> None:
        from lcm_dist.model.latent_net import clamp_phi_
        from lcm_dist.model.loss import lcm_loss

        t, n = self.cfg.train, self.images.shape[0]
        rows = torch.arange(self.next, self.next + BATCH) % n
        self.next = (self.next + BATCH) % n
        phi = self.phi[rows].clone().requires_grad_(True)
        images = self.images[rows]
        for _ in range(t.inner_steps):
            out = self.generator(self.net(phi))
            loss = lcm_loss(out, images, t.lap_levels, t.mse_weight)["loss"]
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            with torch.no_grad():
                phi -= t.lr_phi * phi.grad
                phi.grad = None
                clamp_phi_(phi, self.net.mask, self.cfg.model.clamp)
        self.phi[rows] = phi.detach()


def _images(shards: str) -> torch.Tensor:
    from lcm_dist.data.loader import ShardLoader

    loader = ShardLoader(shards, batch_size=BATCH)
    batches = list(loader.epoch_batches(0))
    return torch.cat([b.images for b in batches])


def _case(cfg, images: torch.Tensor) -> dict:
    from lcm_dist.train.trainer import Trainer

    trainer, bare = Trainer(cfg), BareLoop(cfg, images)
    ours, theirs = [], []
    for i in range(WARMUP + PAIRS):
        start = time.perf_counter()
        trainer.step(i + 1)
        middle = time.perf_counter()
        bare.step()
        end = time.perf_counter()
        if i >= WARMUP:
            ours.append(middle - start)
            theirs.append(end - middle)
    stats = trainer.latents.stats()
    trainer.close(WARMUP + PAIRS)
    a, b = statistics.median(ours), statistics.median(theirs)
    return {
        "trainer_ms": round(1000 * a, 1),
        "bare_ms": round(1000 * b, 1),
        "ratio": round(a / b, 3),
        "io_wait_s": round(stats["store/io_wait_seconds"], 3),
    }


def _s3_store(stack) -> dict | None:
    """A moto S3 server on a free loopback port, with a bucket; None if moto is missing."""
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError:
        return None
    import logging
    import socket

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's one line per request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    stack.callback(server.stop)
    endpoint = f"http://127.0.0.1:{port}"
    options = {"endpoint_url": endpoint, "key": "bench", "secret": "bench"}
    boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench"
    ).create_bucket(Bucket="lcm-bench")
    return {"url": "s3://lcm-bench", "storage_options": options}


def bench_step(
    images: int = 256, presets: tuple[str, ...] = ("demo32", "demo64"), inner: tuple = (1, 4)
) -> dict:
    import contextlib

    from lcm_dist.data.demo import random_crops
    from lcm_dist.data.shards import write_shards

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # both sides on one thread
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    result: dict = {
        "images": images,
        "batch": BATCH,
        "pairs": PAIRS,
        "threads": torch.get_num_threads(),
    }
    cases: dict[str, dict] = {}
    with (
        tempfile.TemporaryDirectory(prefix="lcm-bench-step-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        s3 = _s3_store(stack)
        for preset in presets:
            size = {"demo32": 32, "demo64": 64}[preset]
            shards = os.path.join(tmp, f"shards{size}")
            write_shards(random_crops(images, size, seed=3), shards, size, 64, progress=False)
            ram = _images(shards)
            for inner_steps in inner:
                stores = {"local": {}}
                if s3 is not None:
                    url = f"{s3['url']}/{preset}-{inner_steps}/latents.zarr"
                    stores["s3"] = {"url": url, "storage_options": s3["storage_options"]}
                for where, store in stores.items():
                    cfg = _config(tmp, shards, preset, inner_steps, store)
                    cases[f"{preset}_inner{inner_steps}_{where}"] = _case(cfg, ram)
    result["cases"] = cases
    local = [c["ratio"] for k, c in cases.items() if k.endswith("_local")]
    remote = [c["ratio"] for k, c in cases.items() if k.endswith("_s3")]
    result["trainer_vs_bare"] = max(local)
    result["trainer_vs_bare_s3"] = max(remote) if remote else None
    result["targets"] = {"trainer_vs_bare": "<= 1.05", "trainer_vs_bare_s3": "<= 1.10"}
    return result
