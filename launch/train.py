"""Train a Latent Convolutional Model.

    python launch/train.py --config configs/demo.json
    deepspeed --num_accelerators 2 launch/train.py --config configs/demo.json
    torchrun --nproc_per_node 2 launch/train.py --config configs/demo.json

Override any config key with --set section.key=value (repeatable).
--print-config-schema prints the JSON Schema of the config file and exits.
"""

from __future__ import annotations

import argparse
import sys

from lcm_dist.lifecycle import end_with_error, share_cores

share_cores()  # before torch is imported

from lcm_dist.config import add_override_argument, load_config, print_config_schema  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", help="path of the run's JSON config")
    what.add_argument(
        "--print-config-schema",
        action="store_true",
        help="print the JSON Schema of the config file and exit",
    )
    add_override_argument(parser)
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also show DeepSpeed's INFO and WARNING lines and torch.distributed's warnings",
    )
    # The deepspeed launcher passes --local_rank; the environment carries the same.
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.print_config_schema:
        print_config_schema()
        return 0
    # Imported only to train: torch and DeepSpeed take seconds to import.
    from lcm_dist.distributed import PeerStopped, set_verbose
    from lcm_dist.latents.cache import StoreIOError
    from lcm_dist.train.loop import NonFiniteLossError, train
    from lcm_dist.train.monitor import close_open_loggers

    set_verbose(args.verbose)
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg)
    except (ValueError, NonFiniteLossError, StoreIOError) as err:
        close_open_loggers()  # the progress bar ends before the error's line
        return end_with_error(str(err))
    except PeerStopped as err:
        close_open_loggers()
        return end_with_error(str(err), cause=False)
    except RuntimeError as err:
        close_open_loggers()
        # When one process stops on an error, the others see their connection to it close
        # in the middle of a collective: say that in one line instead of a gloo traceback.
        lost = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
        if not any(text in str(err) for text in lost):
            raise
        return end_with_error(
            "another process of the run stopped (its error is above or follows)", cause=False
        )
    finally:
        close_open_loggers()  # also before the traceback of an unexpected error
    return 0


if __name__ == "__main__":
    sys.exit(main())
