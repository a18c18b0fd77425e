"""Packaging facts users rely on: import boundaries and the name clash with HF's `kernels` distribution."""
import subprocess
import sys

from tests.conftest import subprocess_env


def _python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def test_transformers_does_not_mistake_ours_for_hf_kernels():
    """transformers probes for HF's `kernels` hub package; our import name `kernels` must not switch it on.

    transformers 5.19 finds the import name `kernels`, maps it to the distribution that ships it (ours,
    `fastmath`) and compares that version with its window for HF's package (>=0.17, <0.18): today only our
    0.x version keeps it False, so this test is the alarm for the day that stops being true.
    """
    out = _python("from transformers.utils.import_utils import is_kernels_available; print(is_kernels_available())")
    assert out == "False"


def test_kernels_imports_neither_fastmath_nor_transformers():
    out = _python("import sys, kernels; print(sorted(m for m in ('fastmath', 'transformers') if m in sys.modules))")
    assert out == "[]"
