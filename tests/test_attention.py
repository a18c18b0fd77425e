"""kernels/attention.py: varlen attention against dense masked SDPA and FlexAttention with a document mask."""

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import varlen_attention
from kernels.attention import varlen_attention_reference


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


def cu_seqlens(lengths):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


def make_qkv(lens_q, lens_k, heads_q, heads_kv, head_dim, *, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), heads_q, head_dim, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(sum(lens_k), heads_kv, head_dim, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(sum(lens_k), heads_kv, head_dim, generator=gen).to(dtype).requires_grad_()
    return q, k, v


def _positions(lengths):
    """Position of each token inside its document: [0..n0), [0..n1), ..."""
    starts = torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    return torch.arange(int(lengths.sum())) - starts


def document_mask(lens_q, lens_k, causal):
    """Dense [total_q, total_k] bool mask: same document, and (causal) key j <= query i + len_k - len_q."""
    lens_q, lens_k = torch.tensor(lens_q, dtype=torch.long), torch.tensor(lens_k, dtype=torch.long)
    doc_q = torch.repeat_interleave(torch.arange(len(lens_q)), lens_q)
    doc_k = torch.repeat_interleave(torch.arange(len(lens_k)), lens_k)
    pos_q = _positions(lens_q)
    pos_k = _positions(lens_k)
    shift = (lens_k - lens_q)[doc_q]  # per query: len_k - len_q of its document
    mask = doc_q[:, None] == doc_k[None, :]
    if causal:
        mask &= pos_k[None, :] <= (pos_q + shift)[:, None]
    return mask


def dense_attention(q, k, v, lens_q, lens_k, causal):
    """One SDPA call over all tokens with the block-diagonal (causal) document mask; rows with no key give 0."""
    mask = document_mask(lens_q, lens_k, causal)
    groups = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.repeat_interleave(groups, dim=1).transpose(0, 1),
        v.repeat_interleave(groups, dim=1).transpose(0, 1),
        attn_mask=mask,
    ).transpose(0, 1)
    return torch.where(mask.any(1)[:, None, None], out, torch.zeros_like(out))


def outputs_and_grads(fn, q, k, v):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    out.backward(grad_out)
    # An input the output never reads may get no gradient at all: that is a zero gradient.
    return [out.detach(), *(torch.zeros_like(t) if t.grad is None else t.grad.clone() for t in (q, k, v))]


def check_against_dense(lens_q, lens_k, heads_q, heads_kv, head_dim, causal, seed=0):
    q, k, v = make_qkv(lens_q, lens_k, heads_q, heads_kv, head_dim, seed=seed)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    max_q, max_k = max(lens_q, default=0), max(lens_k, default=0)
    ours = outputs_and_grads(
        lambda q, k, v: varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal), q, k, v
    )
    dense = outputs_and_grads(lambda q, k, v: dense_attention(q, k, v, lens_q, lens_k, causal), q, k, v)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, dense):
        assert_close(a, b, atol=2e-5, rtol=1e-4, name=name)
    return ours


LAYOUTS = [[5, 1, 9], [1], [1, 1, 1], [7, 0, 3], [16], [2, 13, 1, 4]]
HEADS = [(2, 2), (4, 2), (4, 1)]  # (Hq, Hkv): GQA ratios 1, 2, 4


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads_q,heads_kv", HEADS)
@pytest.mark.parametrize("lens", LAYOUTS)
def test_matches_dense_masked_sdpa(lens, heads_q, heads_kv, causal):
    check_against_dense(lens, lens, heads_q, heads_kv, 8, causal)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads_q,heads_kv", [(4, 2), (2, 2)])
def test_seqlen_q_differs_from_seqlen_k(heads_q, heads_kv, causal):
    """Bottom-right causal alignment; a document with more queries than keys has blind rows (output 0)."""
    lens_q, lens_k = [3, 5, 2, 4, 0], [6, 5, 1, 0, 2]
    out, dq, _, _ = check_against_dense(lens_q, lens_k, heads_q, heads_kv, 8, causal)
    # Document 2 (queries 8..9, one key): causal query 8 sees no key; document 3 has no keys at all.
    blind = [8, 10, 11, 12, 13] if causal else [10, 11, 12, 13]
    assert torch.equal(out[blind], torch.zeros_like(out[blind]))
    assert torch.equal(dq[blind], torch.zeros_like(dq[blind]))
    # Query 0 of document 0 (3 queries, 6 keys) sees keys 0..3 under bottom-right alignment.
    mask = document_mask(lens_q, lens_k, causal)
    assert mask[0].nonzero().squeeze(1).tolist() == ([0, 1, 2, 3] if causal else [0, 1, 2, 3, 4, 5])


def test_reference_function_and_backends_agree():
    lens = [4, 1, 6]
    q, k, v = make_qkv(lens, lens, 4, 2, 8)
    cu = cu_seqlens(lens)
    a = varlen_attention(q, k, v, cu, cu, 6, 6)
    b = varlen_attention(q, k, v, cu, cu, 6, 6, backend="reference")
    c = varlen_attention_reference(q, k, v, cu, cu, 6, 6)
    assert torch.equal(a, b) and torch.equal(a, c)
    with pytest.raises(NotImplementedError, match="Triton path lands"):
        varlen_attention(q, k, v, cu, cu, 6, 6, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        varlen_attention(q, k, v, cu, cu, 6, 6, backend="flash")


def test_softmax_scale_and_low_precision():
    lens = [3, 7]
    q, k, v = make_qkv(lens, lens, 4, 2, 16)
    cu = cu_seqlens(lens)
    scaled = varlen_attention(q, k, v, cu, cu, 7, 7, softmax_scale=0.3)
    same = varlen_attention(q * (0.3 * 16**0.5), k, v, cu, cu, 7, 7)
    assert_close(scaled, same, atol=1e-5, rtol=1e-5, name="softmax_scale")
    for dtype in (torch.float16, torch.bfloat16):
        low = varlen_attention(q.to(dtype), k.to(dtype), v.to(dtype), cu, cu, 7, 7)
        assert low.dtype == dtype
        assert_close(low, varlen_attention(q, k, v, cu, cu, 7, 7), atol=3e-2, rtol=3e-2, name=str(dtype))


def test_no_documents():
    q, k, v = make_qkv([], [], 2, 1, 4)
    empty = torch.zeros(1, dtype=torch.int32)
    out = varlen_attention(q, k, v, empty, empty, 0, 0)
    assert out.shape == (0, 2, 4)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads_q,heads_kv", HEADS)
def test_matches_flex_attention(heads_q, heads_kv, causal):
    """FlexAttention with a document mask_mod (eager on CPU; it has no CPU backward, so outputs only)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        print(f"skipping: FlexAttention unavailable ({e})")
        pytest.skip(f"FlexAttention unavailable: {e}")
    lens_q, lens_k = [5, 1, 9, 3], [5, 1, 9, 6]
    q, k, v = (t.detach() for t in make_qkv(lens_q, lens_k, heads_q, heads_kv, 8))
    mask = document_mask(lens_q, lens_k, causal)

    def mask_mod(b, h, q_idx, kv_idx):
        return mask[q_idx, kv_idx]

    block_mask = create_block_mask(mask_mod, None, None, mask.shape[0], mask.shape[1], device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile"
        flex = flex_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            block_mask=block_mask, enable_gqa=True,
        )[0].transpose(0, 1)  # fmt: skip
    ours = varlen_attention(q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k), 9, 9, causal=causal)
    assert_close(ours, flex, atol=2e-5, rtol=1e-4, name="out vs flex")


@settings(max_examples=40, deadline=None)
@given(
    lens_q=st.lists(st.integers(0, 12), min_size=0, max_size=6),
    extra_k=st.lists(st.integers(-3, 4), min_size=6, max_size=6),
    same_lengths=st.booleans(),
    heads_kv=st.sampled_from([1, 2]),
    groups=st.sampled_from([1, 2, 3]),
    head_dim=st.sampled_from([4, 8]),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_random_layouts(lens_q, extra_k, same_lengths, heads_kv, groups, head_dim, causal, seed):
    lens_k = lens_q if same_lengths else [max(0, n + e) for n, e in zip(lens_q, extra_k)]
    check_against_dense(lens_q, lens_k, heads_kv * groups, heads_kv, head_dim, causal, seed=seed)


# --------------------------------------------------------------------------------------------------


def _call(q=None, k=None, v=None, cu_q=None, cu_k=None, max_q=9, max_k=9):
    lens = [5, 1, 9]
    q0, k0, v0 = (t.detach() for t in make_qkv(lens, lens, 4, 2, 8))
    cu = cu_seqlens(lens)
    return varlen_attention(
        q0 if q is None else q, k0 if k is None else k, v0 if v is None else v,
        cu if cu_q is None else cu_q, cu if cu_k is None else cu_k, max_q, max_k,
    )  # fmt: skip


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(cu_q=torch.tensor([0, 5, 6, 15])), "cu_seqlens_q must be int32"),
        (dict(cu_k=torch.tensor([0, 5, 6, 15], dtype=torch.int32).float()), "cu_seqlens_k must be int32"),
        (dict(cu_q=torch.tensor([0, 6, 5, 15], dtype=torch.int32)), "non-decreasing"),
        (dict(cu_q=torch.tensor([1, 5, 6, 15], dtype=torch.int32)), r"cu_seqlens_q\[0\] must be 0"),
        (dict(cu_k=torch.tensor([0, 5, 6, 14], dtype=torch.int32)), r"cu_seqlens_k\[-1\] \(14\) must equal"),
        (dict(cu_k=torch.tensor([0, 15], dtype=torch.int32)), "same documents"),
        (dict(cu_q=torch.tensor([[0, 5, 6, 15]], dtype=torch.int32)), "1-D"),
        (dict(max_q=8), r"max_seqlen_q \(8\) is smaller than the longest document"),
        (dict(max_k=3), r"max_seqlen_k \(3\) is smaller"),
        (dict(max_q=9.0), "max_seqlen_q must be an int"),
        (dict(k=torch.randn(15, 3, 8), v=torch.randn(15, 3, 8)), "multiple of the number of kv heads"),
        (dict(v=torch.randn(15, 2, 4)), "v must have the shape of k"),
        (dict(k=torch.randn(15, 2, 4), v=torch.randn(15, 2, 4)), "share head_dim"),
        (dict(q=torch.randn(15, 32)), "q must be 3-D"),
        (dict(v=torch.randn(15, 2, 8).double()), "one floating dtype"),
    ],
)
def test_bad_inputs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _call(**kwargs)
