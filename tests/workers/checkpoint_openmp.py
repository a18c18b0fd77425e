"""Run by tests/test_checkpoint_openmp.py as its own process (torch's default thread count, like `make demo`):
how often the training thread sleeps at OpenMP barriers before and after a checkpoint save and load.

    python tests/workers/checkpoint_openmp.py <model dir> <output dir>

Prints one JSON line: {"before": .., "after": .., "after_load": .., "threads": ..}, the main thread's voluntary
context switches over 1,000 parallel elementwise multiplies (200k floats each) before any checkpoint, after
`save_checkpoint` and after `load_checkpoint` of what it saved.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from fastmath import checkpoint  # noqa: E402
from fastmath.distributed import init_distributed  # noqa: E402
from fastmath.model import load_causal_lm  # noqa: E402

MULTIPLIES = 1000


def barrier_sleeps() -> int:
    """Voluntary context switches of this thread over MULTIPLIES parallel muls: ~0 while libgomp's threads spin
    at barriers, ~1 per mul once it has more threads than CPUs and sleeps on a futex instead."""
    x, y = torch.randn(200_000), torch.randn(200_000)
    for _ in range(50):
        x.mul(y)

    def switches() -> int:
        with open("/proc/thread-self/status") as handle:
            return int(handle.read().split("\nvoluntary_ctxt_switches:")[1].split()[0])

    start = switches()
    for _ in range(MULTIPLIES):
        x.mul(y)
    return switches() - start


def main(model_dir: str, out_dir: str) -> None:
    dist_info = init_distributed()
    model = load_causal_lm(model_dir, "sdpa", False)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.arange(8)[None], labels=torch.arange(8)[None]).loss.backward()
    optimizer.step()  # the optimizer state is part of what the save plans and writes
    before = barrier_sleeps()
    checkpoint.save_checkpoint(out_dir, 1, 0, model, optimizer, {}, dist_info, keep=1)
    after = barrier_sleeps()
    checkpoint.load_checkpoint(checkpoint.step_dir(out_dir, 1), model, optimizer, dist_info)
    after_load = barrier_sleeps()
    print(json.dumps({"before": before, "after": after, "after_load": after_load,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
