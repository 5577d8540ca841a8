"""Loss per image seen at a larger per-process batch than the paper's 10, on this machine.

    python launch/batch_study.py PHOTOS_FOLDER --out runs/batch-study
    python launch/batch_study.py PHOTOS_FOLDER --batches 10 128 --lrs 1.0 3.58 --seen 4096

Makes --images random crops of the photos (demo64 size, 64 px), then trains the demo64 model
once per (batch, theta learning rate) pair, one process, with configs/big.json's recipe otherwise
(plain SGD on theta, lr_phi 1.0, --inner-steps joint steps per batch), until --seen images have
been trained on, logging the loss of every batch. Prints, per run, the mean training loss over
each quarter of the images seen (the loss of each batch's last inner step), so that runs of
different batch sizes compare at equal images seen, and --json writes all of it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _losses(run_dir: Path) -> dict[int, float]:
    """{step: loss/total} from the run's TensorBoard log."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("loss/total")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("photos", help="folder of photos to crop the training images from")
    parser.add_argument("--out", default="runs/batch-study", help="folder for shards and runs")
    parser.add_argument("--images", type=int, default=2048, help="crops to train on")
    parser.add_argument("--seen", type=int, default=4096, help="images seen per run")
    parser.add_argument("--inner-steps", type=int, default=4, help="joint steps per batch")
    parser.add_argument("--batches", type=int, nargs="+", default=[10, 128])
    parser.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        default=[1.0],
        help="theta learning rates to try at each batch (paper: 1.0 at batch 10)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    from lcm_dist.data.demo import random_crops
    from lcm_dist.data.shards import MANIFEST, collect_sources, load_photos, write_shards

    out = Path(args.out)
    shards = out / "shards"
    if not (shards / MANIFEST).exists():
        photos = load_photos(collect_sources([args.photos]))
        crops = random_crops(args.images, 64, seed=0, photos=photos)
        write_shards(crops, shards, 64, 256, progress=not args.json)
    results = []
    for batch in args.batches:
        for lr in args.lrs:
            name = f"b{batch}-lr{lr:g}"
            steps = -(-args.seen // batch)
            cfg = {
                "run_dir": str(out / name),
                "model": {"preset": "demo64"},
                "data": {"shards": str(shards), "batch_size": batch, "num_workers": 1},
                "train": {"max_steps": steps, "inner_steps": args.inner_steps, "lr_phi": 1.0},
                "store": {"in_ram": True},
                "checkpoint": {"every_steps": 0},
                "log": {"every_steps": 1, "image_every_steps": 0, "progress": False},
                "deepspeed": {"optimizer": {"type": "SGD", "params": {"lr": lr}}},
            }
            path = out / f"{name}.json"
            path.write_text(json.dumps(cfg))
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            proc = subprocess.run(
                [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(path)],
                env=env,
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                results.append({"batch": batch, "lr": lr, "error": proc.stderr.strip()[-300:]})
                continue
            losses = _losses(out / name)
            quarters = []
            for q in range(4):
                lo, hi = q * args.seen / 4, (q + 1) * args.seen / 4
                window = [v for s, v in losses.items() if lo < s * batch <= hi]
                quarters.append(round(sum(window) / len(window), 5) if window else None)
            results.append(
                {"batch": batch, "lr": lr, "steps": steps, "loss_by_quarter_seen": quarters}
            )
            if not args.json:
                print(f"batch {batch:4d} lr {lr:<6g} {steps:5d} steps  loss by quarter: {quarters}")
    if args.json:
        print(json.dumps({"seen": args.seen, "images": args.images, "runs": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
