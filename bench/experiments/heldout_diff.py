"""Where two models of the demo part on the held-out problems: which problems one gets right and the other wrong,
and the first reasoning step at which their greedy solutions differ.

Written to tell what GRPO costs in accuracy when it does: a model that dropped a reasoning step it needed fails
differently (its solution has fewer steps) from one whose memorised facts moved ("17-9=7" where the SFT model
wrote "17-9=8", the same expression with another result). The re-check steps ("check: ... ok", "let me verify
again: ... ok") are left out of the comparison: removing them is what the length rewards ask for.

Both models decode the demo's held-out problems greedily with the held-out check's own code
(`fastmath.heldout.judged_completions`, `heldout.*` of the config), and math-verify judges the answers. One
record per invocation in bench/results/heldout_diff-cpu.json.

    .venv/bin/python bench/experiments/heldout_diff.py --before runs/toy_levers/verbose0.8-native/seed1/hf \
        --after runs/toy_levers/verbose0.8-native/seed1/grpo/hf --label "80% verbose, the demo's GRPO, seed 1"
    .venv/bin/python bench/experiments/heldout_diff.py --table     # every recorded comparison, one line each
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.common import append_record, load_records, new_record, results_path  # noqa: E402
from fastmath.config import with_current_keys  # noqa: E402

RECHECK_PREFIXES = ("check:", "let me verify again:")
KINDS = ("same expression, other result", "other expression", "fewer steps", "more steps", "same steps, other answer")


def reasoning_steps(text: str) -> list[str]:
    """The steps of a `<think> a ; b ; ... </think>` solution, re-checks left out; none without a think block
    (a cut-off solution with no `</think>` keeps what it wrote)."""
    if "<think>" not in text and "</think>" not in text:
        return []
    body = text.split("</think>", 1)[0].split("<think>", 1)[-1]
    steps = [step.strip() for step in body.split(";")]
    return [step for step in steps if step and not step.startswith(RECHECK_PREFIXES)]


def first_difference(before: list[str], after: list[str]) -> tuple[int, str, str] | None:
    """(index, before's step, after's step) of the first step that differs; None when one list starts the other."""
    for index, (old, new) in enumerate(zip(before, after)):
        if old != new:
            return index, old, new
    return None


def flip_kind(before_text: str, after_text: str) -> str:
    """One of KINDS: how the after-solution leaves the before-solution (re-checks aside). Asked only of
    problems whose verdict flipped, so equal steps mean the boxed answer alone changed."""
    before, after = reasoning_steps(before_text), reasoning_steps(after_text)
    difference = first_difference(before, after)
    if difference is None:
        if len(after) == len(before):
            return "same steps, other answer"
        return "fewer steps" if len(after) < len(before) else "more steps"
    _, old, new = difference
    if "=" in old and "=" in new and old.rsplit("=", 1)[0] == new.rsplit("=", 1)[0]:
        return "same expression, other result"
    if len(after) < len(before):
        return "fewer steps"
    return "other expression"


def decode(model_path: str, config, rows: list[dict]) -> tuple[list[str], list[int], list[bool]]:
    """Greedy completions, their token counts and math-verify's verdicts, from the held-out check's own code."""
    import torch

    from fastmath.heldout import judged_completions

    texts, tokens, _, verdicts = judged_completions(model_path, config, rows, torch.device("cpu"))
    return texts, tokens, [bool(v.correct) for v in verdicts]


def compare(rows: list[dict], before: tuple, after: tuple) -> dict:
    """The summary and every flipped problem, from two decode() results over the same rows."""
    (before_texts, before_tokens, before_ok), (after_texts, after_tokens, after_ok) = before, after
    flips = []
    for i, row in enumerate(rows):
        if before_ok[i] == after_ok[i]:
            continue
        difference = first_difference(reasoning_steps(before_texts[i]), reasoning_steps(after_texts[i]))
        flips.append({"index": i, "direction": "lost" if before_ok[i] else "gained", "problem": row["problem"],
                      "answer": str(row["answer"]), "before": before_texts[i], "after": after_texts[i],
                      "kind": flip_kind(before_texts[i], after_texts[i]),
                      "first_difference": list(difference[1:]) if difference else None})
    n = len(rows)
    lost = [flip for flip in flips if flip["direction"] == "lost"]
    return {"n": n, "before_accuracy": sum(before_ok) / n, "after_accuracy": sum(after_ok) / n,
            "before_tokens": sum(before_tokens) / n, "after_tokens": sum(after_tokens) / n,
            "lost": len(lost), "gained": len(flips) - len(lost),
            "lost_by_kind": dict(Counter(flip["kind"] for flip in lost)), "flips": flips}


def markdown(records: list[dict]) -> str:
    """One line per recorded comparison, as docs/results.md shows them."""
    lines = ["| models compared | greedy accuracy | mean tokens | problems lost | gained "
             "| lost by how the solution changed |",
             "|---|---|---|---|---|---|"]
    for rec in records:
        summary = rec["results"][0]
        kinds = ", ".join(f"{kind}: {count}" for kind, count in sorted(summary["lost_by_kind"].items(),
                                                                       key=lambda item: -item[1])) or "-"
        label = with_current_keys(rec["label"])  # the record's words; a key that moved since shown by its new name
        lines.append(f"| {label} | {summary['before_accuracy']:.1%} -> {summary['after_accuracy']:.1%} | "
                     f"{summary['before_tokens']:.1f} -> {summary['after_tokens']:.1f} | {summary['lost']} | "
                     f"{summary['gained']} | {kinds} |")
    lines.append("\nEvery record of `bench/results/heldout_diff-cpu.json` (each keeps the flipped problems with both "
                 "solutions); re-check steps left out of the comparison.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true", help="print every recorded comparison; runs nothing")
    parser.add_argument("--before", required=False, help="exported model (HF folder), e.g. a run's SFT export")
    parser.add_argument("--after", help="exported model to compare, e.g. that run's GRPO export")
    parser.add_argument("--label", help="what the two models are, stored with the record")
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    path = args.out or results_path("heldout_diff", "cpu")
    if args.table:
        print(markdown(load_records(path)))
        return
    if not (args.before and args.after and args.label):
        parser.error("--before, --after and --label are needed to compare (or --table to print the records)")

    import os

    import torch

    from fastmath.config import load_config
    from fastmath.heldout import heldout_rows

    config = load_config(args.config)
    rows = heldout_rows(config)
    # Greedy decoding depends on the fp32 arithmetic too: a comparison is only that run's under the same one.
    record = new_record("heldout_diff", "cpu", label=args.label, before=args.before, after=args.after,
                        config=args.config, capability=os.environ.get("ATEN_CPU_CAPABILITY", "native"),
                        capability_used=torch.backends.cpu.get_cpu_capability())
    summary = compare(rows, decode(args.before, config, rows), decode(args.after, config, rows))
    record["results"] = [summary]
    append_record(record, path)
    print(f"{args.label}: {summary['before_accuracy']:.1%} -> {summary['after_accuracy']:.1%} greedy, "
          f"{summary['before_tokens']:.1f} -> {summary['after_tokens']:.1f} tokens; lost {summary['lost']} "
          f"problems, gained {summary['gained']}; lost by kind: {summary['lost_by_kind']}")
    for flip in summary["flips"]:
        print(f"  [{flip['direction']}] {flip['problem']}  ({flip['kind']}: {flip['first_difference']})")
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
