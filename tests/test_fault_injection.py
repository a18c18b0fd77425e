"""kill -9 and resume, in the suite: one SFT run of the embedded default killed while a checkpoint is written and
while the HF export is written, resumed each time; it must end bit-identical to an unbroken run, with one
metrics line per step and no corrupt checkpoint. The recorded figure (20+ trials) is `bench/fault_injection.py`."""
import sys

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

import fault_injection  # noqa: E402


def test_killed_and_resumed_sft_run_equals_the_unbroken_run(tmp_path, embedded_cache):
    figures = fault_injection.run("sft", trials=1, seed=0, work=tmp_path, max_kills=2, cache_dir=embedded_cache,
                                  plan=["checkpoint", "export"])
    (row,) = figures["trials"]
    assert "error" not in row, row
    assert row["kills"] >= 1 and row["launches"] == row["kills"] + 1, row
    assert row["identical"] and row["differing_tensors"] == 0, row
    assert row["lost_steps"] == [] and row["duplicated_steps"] == [], row
    assert row["corrupt_checkpoints"] == [] and row["resume_mismatches"] == 0, row
