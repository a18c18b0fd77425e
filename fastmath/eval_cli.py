"""The eval stage's command line (`python -m fastmath.eval_cli`), apart from fastmath/eval.py so that the stage
module never imports the entry point that runs it (train.py imports eval.run_eval; this module imports train.main).

    python -m fastmath.eval_cli --config X [key=value ...]                     # the same as run.stages=[eval]
    python -m fastmath.eval_cli plot A/results.json B/results.json --out f.png # overlay finished evaluations
"""
from __future__ import annotations

import argparse
import sys

from fastmath.errors import FastmathError
from fastmath.eval import format_table, load_results, plot_accuracy_vs_tokens


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["plot"]:
        from fastmath.train import main as train_main

        return train_main([*argv, "run.stages=[eval]"])
    parser = argparse.ArgumentParser(prog="python -m fastmath.eval_cli plot",
                                     description="Overlay finished evaluations: table and accuracy-vs-tokens plot.")
    parser.add_argument("results", nargs="+", help="results.json files, or eval folders holding one")
    parser.add_argument("--out", default="accuracy_vs_tokens.png", help="PNG to write")
    args = parser.parse_args(argv[1:])
    try:
        loaded = [load_results(p) for p in args.results]
        for r in loaded:
            print(format_table(r) + "\n", flush=True)
        print(f"wrote {plot_accuracy_vs_tokens(loaded, args.out)}", flush=True)
    except FastmathError as err:
        print(f"fastmath: error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
