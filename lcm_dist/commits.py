"""A run's commit point: ``<run_dir>/latest.json`` names the newest committed checkpoint
folder and lists every file in it with its size and SHA-256; finding and verifying the newest
commit, and the tags. Below ``train/`` (which writes commits) and ``export.py`` (which reads
them); the checkpoint's layout is described in ``lcm_dist.train.checkpoint``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

POINTER = "latest.json"
FOLDER = "checkpoints"
FORMAT = "lcm-dist-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint cannot be written, read or used with this config."""


@dataclass
class Commit:
    """The newest committed checkpoint of a run."""

    tag: str
    folder: Path
    state: dict
    slots: np.ndarray | None


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_durably(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


_RANK_FILE = re.compile(r"(?:^rng-rank|zero_pp_rank_)(\d+)")


def files_of_rank(names, rank: int, world: int) -> list[str]:
    """The checkpoint files process ``rank`` of ``world`` verifies on resume: the per-rank
    files of its own rank (and, on the last rank, those of ranks beyond the world, left by a
    larger one), and on rank 0 every shared file, so that each file is read once."""
    mine = []
    for name in names:
        found = _RANK_FILE.search(name)
        if found is None:
            if rank == 0:
                mine.append(name)
        else:
            owner = int(found.group(1))
            if owner == rank or (owner >= world and rank == world - 1):
                mine.append(name)
    return mine


def find_latest(
    run_dir: str | os.PathLike, verify: Callable[[list[str]], list[str]] | None = None
) -> Commit | None:
    """The run's newest commit, verified file by file (``verify`` picks which files of the
    commit to hash, e.g. this process's share on resume; default all); None if the run has
    none yet."""
    run = Path(run_dir)
    pointer = run / POINTER
    if not pointer.exists():
        return None
    try:
        commit = json.loads(pointer.read_text())
        tag, files = commit["tag"], commit["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"checkpoint pointer {pointer} is unreadable ({err}); it is written atomically, so "
            "it was damaged after the fact: restore it, or start a new run_dir"
        ) from None
    folder = run / FOLDER / tag
    names = list(files) if verify is None else verify(list(files))
    for name in names:
        size, digest = files[name]
        path = folder / name
        if not path.exists():
            raise CheckpointError(f"checkpoint file {path} is missing; restore it or start anew")
        if path.stat().st_size != size or file_sha256(path) != digest:
            raise CheckpointError(
                f"checkpoint file {path} is truncated or corrupt (it does not match the size and "
                f"SHA-256 in {pointer}); restore it, or start a new run_dir: older checkpoints "
                "cannot be resumed because the latent store keeps only the newest commit's rows"
            )
    state = json.loads((folder / "state.json").read_text())
    if state.get("format") != FORMAT or state.get("version") != VERSION:
        raise CheckpointError(f"{folder / 'state.json'} is not a version-{VERSION} checkpoint")
    slots_path = folder / "slots.npy"
    slots = np.load(slots_path, allow_pickle=False) if slots_path.exists() else None
    return Commit(tag, folder, state, slots)


def committed_tag(run_dir: str | os.PathLike) -> str | None:
    """The tag the run's commit pointer names, read from the pointer alone (``find_latest``
    also verifies every file of it); None if the run has no commit."""
    pointer = Path(run_dir) / POINTER
    return json.loads(pointer.read_text())["tag"] if pointer.exists() else None
