"""Run reporting: TensorBoard scalars and image grids, and a progress bar with ETA.

Only rank 0 writes; every other rank gets a ``NullLogger`` with the same methods, so the
training loop never branches on the rank to log.
"""

from __future__ import annotations

import os
import weakref

import torch

_open_loggers: weakref.WeakSet = weakref.WeakSet()


def close_open_loggers() -> None:
    """Close every run logger still open in this process (its progress bar ends on its own
    line and is not drawn again), so that an error printed next stands on a line of its own;
    also when the run failed while it was being set up, before anything could close them."""
    for log in list(_open_loggers):
        log.close()


class NullLogger:
    """Does nothing: what non-logging ranks get."""

    def scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def image(self, step: int, tag: str, image: torch.Tensor) -> None:
        pass

    def text(self, step: int, tag: str, text: str) -> None:
        pass

    def progress(self, step: int, postfix: dict[str, float] | None = None) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class RunLogger(NullLogger):
    """TensorBoard event files under ``<run_dir>/tb`` plus a tqdm progress bar."""

    def __init__(
        self, run_dir: str, total_steps: int, initial_step: int = 0, progress: bool = True
    ):
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run drops what the crashed one logged after its last checkpoint.
        self.writer = SummaryWriter(
            os.path.join(run_dir, "tb"), purge_step=initial_step + 1 if initial_step else None
        )
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps, initial=initial_step, unit="batch", dynamic_ncols=True
            )
        self._last = initial_step
        _open_loggers.add(self)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def image(self, step: int, tag: str, image: torch.Tensor) -> None:
        self.writer.add_image(tag, image, step)
        self.writer.flush()

    def text(self, step: int, tag: str, text: str) -> None:
        self.writer.add_text(tag, text, step)

    def progress(self, step: int, postfix: dict[str, float] | None = None) -> None:
        if self.bar is None:
            return
        self.bar.update(step - self._last)
        self._last = step
        if postfix:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        _open_loggers.discard(self)
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.writer.close()


class RowTrace:
    """``log.trace_rows``: an audit of the data plan. Each process appends one JSON line per
    batch to ``<run_dir>/trace/rows-rank<R>.jsonl`` (step, epoch, the rows it trained) and,
    at the end of the run, the SHA-256 of its copy of the generator's parameters (identical on
    every process under ZeRO 0-2; BatchNorm's running statistics are per process). A resumed run appends again from its first step, so the
    last line of a step is the one that counts."""

    def __init__(self, run_dir: str, rank: int):
        folder = os.path.join(run_dir, "trace")
        os.makedirs(folder, exist_ok=True)
        self._file = open(os.path.join(folder, f"rows-rank{rank}.jsonl"), "a")

    def _write(self, record: dict) -> None:
        import json

        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def rows(self, step: int, epoch: int, rows: torch.Tensor) -> None:
        self._write({"step": step, "epoch": epoch, "rows": rows.tolist()})

    def generator(self, step: int, module: torch.nn.Module) -> None:
        import hashlib

        digest = hashlib.sha256()
        for name, tensor in sorted(module.named_parameters()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        self._write({"step": step, "generator_sha256": digest.hexdigest()})
        self._file.close()


class PhaseClock:
    """Where a process's time goes, summed over a log window: host phases (waiting for data,
    for the latent store, checkpointing) by the wall clock, device phases (forward+backward,
    optimizer) by CUDA events on a GPU, so that timing them adds no host sync (the events are
    read once per window, after the batch's own sync)."""

    PHASES = (
        "data_wait",
        "store_wait",
        "forward_backward",
        "optimizer",
        "write_back",
        "checkpoint",
    )

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self.host: dict[str, float] = dict.fromkeys(self.PHASES, 0.0)
        self.device_pairs: dict[str, list] = {}

    def mark(self):
        """A point in time: a recorded CUDA event on a GPU, else the wall clock."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        import time

        return time.perf_counter()

    def add_host(self, phase: str, seconds: float) -> None:
        self.host[phase] = self.host.get(phase, 0.0) + seconds

    def add(self, phase: str, start, end) -> None:
        """A device phase between two marks."""
        if self.cuda:
            self.device_pairs.setdefault(phase, []).append((start, end))
        else:
            self.add_host(phase, end - start)

    def seconds(self) -> dict[str, float]:
        """Every phase's seconds in this window; then empty."""
        out = dict(self.host)
        if self.device_pairs:
            torch.cuda.synchronize()
            for phase, pairs in self.device_pairs.items():
                out[phase] = out.get(phase, 0.0) + sum(a.elapsed_time(b) for a, b in pairs) / 1e3
        self.reset()
        return out
