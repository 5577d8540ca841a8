"""A run's parts, built once and in order from the config, and its step (``Trainer.step``)."""

from __future__ import annotations

import os
import time

import torch

from lcm_dist import distributed, lifecycle, memory
from lcm_dist.config import RunConfig, bottleneck_side, write_resolved_config
from lcm_dist.data.loader import ShardLoader, images_on
from lcm_dist.model.generator import Generator, count_parameters, set_memory_format
from lcm_dist.model.latent_net import BatchedLatentNet, phi_layout
from lcm_dist.train import batches, checkpoint, resume
from lcm_dist.train import setup as run_setup
from lcm_dist.train.monitor import NullLogger, PhaseClock, RowTrace, RunLogger
from lcm_dist.train.step import NonFiniteLossError, Stepped, agree_to_go_on, fit_batch


class Trainer:
    """A run's parts, built once and in order from the config (process group, data and
    checkpoint, latents, models and engine, position, logger, loader), and its step."""

    def __init__(self, cfg: RunConfig, stop: lifecycle.StopSignals | None = None):
        self.cfg, self.stop = cfg, stop or lifecycle.StopSignals()
        distributed.init_distributed()  # picks DeepSpeed's accelerator before it is imported
        import deepspeed

        lifecycle.watch_launchers()
        run_setup.set_threads()
        self.rank, world = distributed.rank(), distributed.world_size()
        self.device = device = distributed.device()
        memory.keep_freed_memory(device)  # on the CPU a step reuses the pages the last freed
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = (
                cfg.train.cudnn_benchmark and not cfg.train.deterministic
            )
        if cfg.train.deterministic:
            if device.type == "cuda":
                # cuBLAS is deterministic only with a fixed workspace; the generator's bilinear
                # upsampling has no deterministic CUDA backward, so on GPUs this is best effort.
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")

        # Data, run lock (held while this object lives), newest commit.
        manifest, self._lock, commit, self.run_state = distributed.together(
            "starting the run", lambda: run_setup.prepare(cfg)
        )
        if commit is None and cfg.train.grow_from:
            from lcm_dist.train.grow import grow_run

            distributed.together(
                f"growing {cfg.train.grow_from}",
                lambda: (
                    grow_run(cfg, manifest, cfg.log.progress) if distributed.is_main() else None
                ),
            )
            commit = distributed.together(
                "reading the grown run's commit",
                lambda: checkpoint.find_latest(cfg.run_dir, verify=run_setup.my_checkpoint_files),
            )
        self.num_rows = manifest["num_samples"]
        self.finished_at = None
        if commit is not None and commit.state["step"] >= cfg.train.max_steps:
            self.finished_at = commit.state["step"]
            return
        self.latents = run_setup.open_latents(cfg, manifest, commit)

        # Models. phi and the latent nets stay fp32 whatever precision DeepSpeed gives the
        # generator: the latent net's output is cast to the generator's dtype, and the gradient
        # flows back through that cast into fp32 phi. Seeded right before the models, so
        # that nothing done before (which may differ between a fresh start and a restart before
        # the first commit, such as creating the store) can change their initialisation.
        torch.manual_seed(cfg.train.seed + self.rank)
        self.latent_net = BatchedLatentNet(cfg.model).to(device)
        generator = Generator(cfg.model)
        set_memory_format(generator, cfg.train.memory_format, device)
        num_parameters = count_parameters(generator)
        self.engine, _, _, _ = deepspeed.initialize(
            # DeepSpeed would bind cuda:LOCAL_RANK, which does not exist where each process
            # sees only its own GPU; it takes the device this process bound instead.
            args=distributed.engine_args(),
            model=generator,
            model_parameters=generator.parameters(),
            config=run_setup.deepspeed_config(cfg),
        )
        run_setup.skip_lone_allreduce(self.engine)
        # Read checkpoints back without unpickling arbitrary objects.
        self.engine.checkpoint_engine = checkpoint.SafeCheckpointEngine(self.engine._config)
        self.run_state.register("engine", resume.EnginePart(self.engine))
        position = self.run_state.register("position", resume.PositionPart(cfg))
        resumed = "" if commit is None else self.run_state.load(commit)
        self.start_step, epoch, batch = position.start
        # Under bf16 DeepSpeed casts the parameters; BatchNorm's running statistics stay fp32.
        self.gen_dtype = next(self.engine.module.parameters()).dtype

        # Reporting.
        if distributed.is_main():
            write_resolved_config(cfg, cfg.run_dir)
            self.log = RunLogger(
                cfg.run_dir, cfg.train.max_steps, self.start_step - 1, cfg.log.progress
            )
            self.log.message(
                f"lcm-dist: {self.num_rows} images, {world} process(es) of "
                f"{torch.get_num_threads()} thread(s), phi {phi_layout(cfg.model).size} "
                f"floats/image, generator {num_parameters:,} parameters{resumed}"
            )
            if bottleneck_side(cfg.model) == 1:
                self.log.message(
                    f"lcm-dist: warning: model.image_size {cfg.model.image_size} gives the "
                    "generator 1x1 inner layers, where BatchNorm cannot train phi (a batch of "
                    "fresh latents has zero variance there); this run tests plumbing only, "
                    "train models at 64 or more"
                )
        else:
            self.log = NullLogger()
        self.trace = RowTrace(cfg.run_dir, self.rank) if cfg.log.trace_rows else None
        self.clock = PhaseClock(device)
        # FLOPs per image (forward and backward of the latent net and the generator), counted
        # once with torch's FLOP counter, for the FLOP/s and utilisation scalars.
        from lcm_dist.planning.cost import model_cost

        cost = model_cost(cfg)
        self.flops_per_image = cost.forward_flops + cost.backward_flops

        # Data, from the committed position on.
        self.loader = ShardLoader(
            cfg.data.shards,
            batch_size=cfg.data.batch_size,
            rank=self.rank,
            world_size=world,
            seed=cfg.train.seed,
            num_workers=cfg.data.num_workers,
            shuffle_buffer=cfg.data.shuffle_buffer,
            image_size=cfg.model.image_size,
            start_epoch=epoch,
            start_batch=batch,
            pin_memory=device.type == "cuda",
        )
        self._batches = iter(self.loader)
        self.epoch: int | None = None
        self.position = (epoch, batch)
        self.epoch_io: list[dict] = []

    def step(self, step: int) -> Stepped:
        """Train batch number ``step`` and take its rows back into the latent table."""
        cfg = self.cfg
        start = time.perf_counter()
        batch, ended, loader_wait = distributed.together(
            f"reading batch {step}",
            lambda: batches.next_batch(self._batches, self.latents, self.epoch),
        )
        new_epoch = batch.epoch != self.epoch
        if new_epoch and self.epoch is not None:
            batches.share_latent_slots(self.latents)  # a collective: between agreements
        phi_host = distributed.together(
            f"reading the latents of batch {step}",
            lambda: batches.batch_latents(self.latents, self.loader, cfg, batch, new_epoch),
        )
        self.clock.add_host("data_wait", loader_wait)
        self.clock.add_host("store_wait", time.perf_counter() - start - loader_wait)
        if ended is not None:
            self.epoch_io.append(ended)
        self.epoch, rows = batch.epoch, batch.rows
        images = images_on(batch.pixels, self.device)
        phi = batches.to_device(phi_host, self.device).requires_grad_(True)
        terms, output, bad = fit_batch(
            self.engine,
            self.latent_net,
            phi,
            images,
            cfg,
            self.latent_net.mask,
            self.gen_dtype,
            self.clock,
        )
        # Write the rows back and agree to go on: a non-finite loss or a failed write-back on
        # any process stops every process (each says why in one line); a stop signal on any
        # process ends the run after this batch's checkpoint.
        nonfinite, error = bool(bad), None  # the batch's one host sync: the device is done
        start = time.perf_counter()
        if not nonfinite:
            try:
                self.latents.write_rows(rows, phi.detach().cpu())
            except Exception as err:
                error = err
        failed, stopping = agree_to_go_on(nonfinite or error is not None, self.stop)
        if error is not None:
            raise error
        if nonfinite:
            raise NonFiniteLossError(
                f"the loss became {terms['loss'].item()} at step {step} on rank {self.rank} "
                f"(rows {rows[:4].tolist()}...); lower the learning rates in the config"
            )
        if failed is not None:
            raise distributed.PeerStopped(
                f"process {failed} of the run stopped at step {step} (its error follows)"
            )
        self.clock.add_host("write_back", time.perf_counter() - start)
        if self.trace is not None:
            self.trace.rows(step, batch.epoch, rows)
        self.position = (batch.epoch, batch.step_in_epoch + 1)
        return Stepped(batch, images, output, terms, stopping)

    def checkpoint(self, step: int) -> None:
        start = time.perf_counter()
        resume.commit_checkpoint(
            self.cfg, self.run_state, self.engine, self.latents, resume.At(step, *self.position)
        )
        self.clock.add_host("checkpoint", time.perf_counter() - start)

    def performance(self, images: int, seconds: float) -> dict[str, float]:
        """The window's scalars of where the time went and what the hardware achieved:
        seconds per phase (this process), FLOP/s (from the model's FLOPs per image, counted
        once), and on a GPU its peak memory and, with log.accelerator_tflops, the model FLOP
        utilisation."""
        out = {f"time/{phase}_s": value for phase, value in self.clock.seconds().items()}
        tflops = self.flops_per_image * images * self.cfg.train.inner_steps / seconds / 1e12
        out["perf/tflops_per_process"] = tflops
        if self.device.type == "cuda":
            out["memory/peak_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
            if self.cfg.log.accelerator_tflops:
                out["perf/mfu"] = tflops / self.cfg.log.accelerator_tflops
        return out

    def close_loader(self) -> None:
        """End the batch stream (and with it the loader's worker processes); idempotent."""
        batches = getattr(self, "_batches", None)
        if batches is not None:
            batches.close()

    def close(self, step: int) -> None:
        self.close_loader()  # its workers would otherwise keep the process from exiting
        if self.trace is not None:
            self.trace.generator(step, self.engine.module)
        self.epoch_io.append(self.latents.stats())
        self.log.scalars(step, self.latents.stats())
        self.latents.close()
        self.log.close()
