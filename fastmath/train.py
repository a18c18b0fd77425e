"""The single entry point: `torchrun --nproc_per_node=N fastmath/train.py --config configs/<x>.yaml [key.sub=value ...]`.

Runs the stages named in `run.stages` in order. A user mistake (config typo, missing file, unusable
data, bad checkpoint) ends the run with one line, `fastmath: error: <cause>`, and exit status 2.
`python fastmath/train.py ...` works too (a one-process group is created); `python -m fastmath.launch` takes
torchrun's arguments and ends a failed run with that line alone (fastmath/launch.py).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Run as a script, sys.path[0] is fastmath/; make the repository importable when not pip-installed.
_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(1, str(_REPO))

import yaml  # noqa: E402

from fastmath.config import help_text, load_config  # noqa: E402
from fastmath.errors import FastmathError, one_line  # noqa: E402
from fastmath.launch import QUIET_CHILDREN, record_for_torchrun  # noqa: E402
from fastmath.launch_env import check_launch_env  # noqa: E402
from fastmath.preflight import preflight  # noqa: E402


class _OneLineParser(argparse.ArgumentParser):
    """argparse, with its usage errors in the same one-line form as every other user mistake."""

    def error(self, message: str):
        sys.exit(_fail(f"{message} (see --help)"))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = _OneLineParser(
        prog="fastmath/train.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="fastmath trainer (SFT, then GRPO). Overrides: key.sub=value, e.g. sft.lr=2e-5.",
        epilog="config fields:\n" + help_text())
    parser.add_argument("--config", help="YAML config file (configs/*.yaml); defaults apply without one")
    parser.add_argument("overrides", nargs="*", help="key.sub=value settings applied after the file")
    parser.add_argument("--plan", action="store_true", help="simulate one step of each training stage at the "
                        "configured scale (no GPU, nothing downloaded) and print its memory per GPU; exit 1 if a "
                        "stage does not fit")
    from fastmath.planner import add_plan_arguments

    add_plan_arguments(parser)
    return parser.parse_args(argv)


def run_stages(config) -> None:
    """Run the stages of `run.stages` in order, in one process group."""
    from fastmath.distributed import barrier, init_distributed, shutdown
    from fastmath.library_logs import route_library_logs
    from fastmath.output_lock import lock_output_dir

    dist_info = init_distributed(config.run.dist_timeout_minutes)
    lock = None
    try:
        lock = lock_output_dir(config.run.output_dir, dist_info.is_main)  # one run per output folder
        route_library_logs(config.run.output_dir, dist_info.rank, announce=dist_info.is_main,
                           configured_verbose=config.run.verbose)
        for stage in config.run.stages:
            if stage == "sft":
                from fastmath.sft import run_sft

                run_sft(config, dist_info)
            elif stage == "grpo":
                from fastmath.grpo_stage import run_grpo

                run_grpo(config, dist_info)
            elif stage == "eval":
                from fastmath.eval import run_eval

                run_eval(config, dist_info)
        # Every rank finished: meet before tearing the group down, so no rank destroys its gloo connections
        # while another still uses them (seen once in a 2-rank test worker: a rank aborted with "terminate
        # called without an active exception"). Not in `finally`: after a failure on one rank this would hang.
        barrier()
    finally:
        if lock is not None:
            lock.release()
        shutdown()


def check_memory_plan(config, args) -> None:
    """On CUDA, rank 0 checks that the configured step fits this GPU before anything loads (the planner), unless
    parallel.memory_check is off. Other ranks wait for it at the process group's start."""
    import os

    import torch

    if not (config.parallel.memory_check and torch.cuda.is_available() and os.environ.get("RANK", "0") == "0"):
        return
    if not any(stage in ("sft", "grpo") for stage in config.run.stages):
        return
    from fastmath.planner import run_check

    world = int(os.environ.get("WORLD_SIZE", "1"))
    run_check(args.config, args.overrides, world, int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 a user mistake (one line on stderr), 130 interrupted."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(args.config, args.overrides)
        if args.plan:
            from fastmath.planner import print_plan

            return print_plan(config, args.config, args)
        check_launch_env(os.environ)  # before anything waits for peers
        preflight(config)  # paths, before seconds to minutes of loading
        check_memory_plan(config, args)
        run_stages(config)
    except FastmathError as err:
        return _fail(str(err))
    except yaml.YAMLError as err:
        return _fail(f"invalid YAML: {one_line(err)}")
    except OSError as err:  # a full disk, a permission, a file removed under the run: the cause and the file
        where = f": {err.filename}" if err.filename else ""
        return _fail(f"{err.strerror or one_line(err)}{where}")
    except KeyboardInterrupt:
        print("fastmath: interrupted", file=sys.stderr, flush=True)
        return 130
    return 0


# An error line is read by a person: at most this many characters (a message built from hostile input could
# otherwise be megabytes long).
MAX_ERROR_CHARS = 1000


def _fail(message: str) -> int:
    """Print the one error line (and hand it to torchrun, see fastmath/launch.py); the exit status 2."""
    message = " ".join(message.split())
    if len(message) > MAX_ERROR_CHARS:
        message = f"{message[:MAX_ERROR_CHARS]}... ({len(message) - MAX_ERROR_CHARS} more characters)"
    line = f"fastmath: error: {message}"
    record_for_torchrun(line)
    if not os.environ.get(QUIET_CHILDREN):
        print(line, file=sys.stderr, flush=True)
    return 2


if __name__ == "__main__":
    sys.exit(main())
