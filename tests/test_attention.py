"""kernels/attention.py: the reference against dense masked attention and FlexAttention; the Triton kernels
against the reference (outputs, lse, dq / dk / dv) and FlexAttention.

Triton interprets a function iff TRITON_INTERPRET=1 when it decorates it (its own tl.max / tl.sum when triton
is first imported), so an interpreted process must have it set from the start. When this process is not
interpreting, so the Triton tests carry the `triton` marker and `make test` runs them in a second pytest pass
with TRITON_INTERPRET=1 set from the start (`-m triton`); the first pass (`-m "not triton"`) runs the rest.
On a CUDA machine the Triton tests use the compiled kernels, bf16 included.

Interpreter shapes stay tiny (tens of tokens, head dim 16): an interpreted program takes milliseconds, a
forward + backward of 60 tokens and 4 heads about a second. The interpreter's blocks are 16 x 32 (forward,
dQ) and 32 x 16 (dK/dV), so documents of 17 and 38 tokens straddle block edges and cover the masked /
unmasked / masked phases of every kernel.
"""

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels.attention as attention
from kernels import varlen_attention
from kernels.attention import varlen_attention_reference
from tests.closeness import assert_close
from tests.tolerances import reduction_rtol, storage_rtol

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton tests run where Triton can: on CUDA, or on CPU in the interpreted pytest pass of `make test`
# (TRITON_INTERPRET=1 from the start, `-m triton`); tests/conftest.py skips them, with that reason, elsewhere.
triton_test = pytest.mark.triton


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def cu_seqlens(lengths, device="cpu"):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def make_qkv(lens_q, lens_k, heads_q, heads_kv, head_dim, *, dtype=torch.float32, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), heads_q, head_dim, generator=gen).to(device, dtype).requires_grad_()
    k = torch.randn(sum(lens_k), heads_kv, head_dim, generator=gen).to(device, dtype).requires_grad_()
    v = torch.randn(sum(lens_k), heads_kv, head_dim, generator=gen).to(device, dtype).requires_grad_()
    return q, k, v


def _positions(lengths):
    """Position of each token inside its document: [0..n0), [0..n1), ..."""
    starts = torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    return torch.arange(int(lengths.sum())) - starts


def document_mask(lens_q, lens_k, causal, window=(-1, -1)):
    """Dense [total_q, total_k] bool mask: same document, and key j inside query i's window, counted from
    the key aligned with i (i + len_k - len_q, bottom-right); causal is a right edge of 0."""
    lens_q, lens_k = torch.tensor(lens_q, dtype=torch.long), torch.tensor(lens_k, dtype=torch.long)
    doc_q = torch.repeat_interleave(torch.arange(len(lens_q)), lens_q)
    doc_k = torch.repeat_interleave(torch.arange(len(lens_k)), lens_k)
    diagonal = (_positions(lens_q) + (lens_k - lens_q)[doc_q])[:, None]
    pos_k = _positions(lens_k)[None, :]
    left, right = window[0], 0 if causal else window[1]
    mask = doc_q[:, None] == doc_k[None, :]
    if right >= 0:
        mask &= pos_k <= diagonal + right
    if left >= 0:
        mask &= pos_k >= diagonal - left
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


def dense_math(q, k, v, lens_q, lens_k, *, causal, window_size=(-1, -1), softcap=0.0):
    """(out, lse) written out in fp64 over all tokens with the dense document mask; lse +inf on blind rows."""
    mask = document_mask(lens_q, lens_k, causal, window_size).to(q.device)
    groups = q.shape[1] // k.shape[1]
    q, k, v = (t.double().transpose(0, 1) for t in (q, k, v))
    k, v = k.repeat_interleave(groups, dim=0), v.repeat_interleave(groups, dim=0)
    scores = q @ k.transpose(1, 2) * q.shape[-1] ** -0.5
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    # Blind rows (no visible key) get finite stand-ins before being set to 0 / +inf: no nan in the backward.
    blind = ~mask.any(1)
    lse = torch.logsumexp(scores.masked_fill(~mask, -torch.inf).masked_fill(blind[:, None], 0.0), dim=-1)
    probs = torch.exp(scores - lse[..., None]).masked_fill(~mask | blind[:, None], 0.0)
    return (probs @ v).transpose(0, 1), lse.masked_fill(blind, torch.inf)


def outputs_and_grads(fn, q, k, v):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    out.backward(grad_out)
    # An input the output never reads may get no gradient at all: that is a zero gradient.
    return [out.detach(), *(torch.zeros_like(t) if t.grad is None else t.grad.clone() for t in (q, k, v))]


def forward_backward(fn, q, k, v):
    """[out, lse, dq, dk, dv] of fn(q, k, v) -> (out, lse) under loss = sum(out * g) + sum(lse * h) (finite lse).

    The loss is taken in fp64 with fp32 weights g, h, so that runs in any dtype get the same upstream gradient.
    """
    for t in (q, k, v):
        t.grad = None
    out, lse = fn(q, k, v)
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(out.shape, generator=gen).to(out.device).double()
    h = torch.randn(lse.shape, generator=gen).to(lse.device).double()
    lse64 = lse.double()
    loss = (out.double() * g).sum() + torch.where(torch.isinf(lse64), 0.0, lse64 * h).sum()
    loss.backward()
    return [out.detach(), lse.detach(), *(torch.zeros_like(t) if t.grad is None else t.grad.clone() for t in (q, k, v))]


NAMES = ("out", "lse", "dq", "dk", "dv")


def score_magnitude(q, k, softmax_scale=None):
    """max |scores| any pair could reach: (|q| @ |k|^T) * scale over every query and key head pair of its
    group (fp64). Rounding a score by a relative e moves its probability by about e * |score| relatively,
    so this amplifies every error downstream of the scores."""
    group = q.shape[1] // k.shape[1]
    qa, ka = q.detach().double().abs(), k.detach().double().abs().repeat_interleave(group, dim=1)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    return torch.einsum("thd,shd->hts", qa, ka).max().item() * scale if q.numel() and k.numel() else 0.0


def attention_rtol(dtype, q, k, max_seqlen, softmax_scale=None):
    """Bound on two evaluations' difference, relative to the outputs' scale (assert_results_close multiplies by
    max(1, max |truth|)): six chained reductions (scores over the head dim, softmax, P @ V in the forward; dP,
    dS, the dQ / dK / dV sums in the backward), each of at most max(max_seqlen, head_dim) terms whose absolute
    sum is within the output scale (softmax weights sum to one), amplified by the score magnitude."""
    n = max(max_seqlen, q.shape[-1], 1)
    return reduction_rtol(dtype, n, chain=6) * (1 + score_magnitude(q, k, softmax_scale))


def assert_results_close(ours, truth, *, atol, rtol, prefix=""):
    """Compare [out, lse, dq, dk, dv]; lse must be +inf on exactly the same rows."""
    for name, a, b in zip(NAMES, ours, truth):
        if name == "lse":
            assert torch.equal(torch.isinf(a), torch.isinf(b)), f"{prefix}lse: +inf on different rows"
            a, b = a.masked_fill(torch.isinf(a), 0.0), b.masked_fill(torch.isinf(b), 0.0)
        scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
        assert_close(a, b, atol=atol * scale, rtol=rtol, name=prefix + name)


def check_triton(lens_q, lens_k, heads_q, heads_kv, head_dim=16, *, dtype=torch.float32, seed=0, max_seqlen=None,
                 **options):  # fmt: skip
    """The Triton path against the reference run in fp64 (the truth): out, lse, dq, dk, dv.

    fp32: within `attention_rtol` of the truth's scale. fp16 / bf16: at most twice the error of the reference
    run in the same dtype (which computes in fp32 and rounds inputs and results), plus one rounding to that dtype
    (its unit roundoff) of the truth's scale.
    """
    q, k, v = make_qkv(lens_q, lens_k, heads_q, heads_kv, head_dim, dtype=dtype, seed=seed, device=DEVICE)
    cu_q, cu_k = cu_seqlens(lens_q, DEVICE), cu_seqlens(lens_k, DEVICE)
    max_q, max_k = max_seqlen or (max(lens_q, default=0), max(lens_k, default=0))

    def call(backend):
        return lambda q, k, v: varlen_attention(
            q, k, v, cu_q, cu_k, max_q, max_k, return_lse=True, backend=backend, **options
        )

    ours = forward_backward(call("triton"), q, k, v)
    truth = forward_backward(call("reference"), *(t.detach().double().requires_grad_() for t in (q, k, v)))
    assert ours[0].dtype == dtype and ours[1].dtype == torch.float32
    tf32 = dtype == torch.float32 and DEVICE == "cuda"  # compiled fp32 products are tf32: fp16's 10-bit mantissa
    if dtype == torch.float32 and not tf32:
        tol = attention_rtol(torch.float32, q, k, max(max_q, max_k), options.get("softmax_scale"))
        assert_results_close(ours, truth, atol=tol, rtol=0.0)
        return ours
    same_dtype = torch.float16 if tf32 else dtype  # tf32 is held to the fp16 reference's error
    same = forward_backward(call("reference"), *(t.detach().to(same_dtype).requires_grad_() for t in (q, k, v)))
    for name, a, b, t in zip(NAMES, ours, same, truth):
        a, b, t = (x.double().masked_fill(torch.isinf(t), 0.0) for x in (a, b, t))
        scale = max(1.0, t.abs().max().item()) if t.numel() else 1.0
        bound = 2 * (b - t).abs().max().item() + storage_rtol(same_dtype) * scale if t.numel() else 0.0
        assert_close(a, t, atol=bound, rtol=0.0, name=f"{name} ({dtype})")
    return ours


# --------------------------------------------------------------------------------------------------
# The reference (exact PyTorch path) against dense attention over all tokens
# --------------------------------------------------------------------------------------------------


def check_reference_against_dense(lens_q, lens_k, heads_q, heads_kv, head_dim, causal, seed=0):
    q, k, v = make_qkv(lens_q, lens_k, heads_q, heads_kv, head_dim, seed=seed)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    max_q, max_k = max(lens_q, default=0), max(lens_k, default=0)
    ours = outputs_and_grads(
        lambda q, k, v: varlen_attention_reference(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal), q, k, v
    )
    dense = outputs_and_grads(lambda q, k, v: dense_attention(q, k, v, lens_q, lens_k, causal), q, k, v)
    tol = attention_rtol(torch.float32, q, k, sum(lens_k))  # dense attention sums over every key (masked)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, dense):
        assert_close(a, b, atol=tol * max(1.0, b.abs().max().item() if b.numel() else 0.0), rtol=0.0, name=name)
    return ours


LAYOUTS = [[5, 1, 9], [1], [1, 1, 1], [7, 0, 3], [16], [2, 13, 1, 4]]
HEADS = [(2, 2), (4, 2), (4, 1)]  # (Hq, Hkv): GQA ratios 1, 2, 4


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads_q,heads_kv", HEADS)
@pytest.mark.parametrize("lens", LAYOUTS)
def test_matches_dense_masked_sdpa(lens, heads_q, heads_kv, causal):
    check_reference_against_dense(lens, lens, heads_q, heads_kv, 8, causal)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads_q,heads_kv", [(4, 2), (2, 2)])
def test_seqlen_q_differs_from_seqlen_k(heads_q, heads_kv, causal):
    """Bottom-right causal alignment; a document with more queries than keys has blind rows (output 0)."""
    lens_q, lens_k = [3, 5, 2, 4, 0], [6, 5, 1, 0, 2]
    out, dq, _, _ = check_reference_against_dense(lens_q, lens_k, heads_q, heads_kv, 8, causal)
    # Document 2 (queries 8..9, one key): causal query 8 sees no key; document 3 has no keys at all.
    blind = [8, 10, 11, 12, 13] if causal else [10, 11, 12, 13]
    assert torch.equal(out[blind], torch.zeros_like(out[blind]))
    assert torch.equal(dq[blind], torch.zeros_like(dq[blind]))
    # Query 0 of document 0 (3 queries, 6 keys) sees keys 0..3 under bottom-right alignment.
    mask = document_mask(lens_q, lens_k, causal)
    assert mask[0].nonzero().squeeze(1).tolist() == ([0, 1, 2, 3] if causal else [0, 1, 2, 3, 4, 5])


@pytest.mark.parametrize(
    "causal,window,softcap",
    [(True, (2, 0), 0.0), (False, (3, 1), 0.0), (False, (-1, 2), 2.0), (True, (-1, -1), 3.0), (False, (0, 0), 0.0)],
)
def test_reference_window_softcap_lse(causal, window, softcap):
    """Sliding window, softcap and lse of the reference against the dense fp64 math (q / k lengths differ too)."""
    lens_q, lens_k = [3, 7, 2, 4, 0, 6], [6, 7, 1, 0, 2, 6]
    q, k, v = make_qkv(lens_q, lens_k, 4, 2, 8, dtype=torch.float64)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    options = dict(causal=causal, window_size=window, softcap=softcap)
    ours = forward_backward(
        lambda q, k, v: varlen_attention_reference(q, k, v, cu_q, cu_k, 7, 7, return_lse=True, **options), q, k, v
    )
    dense = forward_backward(lambda q, k, v: dense_math(q, k, v, lens_q, lens_k, **options), q, k, v)
    tol = attention_rtol(torch.float64, q, k, 7)
    assert_results_close(ours, dense, atol=tol, rtol=0.0)
    # Without softcap and lse the reference takes SDPA; it must agree with the written-out math.
    if softcap == 0.0:
        out = varlen_attention_reference(q, k, v, cu_q, cu_k, 7, 7, causal=causal, window_size=window)
        assert_close(out, ours[0], atol=tol * max(1.0, out.abs().max().item()), rtol=0.0, name="SDPA path")


def test_reference_function_and_backends_agree():
    lens = [4, 1, 6]
    q, k, v = make_qkv(lens, lens, 4, 2, 8)
    cu = cu_seqlens(lens)
    a = varlen_attention(q, k, v, cu, cu, 6, 6, backend="reference")
    b = varlen_attention_reference(q, k, v, cu, cu, 6, 6)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="backend"):
        varlen_attention(q, k, v, cu, cu, 6, 6, backend="flash")
    with pytest.raises(ValueError, match=r"varlen_attention: q has dtype float64; the Triton path accepts"):
        varlen_attention(q.double(), k.double(), v.double(), cu, cu, 6, 6, backend="triton")
    with pytest.raises(ValueError, match="bf16 tl.dot is wrong"):
        varlen_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu, cu, 6, 6, backend="triton")


@pytest.mark.skipif(attention._INTERPRETED, reason="this process interprets Triton")
def test_cpu_without_interpreter_raises(monkeypatch):
    lens = [4, 1, 6]
    q, k, v = make_qkv(lens, lens, 4, 2, 16)
    cu = cu_seqlens(lens)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert torch.equal(varlen_attention(q, k, v, cu, cu, 6, 6), varlen_attention_reference(q, k, v, cu, cu, 6, 6))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        varlen_attention(q, k, v, cu, cu, 6, 6, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # set too late: the kernels were not built for the interpreter
    with pytest.raises(RuntimeError, match="before triton and kernels.attention are imported"):
        varlen_attention(q, k, v, cu, cu, 6, 6)


def test_softmax_scale_and_low_precision():
    lens = [3, 7]
    q, k, v = make_qkv(lens, lens, 4, 2, 16)
    cu = cu_seqlens(lens)
    ref = varlen_attention_reference
    scaled = ref(q, k, v, cu, cu, 7, 7, softmax_scale=0.3)
    same = ref(q * (0.3 * 16**0.5), k, v, cu, cu, 7, 7)
    scale = max(1.0, same.abs().max().item())
    tol = attention_rtol(torch.float32, q, k, 7, softmax_scale=0.3) * scale
    assert_close(scaled, same, atol=tol, rtol=0.0, name="softmax_scale")
    for dtype in (torch.float16, torch.bfloat16):
        low = ref(q.to(dtype), k.to(dtype), v.to(dtype), cu, cu, 7, 7)
        assert low.dtype == dtype
        # q, k and v are each rounded once to 16 bits (scores move by 2 u16 |score|, relatively), the fp32
        # computation adds its own bound, and the output is rounded once more.
        low_tol = storage_rtol(dtype) * (2 + 2 * score_magnitude(q, k)) + attention_rtol(torch.float32, q, k, 7)
        assert_close(low, ref(q, k, v, cu, cu, 7, 7), atol=low_tol * scale, rtol=0.0, name=str(dtype))


def test_no_documents():
    q, k, v = make_qkv([], [], 2, 1, 4)
    empty = torch.zeros(1, dtype=torch.int32)
    out, lse = varlen_attention_reference(q, k, v, empty, empty, 0, 0, return_lse=True)
    assert out.shape == (0, 2, 4) and lse.shape == (2, 0)


def _flex_attention(q, k, v, mask, softcap=0.0):
    """FlexAttention over all tokens with a dense mask_mod (eager on CPU: outputs and lse, no backward)."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention
    except ImportError as e:
        pytest.skip(f"FlexAttention unavailable: {e}")

    def mask_mod(b, h, q_idx, kv_idx):
        return mask[q_idx, kv_idx]

    def score_mod(score, b, h, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap) if softcap else score

    block_mask = create_block_mask(mask_mod, None, None, mask.shape[0], mask.shape[1], device=q.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile"
        out, aux = flex_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            block_mask=block_mask, score_mod=score_mod, enable_gqa=True, return_aux=AuxRequest(lse=True),
        )  # fmt: skip
    blind = ~mask.any(1)
    return out[0].transpose(0, 1), aux.lse[0].masked_fill(blind, torch.inf)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads_q,heads_kv", HEADS)
def test_matches_flex_attention(heads_q, heads_kv, causal):
    lens_q, lens_k = [5, 1, 9, 3], [5, 1, 9, 6]
    q, k, v = (t.detach() for t in make_qkv(lens_q, lens_k, heads_q, heads_kv, 8))
    flex, _ = _flex_attention(q, k, v, document_mask(lens_q, lens_k, causal))
    ours = varlen_attention_reference(q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k), 9, 9, causal=causal)
    tol = attention_rtol(torch.float32, q, k, sum(lens_k)) * max(1.0, flex.abs().max().item())
    assert_close(ours, flex, atol=tol, rtol=0.0, name="out vs flex")


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
    check_reference_against_dense(lens_q, lens_k, heads_kv * groups, heads_kv, head_dim, causal, seed=seed)


def _call(q=None, k=None, v=None, cu_q=None, cu_k=None, max_q=9, max_k=9, **options):
    lens = [5, 1, 9]
    q0, k0, v0 = (t.detach() for t in make_qkv(lens, lens, 4, 2, 8))
    cu = cu_seqlens(lens)
    return varlen_attention(
        q0 if q is None else q, k0 if k is None else k, v0 if v is None else v,
        cu if cu_q is None else cu_q, cu if cu_k is None else cu_k, max_q, max_k, **options,
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
        (dict(window_size=(-2, 0)), "window_size must be a pair of ints >= -1"),
        (dict(window_size=4), "window_size must be a pair"),
        (dict(softcap=-1.0), "softcap must be a float >= 0"),
    ],
)
def test_bad_inputs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _call(**kwargs)


def test_cu_seqlens_checked_once_per_tensor(monkeypatch):
    """Every layer passes the same cu_seqlens: the host read (a device sync on GPU) happens once."""
    lens = [5, 1, 9]
    q, k, v = (t.detach() for t in make_qkv(lens, lens, 4, 2, 8))
    cu = cu_seqlens(lens)
    reads = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t) or real_tolist(t))
    for _ in range(3):
        varlen_attention(q, k, v, cu, cu, 9, 9, backend="reference")
    assert sum(t is cu for t in reads) == 1
    cu[1] = 7  # changed in place (a new _version): checked again
    with pytest.raises(ValueError, match="non-decreasing"):
        varlen_attention(q, k, v, cu, cu, 9, 9, backend="reference")


# --------------------------------------------------------------------------------------------------
# The Triton kernels against the reference
# --------------------------------------------------------------------------------------------------

TRITON_LENS = [1, 17, 38, 0, 5]  # a one-token document, an empty one, documents across block edges


@triton_test
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads_q,heads_kv", [(2, 2), (4, 2), (4, 1), (8, 1)])  # GQA 1, 2, 4, 8
def test_triton_matches_reference(heads_q, heads_kv, causal):
    check_triton(TRITON_LENS, TRITON_LENS, heads_q, heads_kv, causal=causal)


@triton_test
@pytest.mark.parametrize(
    "causal,window,softcap",
    [
        (True, (5, 0), 0.0),  # causal sliding window: lower edge masked, blocks left of it skipped
        (True, (20, 7), 30.0),  # causal ignores the right edge (flash-attn's convention), with softcap
        (True, (0, 0), 0.0),  # each query sees only its diagonal key
        (False, (4, 3), 0.0),
        (False, (-1, 6), 5.0),  # right edge only
        (False, (9, -1), 0.0),  # left edge only
    ],
)
def test_triton_sliding_window_and_softcap(causal, window, softcap):
    check_triton(TRITON_LENS, TRITON_LENS, 4, 2, causal=causal, window_size=window, softcap=softcap)


@triton_test
@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (-1, -1)), (True, (4, 0)), (False, (2, 1))])
def test_triton_seqlen_q_differs_from_seqlen_k(causal, window):
    """Bottom-right alignment; blind query rows (output 0, lse +inf), documents without queries or keys."""
    lens_q, lens_k = [3, 20, 2, 6, 0, 1, 19], [9, 17, 1, 0, 4, 1, 35]
    out, lse, dq, _, _ = check_triton(lens_q, lens_k, 4, 2, causal=causal, window_size=window)
    blind = torch.arange(25, 31)  # document 3: six queries, no keys
    assert torch.equal(out[blind], torch.zeros_like(out[blind])) and torch.isinf(lse[:, blind]).all()
    assert torch.equal(dq[blind], torch.zeros_like(dq[blind]))


@triton_test
@pytest.mark.parametrize(
    "lens_q,lens_k,causal,window,softcap",
    [
        (TRITON_LENS, TRITON_LENS, True, (-1, -1), 0.0),
        (TRITON_LENS, TRITON_LENS, False, (6, 2), 8.0),
        ([3, 20, 2, 6], [9, 17, 1, 0], True, (-1, -1), 0.0),
    ],
)
def test_triton_fp16(lens_q, lens_k, causal, window, softcap):
    check_triton(lens_q, lens_k, 4, 2, dtype=torch.float16, causal=causal, window_size=window, softcap=softcap)


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 tl.dot is wrong in Triton's interpreter: bf16 is checked on a GPU")
@pytest.mark.parametrize("causal", [True, False])
def test_bf16_on_cuda(causal):
    check_triton(TRITON_LENS, TRITON_LENS, 4, 2, dtype=torch.bfloat16, causal=causal)


@triton_test
@pytest.mark.parametrize("heads_q,heads_kv,multiprocessors", [(8, 1, 1000), (8, 2, 6), (6, 2, 1000)])
def test_triton_gqa_group_split_across_programs(heads_q, heads_kv, multiprocessors, monkeypatch):
    """Few kv heads on a big GPU: the dK/dV pass splits each GQA group across programs (fp32 partial sums, added
    afterwards); a pretend multiprocessor count forces splits of 8, 2 (of 4) and 3 on the CPU."""
    monkeypatch.setattr(attention, "_multiprocessor_count", lambda device: multiprocessors)
    group = heads_q // heads_kv
    key_blocks = 2 * heads_kv * -(-38 // attention._TYPICAL_BLOCK_N)  # two documents, the longer 38 keys
    assert attention.gqa_split(group, key_blocks, multiprocessors) > 1
    check_triton([17, 38], [17, 38], heads_q, heads_kv, causal=True)


@pytest.mark.parametrize(
    "group,key_blocks,multiprocessors,split",
    [(1, 64, 132, 1), (8, 64, 132, 8), (6, 100, 132, 3), (4, 1000, 132, 1), (7, 10, 132, 7), (4, 10, 0, 1)],
)  # fmt: skip
def test_gqa_split_rule(group, key_blocks, multiprocessors, split):
    """The smallest divisor of the group giving two programs per SM; the whole group at most; none on CPU."""
    assert attention.gqa_split(group, key_blocks, multiprocessors) == split


@triton_test
@pytest.mark.parametrize("head_dim", [8, 24, 64])  # padded to BLOCK_D 16 and 32 (masked columns), and exact
def test_triton_head_dims(head_dim):
    check_triton([17, 6], [17, 6], 2, 1, head_dim, causal=True)


@triton_test
def test_triton_max_seqlen_larger_than_needed():
    check_triton(TRITON_LENS, TRITON_LENS, 2, 1, max_seqlen=(70, 45), causal=True, window_size=(9, 0))


@triton_test
def test_triton_strided_inputs_deterministic_and_lse_only():
    """HF's layout ((B, H, T, D) transposed: token stride D) gives bit-identical results to contiguous
    inputs; two backward passes are bit-identical (no atomics); a loss on lse alone has gradients."""
    lens = [17, 5, 9]
    q, k, v = make_qkv(lens, lens, 4, 2, 16, device=DEVICE)
    cu = cu_seqlens(lens, DEVICE)

    def call(q, k, v, **options):
        return varlen_attention(q, k, v, cu, cu, 17, 17, backend="triton", return_lse=True, **options)

    contiguous = forward_backward(call, q, k, v)
    strided = [t.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_() for t in (q, k, v)]
    assert strided[0].stride() == (16, 16 * 31, 1)
    for name, a, b in zip(NAMES, forward_backward(call, *strided), contiguous):
        assert torch.equal(a, b), f"strided {name}"
    for name, a, b in zip(NAMES, forward_backward(call, q, k, v), contiguous):
        assert torch.equal(a, b), f"second run {name}"

    for t in (q, k, v):
        t.grad = None
    call(q, k, v, softcap=3.0)[1].sum().backward()
    ours = [t.grad.clone() for t in (q, k, v)]
    qkv64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    varlen_attention(*qkv64, cu, cu, 17, 17, backend="reference", return_lse=True, softcap=3.0)[1].sum().backward()
    for name, a, t in zip(("dq", "dk", "dv"), ours, qkv64):
        b = torch.zeros_like(t) if t.grad is None else t.grad  # lse does not depend on v
        tol = attention_rtol(torch.float32, q, k, 17) * max(1.0, b.abs().max().item())
        assert_close(a, b, atol=tol, rtol=0.0, name=f"lse-only {name}")


@triton_test
def test_triton_empty_inputs():
    for lens_q, lens_k in [([], []), ([0, 0], [0, 0]), ([0, 3], [4, 0]), ([2, 0], [0, 0])]:
        q, k, v = make_qkv(lens_q, lens_k, 2, 1, 16, device=DEVICE)
        cu_q, cu_k = cu_seqlens(lens_q, DEVICE), cu_seqlens(lens_k, DEVICE)
        max_q, max_k = max(lens_q, default=0), max(lens_k, default=0)
        out, lse = varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, backend="triton", return_lse=True)
        assert out.shape == q.shape and lse.shape == (2, q.shape[0])
        assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all()
        out.sum().backward()
        for t in (q, k, v):
            assert t.grad.shape == t.shape and torch.equal(t.grad, torch.zeros_like(t))


@triton_test
def test_triton_backend_dispatch(monkeypatch):
    lens = [6, 1]
    q, k, v = (t.detach() for t in make_qkv(lens, lens, 2, 1, 16, device=DEVICE))
    cu = cu_seqlens(lens, DEVICE)
    triton_out = varlen_attention(q, k, v, cu, cu, 6, 6, backend="triton")
    reference_out = varlen_attention(q, k, v, cu, cu, 6, 6, backend="reference")
    tol = attention_rtol(torch.float32, q, k, 6) * max(1.0, reference_out.abs().max().item())
    assert_close(triton_out, reference_out, atol=tol, rtol=0.0, name="triton vs reference")
    if DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        assert torch.equal(varlen_attention(q, k, v, cu, cu, 6, 6), reference_out)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert torch.equal(varlen_attention(q, k, v, cu, cu, 6, 6), triton_out)
    # fp64 has no kernel: "auto" takes the exact path.
    assert varlen_attention(q.double(), k.double(), v.double(), cu, cu, 6, 6).dtype == torch.float64


@triton_test
@pytest.mark.parametrize("causal,window,softcap", [(True, (-1, -1), 0.0), (False, (5, 3), 0.0), (True, (7, 0), 4.0)])
def test_triton_matches_flex_attention(causal, window, softcap):
    """Outputs and lse against FlexAttention with a document mask_mod (and a tanh score_mod for softcap)."""
    lens_q, lens_k = [1, 17, 38, 5], [1, 17, 38, 9]
    q, k, v = (t.detach() for t in make_qkv(lens_q, lens_k, 4, 2, 16, device=DEVICE))
    flex_out, flex_lse = _flex_attention(q, k, v, document_mask(lens_q, lens_k, causal, window).to(DEVICE), softcap)
    out, lse = varlen_attention(
        q, k, v, cu_seqlens(lens_q, DEVICE), cu_seqlens(lens_k, DEVICE), 38, 38,
        causal=causal, window_size=window, softcap=softcap, return_lse=True, backend="triton",
    )  # fmt: skip
    tol = attention_rtol(torch.float32, q, k, sum(lens_k))  # flex sums over every key of the batch (masked)
    assert_close(out, flex_out, atol=tol * max(1.0, flex_out.abs().max().item()), rtol=0.0, name="out vs flex")
    assert torch.equal(torch.isinf(lse), torch.isinf(flex_lse))
    finite, flex_finite = lse.masked_fill(torch.isinf(lse), 0), flex_lse.masked_fill(torch.isinf(flex_lse), 0)
    assert_close(finite, flex_finite, atol=tol * max(1.0, flex_finite.abs().max().item()), rtol=0.0,
                 name="lse vs flex")


WINDOWS = st.one_of(st.just((-1, -1)), st.tuples(st.integers(-1, 20), st.integers(-1, 20)))


@triton_test
@settings(max_examples=10, deadline=None)
@given(
    lens_q=st.lists(st.integers(0, 36), min_size=1, max_size=4),
    extra_k=st.lists(st.integers(-5, 5), min_size=4, max_size=4),
    same_lengths=st.booleans(),
    heads=st.sampled_from([(1, 1), (2, 1), (4, 2), (2, 2)]),
    head_dim=st.sampled_from([16, 24]),
    causal=st.booleans(),
    window=WINDOWS,
    softcap=st.sampled_from([0.0, 0.0, 4.0]),
    seed=st.integers(0, 2**16),
)
def test_triton_property_random_layouts(lens_q, extra_k, same_lengths, heads, head_dim, causal, window, softcap, seed):
    lens_k = lens_q if same_lengths else [max(0, n + e) for n, e in zip(lens_q, extra_k)]
    options = dict(causal=causal, window_size=window, softcap=softcap)
    check_triton(lens_q, lens_k, *heads, head_dim, seed=seed, **options)
