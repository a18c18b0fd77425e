"""A checkpoint save or load leaves the training thread's OpenMP barriers as it found them (one-process runs).

On CPU, a collective through gloo can run a parallel copy on gloo's worker thread; that thread then keeps its own
OpenMP team for the rest of the process, libgomp counts more threads than CPUs and stops spinning at barriers,
and every parallel op of the training thread sleeps on a futex: `make demo`'s SFT ran at ~5,000 tokens/s instead
of ~8,600 from its first checkpoint on. The signal checked is the mechanism (futex sleeps counted by the kernel),
not a timing: about one sleep per parallel op once throttled, about none before.
"""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, subprocess_env
from tests.workers.checkpoint_openmp import MULTIPLIES


def test_checkpoint_save_and_load_do_not_throttle_the_training_threads(assets, tmp_path):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs: with one, torch runs one OpenMP thread and no barrier exists to observe")
    env = subprocess_env()
    env.pop("OMP_NUM_THREADS")  # torch's own thread count, as `make demo` runs it: the case that was slow
    result = subprocess.run([sys.executable, str(REPO / "tests/workers/checkpoint_openmp.py"),
                             str(assets.model_dir), str(tmp_path / "run")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert counts["threads"] >= 2, counts
    # A quarter of the throttled count: spinning barriers under a loaded machine still sleep now and then.
    bound = MULTIPLIES // 4
    assert counts["before"] < bound, f"the barriers slept before any save, so this check sees nothing: {counts}"
    assert counts["after"] < bound, f"the save left OpenMP barriers sleeping on a futex: {counts}"
    assert counts["after_load"] < bound, f"the load left OpenMP barriers sleeping on a futex: {counts}"
