"""An in-memory latent table: every image's phi row held in RAM.

It has the interface of the write-back cache over the Zarr store (``lcm_dist.latents.cache``): rows
that were never trained read as the shared initial phi, ``read_rows`` hands a batch's rows to the
step as one (B, P) tensor and ``write_rows`` takes the updated rows back. Its memory is N x P
floats, it is private to one process and nothing is saved, so it only suits single-process runs
on small datasets (``store.in_ram``), and it is the reference in tests and benchmarks.
"""

from __future__ import annotations

import torch


class InMemoryLatentTable:
    """All N phi rows in one tensor, initialised to the shared initial phi."""

    def __init__(self, num_rows: int, initial_phi: torch.Tensor):
        if num_rows <= 0:
            raise ValueError(f"a latent table needs at least one row, got {num_rows}")
        self.num_rows = num_rows
        self.row_size = initial_phi.numel()
        self.initial_phi = initial_phi.detach().clone().float()
        self.rows = self.initial_phi.repeat(num_rows, 1)

    def _check(self, rows: torch.Tensor) -> torch.Tensor:
        rows = torch.as_tensor(rows, dtype=torch.long)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.num_rows):
            raise IndexError(
                f"row index out of range [0, {self.num_rows}): the dataset is larger than the "
                "latent table"
            )
        return rows

    def read_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The phi rows of a batch as a new (B, P) float32 tensor."""
        return self.rows[self._check(rows)].clone()

    def write_rows(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Store updated phi rows of a batch."""
        rows = self._check(rows)
        if values.shape != (rows.numel(), self.row_size):
            raise ValueError(
                f"expected values of shape ({rows.numel()}, {self.row_size}), got {tuple(values.shape)}"
            )
        self.rows[rows] = values.detach().to(self.rows.dtype)

    # The rest of the WriteBackCache interface: nothing to page, write back or exchange.

    def begin_epoch(self, chunk_order: list[int], done_rows=None) -> None:
        pass

    def end_epoch(self) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def changes(self) -> dict[int, int]:
        return {}

    def apply_changes(self, changes: dict[int, int]) -> None:
        pass

    def commit(self, persist: bool = True) -> None:
        pass

    def stats(self) -> dict[str, float]:
        return {"store/resident_bytes": self.rows.numel() * 4}

    def state_dict(self) -> dict:
        return {"rows": self.rows.clone()}

    def load_state_dict(self, state: dict) -> None:
        rows = state["rows"]
        if rows.shape != self.rows.shape:
            raise ValueError(
                f"latent table state has shape {tuple(rows.shape)}, expected {tuple(self.rows.shape)}"
            )
        self.rows.copy_(rows)
