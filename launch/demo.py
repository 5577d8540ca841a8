"""End-to-end CPU demo: make shards from scikit-image's bundled photos, then train.

    python launch/demo.py                 # shards + configs/demo.json
    python launch/demo.py --set train.max_steps=50

Afterwards: tensorboard --logdir runs/demo/tb
"""

from __future__ import annotations

import argparse
import os
import sys

from lcm_dist.config import add_override_argument, load_config
from lcm_dist.data.demo import make_demo_shards
from lcm_dist.distributed import set_verbose
from lcm_dist.latents.cache import StoreIOError
from lcm_dist.lifecycle import end_with_error
from lcm_dist.train.loop import NonFiniteLossError, train
from lcm_dist.train.monitor import close_open_loggers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", default="configs/demo.json", help="run config (default: %(default)s)"
    )
    parser.add_argument(
        "--images",
        type=int,
        default=256,
        metavar="N",
        help="how many demo crops to make (default: %(default)s)",
    )
    add_override_argument(parser)
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also show DeepSpeed's INFO and WARNING lines and torch.distributed's warnings",
    )
    args = parser.parse_args(argv)
    set_verbose(args.verbose)
    try:
        cfg = load_config(args.config, args.overrides)
        made = os.path.exists(os.path.join(cfg.data.shards, "manifest.json"))
        verb = "using the" if made else "making"
        print(f"demo: {verb} {args.images} crops of scikit-image photos in {cfg.data.shards}")
        make_demo_shards(cfg.data.shards, args.images, cfg.model.image_size, samples_per_shard=64)
        result = train(cfg)
    except (ValueError, NonFiniteLossError, StoreIOError) as err:
        close_open_loggers()  # the progress bar ends before the error's line
        return end_with_error(str(err))
    finally:
        close_open_loggers()  # also before the traceback of an unexpected error
    see = f"see the run with: tensorboard --logdir {cfg.run_dir}/tb"
    if not result.step_seconds:  # nothing left to train: the run had already finished
        print(
            f"demo: the run in {cfg.run_dir} is already finished (delete it to start over); {see}"
        )
        return 0
    print(
        f"demo: loss {result.first_loss:.4f} -> {result.last_loss:.4f} over {result.steps} batches; "
        + see
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
