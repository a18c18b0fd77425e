"""The single entry point: `torchrun --nproc_per_node=N fastmath/train.py --config configs/<x>.yaml [key.sub=value ...]`.

Runs the stages named in `run.stages` in order. A user mistake (config typo, missing file, unusable
data, bad checkpoint) ends the run with one line, `fastmath: error: <cause>`, and exit status 2.
`python fastmath/train.py ...` works too (a one-process group is created).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run as a script, sys.path[0] is fastmath/; make the repository importable when not pip-installed.
_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(1, str(_REPO))

from fastmath.config import help_text, load_config  # noqa: E402
from fastmath.errors import FastmathError  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fastmath/train.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="fastmath trainer (SFT, then GRPO). Overrides: key.sub=value, e.g. sft.lr=2e-5.",
        epilog="config fields:\n" + help_text())
    parser.add_argument("--config", help="YAML config file (configs/*.yaml); defaults apply without one")
    parser.add_argument("overrides", nargs="*", help="key.sub=value settings applied after the file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(args.config, args.overrides)
        from fastmath.distributed import init_distributed, shutdown

        dist_info = init_distributed()
        try:
            for stage in config.run.stages:
                if stage == "sft":
                    from fastmath.sft import run_sft

                    run_sft(config, dist_info)
                elif stage == "grpo":
                    from fastmath.grpo import run_grpo

                    run_grpo(config, dist_info)
                elif stage == "eval":
                    from fastmath.eval import run_eval

                    run_eval(config, dist_info)
        finally:
            shutdown()
    except FastmathError as err:
        print(f"fastmath: error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
