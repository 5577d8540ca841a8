"""Resume as a registry of the run's stateful parts.

Each part says what it records in a commit's ``state.json`` (``state``), refuses a commit it
cannot continue from (``check``, before anything is opened), and takes its state back from a
commit (``load``, once the models exist). The commit collects every part's state; a resume
checks, then loads, the parts in the order they were registered. A new stateful part is one
class here and one ``register`` call. (The pattern is torchtitan's checkpoint manager, which
holds its ``Stateful`` objects by name.)

Files that are not JSON (the generator's weights, DeepSpeed's optimizer states, each process's
RNG) are written by ``checkpoint.save``; the parts that own them read them back in ``load``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lcm_dist import distributed
from lcm_dist.commits import CheckpointError, Commit
from lcm_dist.config import RunConfig, config_to_dict
from lcm_dist.latents.run_store import resolve_url


@dataclass(frozen=True)
class At:
    """Where the run stands at a commit: its last step and the next batch's position."""

    step: int
    epoch: int
    batch_in_epoch: int


class Part:
    """A stateful part of a run; by default it records, checks and loads nothing."""

    def state(self, at: At) -> dict:
        return {}

    def check(self, saved: dict, commit: Commit) -> None:
        pass

    def load(self, saved: dict, commit: Commit) -> str:
        """Take the part's state back; returns a note for the resume line ('' for none)."""
        return ""


class ModelPart(Part):
    """The model config and the loss: a run resumes only with its own model."""

    def __init__(self, cfg: RunConfig):
        self.model = config_to_dict(cfg)["model"]
        self.loss = {"levels": cfg.train.lap_levels, "mse_weight": cfg.train.mse_weight}

    def state(self, at: At) -> dict:
        return {"model": self.model, "loss": self.loss}

    def check(self, saved: dict, commit: Commit) -> None:
        ours, theirs = self.model, saved["model"]
        if ours != theirs:
            diff = ", ".join(
                f"{k}: checkpoint {theirs.get(k)!r} vs config {ours.get(k)!r}"
                for k in sorted(set(ours) | set(theirs))
                if ours.get(k) != theirs.get(k)
            )
            raise CheckpointError(
                f"the config's model differs from the one checkpointed in {commit.folder} "
                f"({diff}); resume with the run's own model config, or use a new run_dir"
            )


class StorePart(Part):
    """Where the latents live (their slot table is the commit's ``slots.npy``)."""

    def __init__(self, cfg: RunConfig):
        self.run_dir = cfg.run_dir
        self.url = None if cfg.store.in_ram else resolve_url(cfg)

    def state(self, at: At) -> dict:
        return {"store_url": self.url}

    def check(self, saved: dict, commit: Commit) -> None:
        if saved["store_url"] != self.url:
            raise CheckpointError(
                f"the run in {self.run_dir} keeps its latents in {saved['store_url']}, but the "
                f"config says {self.url}; resume with the run's own store settings"
            )


class ImagesPart(Part):
    """The shard set: a run resumes only on as many images as it was checkpointed on."""

    def __init__(self, cfg: RunConfig, num_images: int):
        self.cfg, self.num_images = cfg, num_images

    def state(self, at: At) -> dict:
        return {"num_images": self.num_images, "shards": self.cfg.data.shards}

    def check(self, saved: dict, commit: Commit) -> None:
        trained_on = saved.get("num_images")
        if trained_on is not None and trained_on != self.num_images:
            raise CheckpointError(
                f"the shards in {self.cfg.data.shards} hold {self.num_images} images but the run "
                f"in {self.cfg.run_dir} was checkpointed on {trained_on}; resume with the run's "
                "own shards, or start a new run_dir"
            )


class EnginePart(Part):
    """The generator and its optimizer (DeepSpeed's files in the commit's folder)."""

    def __init__(self, engine):
        self.engine = engine

    def load(self, saved: dict, commit: Commit) -> str:
        from lcm_dist.train import checkpoint

        same_world = saved["world_size"] == distributed.world_size()
        with_optimizer = checkpoint.load_engine(self.engine, commit, same_world)
        return "" if with_optimizer else "optimizer state reset"


# What decides the order in which an epoch deals its images: a resumed run whose values differ
# from the checkpoint's cannot continue the interrupted epoch where it stopped.
PLAN_KEYS = {
    "world_size": "processes",
    "num_workers": "data.num_workers",
    "batch_size": "data.batch_size",
    "seed": "train.seed",
    "shuffle_buffer": "data.shuffle_buffer",
}


class PositionPart(Part):
    """The step, the position in the epoch, the data plan that deals the epoch, and this
    process's RNG (``rng-rank<R>.pt``). After ``load``, ``start`` is (first step, epoch, batch
    in epoch) of the resumed run; a new run starts at (1, 0, 0)."""

    def __init__(self, cfg: RunConfig):
        self.plan = {
            "world_size": distributed.world_size(),
            "num_workers": cfg.data.num_workers,
            "batch_size": cfg.data.batch_size,
            "seed": cfg.train.seed,
            "shuffle_buffer": cfg.data.shuffle_buffer,
        }
        self.start = (1, 0, 0)

    def state(self, at: At) -> dict:
        return {
            "step": at.step,
            "epoch": at.epoch,
            "batch_in_epoch": at.batch_in_epoch,
            **self.plan,
        }

    def load(self, saved: dict, commit: Commit) -> str:
        epoch, batch = saved["epoch"], saved["batch_in_epoch"]
        changed = [
            name
            for key, name in PLAN_KEYS.items()
            if saved.get(key, self.plan[key]) != self.plan[key]
        ]
        note = ""
        if not changed:
            path = commit.folder / f"rng-rank{distributed.rank()}.pt"
            torch.set_rng_state(torch.load(path, weights_only=True)["torch"])
        elif batch:
            # The interrupted epoch's remaining images cannot be told apart under another plan:
            # the epoch starts again (its images seen so far are trained once more).
            note = f"epoch {epoch} restarted ({', '.join(changed)} changed)"
            batch = 0
        self.start = (saved["step"] + 1, epoch, batch)
        return note


class RunState:
    """The registry: the run's stateful parts, by name, in the order they check and load."""

    def __init__(self, cfg: RunConfig, num_images: int):
        self.parts: dict[str, Part] = {}
        self.register("model", ModelPart(cfg))
        self.register("store", StorePart(cfg))
        self.register("images", ImagesPart(cfg, num_images))

    def register(self, name: str, part: Part) -> Part:
        if name in self.parts:
            raise ValueError(f"a stateful part named {name!r} is registered already")
        self.parts[name] = part
        return part

    def state(self, at: At) -> dict:
        """Every part's state, for the commit's ``state.json``."""
        out: dict = {}
        for name, part in self.parts.items():
            own = part.state(at)
            clash = sorted(set(own) & set(out))
            if clash:
                raise ValueError(f"stateful part {name!r} records {clash[0]!r} a second time")
            out.update(own)
        return out

    def check(self, commit: Commit) -> None:
        for part in self.parts.values():
            part.check(commit.state, commit)

    def load(self, commit: Commit) -> str:
        """Load every part from ``commit``; returns the resume note for the log."""
        notes = [n for part in self.parts.values() if (n := part.load(commit.state, commit))]
        world = distributed.world_size()
        return (
            f"; resuming from {commit.tag} ({commit.state['world_size']} -> {world} processes"
            + "".join(f", {n}" for n in notes)
            + ")"
        )


def commit_checkpoint(cfg: RunConfig, run_state: RunState, engine, latents, at: At) -> None:
    """Flush the latents, save everything (the registered parts' state in ``state.json``) and
    commit it; then the store's committed slots follow the checkpoint's. Every process calls
    this together."""
    from lcm_dist.latents.cache import WriteBackCache
    from lcm_dist.train import checkpoint
    from lcm_dist.train.batches import share_latent_slots

    def write_back():
        latents.flush()
        if isinstance(latents, WriteBackCache):
            latents.store.sync()  # this process's chunk writes reach the disk before the commit

    step = at.step
    distributed.together(f"writing back the latents for the checkpoint of step {step}", write_back)
    share_latent_slots(latents)
    slots = latents.store.live if isinstance(latents, WriteBackCache) else None
    checkpoint.save(engine, cfg.run_dir, step, run_state.state(at), slots)
    latents.commit(persist=distributed.is_main())
    if distributed.is_main():
        checkpoint.prune(cfg.run_dir, cfg.checkpoint.keep_latest)
