"""The real trainer's step against a bare PyTorch loop of the same modules, in one process.

The trainer (``lcm_dist.train.trainer.Trainer``: shards streamed by the loader, phi paged
through the write-back cache from a Zarr store, the generator under a DeepSpeed engine) and a
bare loop (the same latent net and generator, phi in one RAM tensor, ``torch.optim.SGD``, the
images decoded once into RAM, no DeepSpeed, no store) take their steps in turn, so whatever
else the machine does hits both sides alike; the ratio is of the medians over the rounds after
a warm-up.

The bare loop trains on the rows the trainer's batch just had, from the same initial weights,
so both sides do the same arithmetic on the same numbers (the time of a CPU kernel can depend
on the values, e.g. on subnormal floats); each case reports the largest difference between
their generators' weights at the end, 0 when they agree exactly.

The trainer's own background work (the store's write-backs, the loader decoding ahead) runs on
into the step after it: a second bare loop, stepping right after the trainer, measures what
that costs (``background_ms``, against the first bare loop stepping clear of it), and it is
charged to the trainer (``trainer_ms``; ``trainer_step_ms`` is the trainer's step alone).

Cases: the CPU presets at 1 and 4 inner steps on a local store, and the same on an S3 endpoint
on loopback (moto, from the test extra).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch

WARMUP = 4
PAIRS = 41  # a step's time varies by about 5% here: the median of 41 is good to about 1%
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

        torch.manual_seed(cfg.train.seed)  # as the trainer of rank 0 seeds its models
        self.cfg, self.images = cfg, images
        self.net = BatchedLatentNet(cfg.model)
        self.generator = Generator(cfg.model)
        params = cfg.deepspeed["optimizer"]["params"]
        self.opt = torch.optim.SGD(self.generator.parameters(), **params)
        self.phi = initial_phi(cfg.model).repeat(images.shape[0], 1)

    def step(self, rows: torch.Tensor) -> None:
        from lcm_dist.model.latent_net import clamp_phi_
        from lcm_dist.model.loss import lcm_loss

        t = self.cfg.train
        phi = self.phi[rows].requires_grad_(True)
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
    """Every image of the shards, decoded once, at its row."""
    from lcm_dist.data.loader import ShardLoader

    loader = ShardLoader(shards, batch_size=BATCH)
    batches = list(loader.epoch_batches(0))
    images = torch.empty((loader.manifest["num_samples"], *batches[0].images.shape[1:]))
    for batch in batches:
        images[batch.rows] = batch.images
    return images


def _case(cfg, images: torch.Tensor) -> dict:
    from lcm_dist.train.trainer import Trainer

    # Two bare loops: the first steps right after the trainer and so takes whatever the
    # trainer's background work (store writes, the loader decoding ahead) costs the machine
    # then; the second steps after the first, clear of it. The difference is charged back to
    # the trainer, so running that work in the other side's time earns the trainer nothing.
    trainer, after, clean = Trainer(cfg), BareLoop(cfg, images), BareLoop(cfg, images)
    times: dict[str, list[float]] = {"trainer": [], "after": [], "clean": []}
    try:
        for i in range(WARMUP + PAIRS):
            marks = [time.perf_counter()]
            rows = trainer.step(i + 1).batch.rows
            marks.append(time.perf_counter())
            after.step(rows)
            marks.append(time.perf_counter())
            clean.step(rows)
            marks.append(time.perf_counter())
            if i >= WARMUP:
                for j, side in enumerate(times):
                    times[side].append(marks[j + 1] - marks[j])
        stats = trainer.latents.stats()
        weights = zip(
            trainer.engine.module.state_dict().values(),
            clean.generator.state_dict().values(),
            strict=True,
        )
        differ = max(float((a.float() - b.float()).abs().max()) for a, b in weights)
    finally:
        trainer.close_loader()
    trainer.close(WARMUP + PAIRS)
    charged = [t + a - c for t, a, c in zip(*times.values(), strict=True)]
    ms = {side: statistics.median(v) for side, v in times.items()}
    return {
        "trainer_ms": round(1000 * statistics.median(charged), 1),
        "bare_ms": round(1000 * ms["clean"], 1),
        "ratio": round(statistics.median(charged) / ms["clean"], 3),
        "trainer_step_ms": round(1000 * ms["trainer"], 1),
        "background_ms": round(1000 * (ms["after"] - ms["clean"]), 1),
        "io_wait_s": round(stats["store/io_wait_seconds"], 3),
        "weights_max_difference": differ,
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
    images: int = 1024,  # 64 batches: the measured steps stay within the first epoch
    presets: tuple[str, ...] = ("demo32", "demo64"),
    inner: tuple = (1, 4),
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
