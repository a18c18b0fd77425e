"""The one tensor comparison the kernel tests share: a failure names the worst and the first bad element."""
import pytest
import torch


def assert_close(actual, expected, *, atol, rtol, name):
    """Like torch.testing.assert_close, but the message gives max / mean difference and the first bad index."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    diff = (actual - expected).abs()
    bad = diff > atol + rtol * expected.abs()
    if bad.any():
        first = tuple(bad.nonzero()[0].tolist())
        pytest.fail(
            f"{name}: max diff {diff.max():.3g}, mean diff {diff.mean():.3g}, {int(bad.sum())} bad of {diff.numel()}; "
            f"first bad index {first}: {actual[first]:.6g} vs {expected[first]:.6g}"
        )
