"""Run under torchrun by tests/test_colocate.py: the GRPO stage of train.py, with rank 1's rollouts sleeping
past run.dist_timeout_minutes (its HF generator is slowed down here, in this worker only).

    torchrun --nproc_per_node=2 tests/workers/stalled_rank.py <seconds to sleep> <train.py overrides...>
"""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fastmath import rollout, train  # noqa: E402


def main(pause: float, overrides: list[str]) -> int:
    if os.environ.get("RANK") == "1":
        generate = rollout.HFGenerator.generate

        def slow_generate(self, *args, **kwargs):
            time.sleep(pause)
            return generate(self, *args, **kwargs)

        rollout.HFGenerator.generate = slow_generate
    return train.main(overrides)


if __name__ == "__main__":
    sys.exit(main(float(sys.argv[1]), sys.argv[2:]))
