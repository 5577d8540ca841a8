"""Train a Latent Convolutional Model.

    python launch/train.py --config configs/demo.json
    deepspeed --num_accelerators 2 launch/train.py --config configs/demo.json
    torchrun --nproc_per_node 2 launch/train.py --config configs/demo.json

Override any config key with --set section.key=value (repeatable).
"""

from __future__ import annotations

import argparse
import os
import sys

from lcm_dist.lifecycle import share_cores

share_cores()  # before torch is imported

from lcm_dist.config import add_override_argument, load_config  # noqa: E402
from lcm_dist.distributed import PeerStopped  # noqa: E402
from lcm_dist.latents.cache import StoreIOError  # noqa: E402
from lcm_dist.train.loop import NonFiniteLossError, train  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="path of the run's JSON config")
    add_override_argument(parser)
    # The deepspeed launcher passes --local_rank; the environment carries the same.
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg)
    except (ValueError, NonFiniteLossError, StoreIOError, PeerStopped) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        # When one process stops on an error, the others see their connection to it close
        # in the middle of a collective: say that in one line instead of a gloo traceback.
        lost = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
        if not any(text in str(err) for text in lost):
            raise
        rank = os.environ.get("RANK", "?")
        print(
            f"error: process {rank} stopped because another process of the run stopped "
            "(its error is above)",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
