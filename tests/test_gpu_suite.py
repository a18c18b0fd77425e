"""bench/gpu_suite.sh --check: every stage of the GPU suite would start (scripts import, command lines parse,
presets exist, test files collect), checked on CPU so that a lent GPU's minutes are not lost to a typo."""
import subprocess
import sys

from tests.conftest import REPO, subprocess_env


def test_gpu_suite_check_passes():
    env = {**subprocess_env(), "PYTHON": sys.executable}
    result = subprocess.run(["bash", "bench/gpu_suite.sh", "--check"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "every stage would start" in result.stdout


def test_gpu_suite_check_catches_a_bad_command_line():
    """The checker itself: an unknown option and an unknown preset each fail with the script's message."""
    for argv, message in ((["bench/bench_attention.py", "--quik"], "unrecognized arguments"),
                          (["bench/bench_cross_entropy.py", "--sizes", "gpu-quik"], "not a preset")):  # fmt: skip
        result = subprocess.run([sys.executable, "bench/suite_check.py", *argv], cwd=REPO,
                                env=subprocess_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
        assert result.returncode != 0 and message in result.stderr + result.stdout, result.stderr[-2000:]
