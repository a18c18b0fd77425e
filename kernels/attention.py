"""Packed-sequence (varlen) attention, in the layout of flash-attn's `flash_attn_varlen_func`.

Several documents are concatenated along the token axis; `cu_seqlens` (int32, [n_docs + 1], starting
at 0, non-decreasing, ending at the token count) marks where each document starts. Tokens attend only
within their own document. Per document and query head h (kv head g = h // (Hq // Hkv)):

    x_ij   = scale * q_i . k_j                                     scale = softmax_scale or D**-0.5
    s_ij   = softcap * tanh(x_ij / softcap)  if softcap > 0, else x_ij
    lse_i  = log sum_{j visible from i} exp(s_ij)
    out_i  = sum_{j visible from i} exp(s_ij - lse_i) v_j

Which keys a query sees (flash-attn's conventions, aligned bottom-right when seqlen_q != seqlen_k):
with shift = seqlen_k - seqlen_q and window_size = (left, right), query i sees key j iff
    j >= i + shift - left     (when left >= 0)       and      j <= i + shift + right     (when right >= 0),
where causal=True means right = 0 (a `right` passed with causal=True is ignored, as flash-attn does).
Query rows that see no key (seqlen_q > seqlen_k under a causal mask, seqlen_k == 0, ...) output 0 and
have lse = +inf (flash-attn's value; it makes exp(s - lse) = 0 in the backward).

Shapes and dtypes:
    q [total_q, Hq, D], k and v [total_k, Hkv, D]: one floating dtype, one device; Hq % Hkv == 0 (GQA with
    contiguous head groups, as repeat_interleave). The last dim must be contiguous on the Triton path (other
    strides are free, so HF's (B, H, T, D) -> (T, H, D) views need no copy).
    Returns out [total_q, Hq, D] in q's dtype, and with return_lse=True also lse [Hq, total_q] (natural log;
    fp32, fp64 for fp64 inputs on the reference). Both are differentiable in q, k, v.

Backends (`backend=`):
    "reference": a loop over documents: `scaled_dot_product_attention` per document, or, for softcap / lse,
                 the same math written out (exact; memory seqlen_q * seqlen_k per head of one document).
                 The spec, and the CPU path; autograd through it is the CPU backward.
    "triton":    the Triton kernels below: fp16 / bf16 / fp32 on CUDA, head_dim <= 256; fp32 products in tf32
                 there (tensor cores; about 1e-3 relative error per product, like torch's allow_tf32 matmuls);
                 fp16 / fp32 on CPU in Triton's interpreter (fp32 products exact), which needs TRITON_INTERPRET=1
                 set before triton and this module are imported (Triton interprets a function iff it is set
                 when the function is decorated); its bf16 tl.dot is wrong (docs/design.md). Other inputs raise
                 ValueError, CPU without the interpreter RuntimeError.
    "auto":      the backend rule (kernels/dispatch.py): Triton for CUDA tensors, and for CPU tensors while
                 TRITON_INTERPRET=1 is set; the reference for everything else and for the inputs the kernels do not take (fp64,
                 bf16 under the interpreter, head_dim > 256).

The Triton path (FlashAttention-2). Forward: one program per (document, q head, block of BLOCK_M queries);
it streams the document's keys in blocks of BLOCK_N with an online softmax (running max m, running sum l,
fp32 accumulator rescaled by exp2(m_old - m_new)) and writes out and lse. Key blocks outside a query
block's window are never visited (loop bounds, not masks); only blocks cut by the window edge or the
document end are masked. Backward: delta_i = rowsum(dO_i * O_i) - dlse_i; a dK/dV kernel (one program per
key block and kv head, looping over the group's q heads and their query blocks) and a dQ kernel (one
program per query block, looping over key blocks). Every output element has one writer: deterministic,
no atomics. The price is computing q.k and dO.v twice (once per backward kernel).

FLOPs (flash-attn's count, used by bench/bench_attention.py): forward 4 * Hq * D * sum_docs(Lq * Lk), halved
when causal with Lq == Lk; backward 2.5x forward. This backward does 3.5x forward (7 matmuls instead of 5)
to stay atomic-free. HBM bytes: q, k, v, dO read, out/dq/dk/dv written, O(total * H * D); K/V blocks are
re-read once per query block, mostly from L2, so long documents are compute-bound.

Paper: Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning" (2023).
"""

import functools
import math
import weakref

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.dispatch import all_interpreted, check_float_dtype, launching, use_triton

_LOG2E = math.log2(math.e)

# Block sizes. Under the interpreter (CPU tests) one small config: multi-config autotuning needs a GPU
# driver there, and small blocks keep the interpreted tests fast; BLOCK_M != BLOCK_N on purpose, so that
# the tests cover unequal blocks. On a GPU, autotuned per head dim / mask kind / dtype (not per
# max_seqlen, which changes every packed batch) among the configs kept for the head dim's BLOCK_D: those
# that compile for sm_90 and sm_80 within the per-block shared memory limit, spill no register at BLOCK_D 64
# and 128 (bf16, every mask kind on sm_90; the heaviest, soft-capped one on sm_80), and pipeline their loads
# (num_stages >= 2). The compile-time contract (bench/compile_contract.py, tests/test_compile_contract.py)
# holds these lists to that.
# Entries: (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_M counts queries, BLOCK_N keys, in every kernel.
_INTERPRETER_CONFIGS = {"forward": (16, 32, 4, 1), "dkdv": (32, 16, 4, 1), "dq": (16, 32, 4, 1)}
_GPU_CONFIGS = {
    "forward": {
        64: [(128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
        128: [(128, 32, 8, 3), (128, 32, 8, 2), (64, 64, 8, 3), (64, 32, 8, 3)],
        256: [(64, 32, 8, 2), (32, 32, 4, 2)],
    },
    # dK/dV keeps a key block's k, v and fp32 dk, dv in registers for the whole program: at head dim 128 only
    # 32-key blocks spread over 8 warps, with at most 32 queries a step, leave room for the [keys, queries] tiles
    # on both sm_90 and sm_80 (64 queries a step, or 4 warps, spill on sm_80).
    "dkdv": {
        64: [(64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2)],
        128: [(32, 32, 8, 2), (16, 32, 8, 2)],
        256: [(16, 32, 8, 2)],
    },
    "dq": {
        64: [(128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2)],
        128: [(64, 32, 8, 2), (64, 16, 8, 2), (32, 32, 8, 2), (32, 16, 8, 2)],
        256: [(32, 16, 8, 2)],
    },
}
MAX_HEAD_DIM = 256  # BLOCK_D beyond 256 does not fit shared memory with any useful tile
# fp32 inputs multiply on tensor cores in tf32 (10-bit mantissa, fp32 accumulation; ~1e-3 relative error per
# product, as torch.backends.cuda.matmul.allow_tf32 gives matmuls). "ieee" compiled to scalar FMAs for sm_90 and
# spilled 10-170 KB per thread at head dim 128. 16-bit inputs ignore the setting; the interpreter multiplies fp32
# exactly, so the CPU tests still see fp32 products.
DOT_PRECISION = "tf32"


def block_d(head_dim: int) -> int:
    """The head-dim tile: the next power of two, at least 16 (tl.dot's smallest K)."""
    return max(16, triton.next_power_of_2(head_dim))


def configs_for(kernel: str, head_dim: int) -> list:
    """The triton.Configs `kernel` ("forward" | "dkdv" | "dq") may launch at this head dim."""
    if triton.knobs.runtime.interpret:
        entries = [_INTERPRETER_CONFIGS[kernel]]
    else:
        table = _GPU_CONFIGS[kernel]
        entries = table[min(size for size in table if size >= min(block_d(head_dim), MAX_HEAD_DIM))]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in entries
    ]


def _all_configs(kernel: str) -> list:
    """Every config of every head dim, once: the autotuner's list, which `_pruner` narrows per launch."""
    sizes = (16,) if triton.knobs.runtime.interpret else tuple(_GPU_CONFIGS[kernel])
    unique = {str(config): config for size in sizes for config in configs_for(kernel, size)}
    return list(unique.values())


def _pruner(kernel: str):
    """early_config_prune for the autotuner: keep the configs of the launch's head dim, before any is timed."""
    keep = {size: {str(c) for c in configs_for(kernel, size)} for size in (16, 32, 64, 128, 256)}

    def prune(configs, named_args, **kwargs):
        kept = keep[kwargs["BLOCK_D"]]
        return [config for config in configs if str(config) in kept]

    return {"early_config_prune": prune}


_TUNING_KEY = ["HEAD_DIM", "MASK_LOWER", "MASK_UPPER", "SOFTCAP"]  # the autotuner adds the dtypes
_DELTA_BLOCK = 32  # tokens per program of the delta preprocess (a bandwidth-bound row reduction)


# ----------------------------------------------------------------------------------------------------
# Triton kernels: helpers
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(base, idx, stride, n_valid, d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """[len(idx), BLOCK_D] tile of rows `idx` (document positions) of one head; padding reads 0.

    Rows >= n_valid are padding only when CHECK_ROWS; head-dim columns >= HEAD_DIM always are. The row
    offset is int64: position * token stride passes 2**31 for long documents of wide rows.
    """
    ptrs = base + idx.to(tl.int64)[:, None] * stride + d[None, :]
    if CHECK_ROWS:
        if HEAD_DIM == BLOCK_D:
            tile = tl.load(ptrs, mask=idx[:, None] < n_valid, other=0.0)
        else:
            tile = tl.load(ptrs, mask=(idx[:, None] < n_valid) & (d[None, :] < HEAD_DIM), other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=d[None, :] < HEAD_DIM, other=0.0)
    return tile


@triton.jit
def _store_rows(base, idx, stride, n_valid, d, tile, HEAD_DIM: tl.constexpr):
    ptrs = base + idx.to(tl.int64)[:, None] * stride + d[None, :]
    tl.store(ptrs, tile.to(base.dtype.element_ty), mask=(idx[:, None] < n_valid) & (d[None, :] < HEAD_DIM))


@triton.jit
def _scores(qk, qk_scale, softcap_scale, SOFTCAP: tl.constexpr):
    """Scores in log2 units (s * log2(e)), and t = tanh(x / softcap) for the backward (qk when no softcap).

    Without softcap qk_scale = scale * log2(e). With softcap qk_scale = scale / softcap and
    softcap_scale = softcap * log2(e). tanh is written with exp2 (libdevice is unavailable in the
    interpreter): tanh(|x|) = (1 - e) / (1 + e) with e = exp(-2|x|) <= 1, which cannot overflow.
    """
    if SOFTCAP:
        x = qk * qk_scale
        e = tl.exp2(-2.8853900817779268 * tl.abs(x))  # 2 * log2(e)
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(x < 0, -t, t)
        s = t * softcap_scale
    else:
        t = qk
        s = qk * qk_scale
    return s, t


@triton.jit
def _visible(q_idx, k_idx, len_k, shift, window_left, window_right, MASK_LOWER: tl.constexpr, MASK_UPPER: tl.constexpr):
    """Broadcast q_idx / k_idx (document positions) to a bool tile: key in the document and in the window."""
    diagonal = q_idx + shift  # the key aligned with each query (bottom-right alignment)
    ok = k_idx < len_k
    if MASK_UPPER:
        ok = ok & (k_idx <= diagonal + window_right)
    if MASK_LOWER:
        ok = ok & (k_idx >= diagonal - window_left)
    return ok


@triton.jit
def _split_range(lo, hi, full_lo, full_hi, BLOCK: tl.constexpr):
    """Cut [lo, hi) into blocks of BLOCK starting at lo: [lo, a) and [b, hi) need the mask; the blocks of
    [a, b) lie inside [full_lo, full_hi), where nothing is masked. Returns (lo, a, b, hi), with hi raised
    to lo when the range is empty."""
    hi = tl.maximum(hi, lo)
    a = tl.minimum(lo + (tl.maximum(full_lo - lo, 0) + BLOCK - 1) // BLOCK * BLOCK, hi)
    b = a + tl.maximum(full_hi - a, 0) // BLOCK * BLOCK
    return lo, a, b, hi


@triton.jit
def _key_range(m0, m1, len_k, shift, window_left, window_right, MASK_LOWER: tl.constexpr, MASK_UPPER: tl.constexpr):
    """Keys seen by query rows m0..m1 (inclusive): [lo, hi); [full_lo, full_hi) is seen by every row."""
    lo = 0
    hi = len_k
    full_lo = lo
    full_hi = len_k
    if MASK_LOWER:
        lo = tl.maximum(m0 + shift - window_left, 0)
        full_lo = tl.maximum(m1 + shift - window_left, 0)
    if MASK_UPPER:
        hi = tl.minimum(m1 + shift + window_right + 1, len_k)
        full_hi = tl.minimum(m0 + shift + window_right + 1, len_k)
    return lo, hi, full_lo, full_hi


@triton.jit
def _query_range(n0, n1, len_q, shift, window_left, window_right, MASK_LOWER: tl.constexpr, MASK_UPPER: tl.constexpr):
    """Queries that see key rows n0..n1 (inclusive): [lo, hi); [full_lo, full_hi) sees every key.

    Key j is visible from query i iff j - shift - right <= i (upper edge) and i <= j - shift + left (lower).
    """
    lo = 0
    hi = len_q
    full_lo = lo
    full_hi = len_q
    if MASK_UPPER:
        lo = tl.maximum(n0 - shift - window_right, 0)
        full_lo = tl.maximum(n1 - shift - window_right, 0)
    if MASK_LOWER:
        hi = tl.minimum(n1 - shift + window_left + 1, len_q)
        full_hi = tl.minimum(n0 - shift + window_left + 1, len_q)
    return lo, hi, full_lo, full_hi


# ----------------------------------------------------------------------------------------------------
# Triton kernels: forward
# ----------------------------------------------------------------------------------------------------


@triton.autotune(configs=_all_configs("forward"), key=_TUNING_KEY, prune_configs_by=_pruner("forward"))
@triton.jit
def _varlen_fwd_kernel(
    # pointers: q/out [total_q, Hq, D], k/v [total_k, Hkv, D], lse [Hq, total_q] fp32, cu_seqlens int32
    Q, K, V, O, LSE, CU_Q, CU_K,
    # strides (token, head); the head-dim stride is 1
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lse,
    # sizes and scalars
    n_heads_q, group, qk_scale, softcap_scale, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_LOWER: tl.constexpr, MASK_UPPER: tl.constexpr,
    SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Grid (n_docs * Hq, cdiv(max_seqlen_q, BLOCK_M)): out and lse of one query block of one head."""
    # 1. Which document, head and query block. Heads of a document are neighbours in the grid so that a
    #    GQA group reads its K/V from L2; the last query blocks (the longest causal rows) start first.
    doc = tl.program_id(0) // n_heads_q
    head = tl.program_id(0) % n_heads_q
    m0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    start_q = tl.load(CU_Q + doc)
    len_q = tl.load(CU_Q + doc + 1) - start_q
    if m0 >= len_q:
        return
    start_k = tl.load(CU_K + doc)
    len_k = tl.load(CU_K + doc + 1) - start_k
    shift = len_k - len_q

    # 2. Base pointers in int64 (token offset * stride passes 2**31 at a few M tokens), then the query tile.
    q_base = Q + start_q.to(tl.int64) * stride_qt + head.to(tl.int64) * stride_qh
    kv_head = (head // group).to(tl.int64)
    k_base = K + start_k.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_base = V + start_k.to(tl.int64) * stride_vt + kv_head * stride_vh
    rows = m0 + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_base, rows, stride_qt, len_q, d, HEAD_DIM, BLOCK_D, True)

    # 3. Online softmax over the visible key blocks (blocks outside the window are never visited). Phases
    #    0 and 2 are the blocks cut by a window edge or the document end (masked); phase 1 the blocks that
    #    every row of the query block sees whole (no mask).
    m1 = tl.minimum(m0 + BLOCK_M, len_q) - 1
    lo, hi, full_lo, full_hi = _key_range(m0, m1, len_k, shift, window_left, window_right, MASK_LOWER, MASK_UPPER)
    lo, a, b, hi = _split_range(lo, hi, full_lo, full_hi, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for phase in tl.static_range(3):
        if phase == 0:
            start, end = lo, a
        elif phase == 1:
            start, end = a, b
        else:
            start, end = b, hi
        for start_n in range(start, end, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            k = _load_rows(k_base, cols, stride_kt, len_k, d, HEAD_DIM, BLOCK_D, phase != 1)
            s, _ = _scores(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), qk_scale, softcap_scale, SOFTCAP)
            if phase != 1:
                visible = _visible(rows[:, None], cols[None, :], len_k, shift, window_left, window_right,
                                   MASK_LOWER, MASK_UPPER)  # fmt: skip
                s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            if phase != 1:
                # A row that has seen no key yet keeps m = -inf: subtract 0 there (-inf - -inf is nan).
                m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_sub = m_new
            p = tl.exp2(s - m_sub[:, None])
            alpha = tl.exp2(m_i - m_sub)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _load_rows(v_base, cols, stride_vt, len_k, d, HEAD_DIM, BLOCK_D, phase != 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
            m_i = m_new

    # 4. Normalise. Rows that saw no key: out 0, lse +inf (flash-attn's convention).
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) / 1.4426950408889634, float("inf"))  # log2 -> natural log
    o_base = O + start_q.to(tl.int64) * stride_ot + head.to(tl.int64) * stride_oh
    _store_rows(o_base, rows, stride_ot, len_q, d, out, HEAD_DIM)
    lse_base = LSE + head.to(tl.int64) * stride_lse + start_q
    tl.store(lse_base + rows, lse, mask=rows < len_q)


# ----------------------------------------------------------------------------------------------------
# Triton kernels: backward
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _bwd_delta_kernel(
    O, DO, DLSE, DELTA,
    stride_ot, stride_oh, stride_dot, stride_doh, stride_lse, total_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(total_q, BLOCK_T), Hq): delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] - dlse[h, t], fp32.

    delta_i is the dot product the softmax backward needs per row: dS_ij = P_ij (dP_ij - delta_i). A
    gradient on lse adds P_ij dlse_i to dS_ij, hence the subtraction.
    """
    head = tl.program_id(1).to(tl.int64)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    o = _load_rows(O + head * stride_oh, t, stride_ot, total_q, d, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(DO + head * stride_doh, t, stride_dot, total_q, d, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + head * stride_lse + t, mask=t < total_q, other=0.0)
    tl.store(DELTA + head * stride_lse + t, delta, mask=t < total_q)


@triton.jit
def _dkdv_one_head(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
    lo, a, b, hi, cols, d, len_q, len_k, shift, window_left, window_right, qk_scale, softcap_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, MASK_LOWER: tl.constexpr,
    MASK_UPPER: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Add one q head's query blocks [lo, hi) to dK (unscaled) and dV; [a, b) needs no mask.

    Transposed tiles ([keys, queries]) so that dK and dV come out as plain dot products:
    P^T = exp2(S^T - lse), dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q.
    Padding query rows read lse = +inf, so their P is 0.
    """
    for phase in tl.static_range(3):
        if phase == 0:
            start, end = lo, a
        elif phase == 1:
            start, end = a, b
        else:
            start, end = b, hi
        for start_m in range(start, end, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            q = _load_rows(q_base, rows, stride_qt, len_q, d, HEAD_DIM, BLOCK_D, phase != 1)
            do = _load_rows(do_base, rows, stride_dot, len_q, d, HEAD_DIM, BLOCK_D, phase != 1)
            if phase != 1:
                lse = tl.load(lse_base + rows, mask=rows < len_q, other=float("inf"))
                delta = tl.load(delta_base + rows, mask=rows < len_q, other=0.0)
            else:
                lse = tl.load(lse_base + rows)
                delta = tl.load(delta_base + rows)
            s_t, t_t = _scores(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION), qk_scale, softcap_scale, SOFTCAP)
            p_t = tl.exp2(s_t - lse[None, :] * 1.4426950408889634)
            if phase != 1:
                visible = _visible(rows[None, :], cols[:, None], len_k, shift, window_left, window_right,
                                   MASK_LOWER, MASK_UPPER)  # fmt: skip
                p_t = tl.where(visible, p_t, 0.0)
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            if SOFTCAP:
                ds_t = ds_t * (1.0 - t_t * t_t)  # d(softcap * tanh(x / softcap)) / dx
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.autotune(configs=_all_configs("dkdv"), key=_TUNING_KEY, prune_configs_by=_pruner("dkdv"))
@triton.jit
def _varlen_bwd_dkdv_kernel(
    # pointers: q/do [total_q, Hq, D], k/v [total_k, Hkv, D], lse/delta [Hq, total_q] fp32,
    # dk/dv [n_split, total_k, Hkv, D] (fp32 partial sums when n_split > 1, else dk / dv themselves)
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K,
    # strides (token, head; split for dk/dv); the head-dim stride is 1
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dks, stride_dkt, stride_dkh, stride_dvs, stride_dvt, stride_dvh, stride_lse,
    # sizes and scalars
    n_heads_kv, group, heads_per_split, softmax_scale, qk_scale, softcap_scale, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_LOWER: tl.constexpr, MASK_UPPER: tl.constexpr,
    SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Grid (n_docs * Hkv, cdiv(max_seqlen_k, BLOCK_N), n_split): dK and dV of one key block of one kv head,
    summed over one split's `heads_per_split` q heads of the GQA group.

    With n_split = 1 the program sums over the whole group itself and writes dK / dV. With few kv heads that is
    too few programs for the GPU (2 kv heads on one 4k document: ~64 programs for 132 SMs), so the launcher
    splits the group across programs, each writing fp32 partial sums that it then adds up: no atomics, and a
    fixed summation order (deterministic).
    """
    # 1. Which document, kv head and key block (early key blocks are seen by the most queries: first).
    doc = tl.program_id(0) // n_heads_kv
    kv_head = (tl.program_id(0) % n_heads_kv).to(tl.int64)
    n0 = tl.program_id(1) * BLOCK_N
    start_k = tl.load(CU_K + doc)
    len_k = tl.load(CU_K + doc + 1) - start_k
    if n0 >= len_k:
        return
    start_q = tl.load(CU_Q + doc)
    len_q = tl.load(CU_Q + doc + 1) - start_q
    shift = len_k - len_q

    # 2. The key block stays in registers; the queries that see it, as masked edges and an unmasked middle.
    cols = n0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    k_base = K + start_k.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_base = V + start_k.to(tl.int64) * stride_vt + kv_head * stride_vh
    k = _load_rows(k_base, cols, stride_kt, len_k, d, HEAD_DIM, BLOCK_D, True)
    v = _load_rows(v_base, cols, stride_vt, len_k, d, HEAD_DIM, BLOCK_D, True)
    n1 = tl.minimum(n0 + BLOCK_N, len_k) - 1
    lo, hi, full_lo, full_hi = _query_range(n0, n1, len_q, shift, window_left, window_right, MASK_LOWER, MASK_UPPER)
    lo, a, b, hi = _split_range(lo, hi, full_lo, full_hi, BLOCK_M)

    # 3. Sum over the group's q heads and their query blocks.
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    split = tl.program_id(2)
    for i in range(heads_per_split):
        head = kv_head * group + split * heads_per_split + i
        dk, dv = _dkdv_one_head(
            dk, dv, k, v,
            Q + start_q.to(tl.int64) * stride_qt + head * stride_qh,
            DO + start_q.to(tl.int64) * stride_dot + head * stride_doh,
            LSE + head * stride_lse + start_q, DELTA + head * stride_lse + start_q, stride_qt, stride_dot,
            lo, a, b, hi, cols, d, len_q, len_k, shift, window_left, window_right, qk_scale, softcap_scale,
            HEAD_DIM, BLOCK_D, BLOCK_M, MASK_LOWER, MASK_UPPER, SOFTCAP, DOT_PRECISION,
        )  # fmt: skip

    # 4. dK = softmax_scale * dS^T Q (the scale of x = scale * q.k, applied once here).
    dk_base = DK + split.to(tl.int64) * stride_dks + start_k.to(tl.int64) * stride_dkt + kv_head * stride_dkh
    dv_base = DV + split.to(tl.int64) * stride_dvs + start_k.to(tl.int64) * stride_dvt + kv_head * stride_dvh
    _store_rows(dk_base, cols, stride_dkt, len_k, d, dk * softmax_scale, HEAD_DIM)
    _store_rows(dv_base, cols, stride_dvt, len_k, d, dv, HEAD_DIM)


@triton.autotune(configs=_all_configs("dq"), key=_TUNING_KEY, prune_configs_by=_pruner("dq"))
@triton.jit
def _varlen_bwd_dq_kernel(
    # pointers: q/do/dq [total_q, Hq, D], k/v [total_k, Hkv, D], lse/delta [Hq, total_q] fp32
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
    # strides (token, head); the head-dim stride is 1
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, stride_lse,
    # sizes and scalars
    n_heads_q, group, softmax_scale, qk_scale, softcap_scale, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_LOWER: tl.constexpr, MASK_UPPER: tl.constexpr,
    SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Grid (n_docs * Hq, cdiv(max_seqlen_q, BLOCK_M)): dQ of one query block of one head.

    dQ = softmax_scale * sum over key blocks of dS K, with P = exp2(S - lse), dP = dO V^T,
    dS = P (dP - delta); the same key blocks and phases as the forward.
    """
    # 1. Which document, head and query block (as in the forward).
    doc = tl.program_id(0) // n_heads_q
    head = tl.program_id(0) % n_heads_q
    m0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    start_q = tl.load(CU_Q + doc)
    len_q = tl.load(CU_Q + doc + 1) - start_q
    if m0 >= len_q:
        return
    start_k = tl.load(CU_K + doc)
    len_k = tl.load(CU_K + doc + 1) - start_k
    shift = len_k - len_q

    # 2. The query block's q, dO, lse (log2 units; padding rows +inf, so P = 0) and delta.
    head64 = head.to(tl.int64)
    kv_head = (head // group).to(tl.int64)
    k_base = K + start_k.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_base = V + start_k.to(tl.int64) * stride_vt + kv_head * stride_vh
    rows = m0 + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    q_base = Q + start_q.to(tl.int64) * stride_qt + head64 * stride_qh
    do_base = DO + start_q.to(tl.int64) * stride_dot + head64 * stride_doh
    q = _load_rows(q_base, rows, stride_qt, len_q, d, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(do_base, rows, stride_dot, len_q, d, HEAD_DIM, BLOCK_D, True)
    lse = tl.load(LSE + head64 * stride_lse + start_q + rows, mask=rows < len_q, other=float("inf"))
    lse = lse * 1.4426950408889634
    delta = tl.load(DELTA + head64 * stride_lse + start_q + rows, mask=rows < len_q, other=0.0)

    # 3. The key blocks and phases of the forward.
    m1 = tl.minimum(m0 + BLOCK_M, len_q) - 1
    lo, hi, full_lo, full_hi = _key_range(m0, m1, len_k, shift, window_left, window_right, MASK_LOWER, MASK_UPPER)
    lo, a, b, hi = _split_range(lo, hi, full_lo, full_hi, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for phase in tl.static_range(3):
        if phase == 0:
            start, end = lo, a
        elif phase == 1:
            start, end = a, b
        else:
            start, end = b, hi
        for start_n in range(start, end, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            k = _load_rows(k_base, cols, stride_kt, len_k, d, HEAD_DIM, BLOCK_D, phase != 1)
            v = _load_rows(v_base, cols, stride_vt, len_k, d, HEAD_DIM, BLOCK_D, phase != 1)
            s, t = _scores(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), qk_scale, softcap_scale, SOFTCAP)
            p = tl.exp2(s - lse[:, None])
            if phase != 1:
                visible = _visible(rows[:, None], cols[None, :], len_k, shift, window_left, window_right,
                                   MASK_LOWER, MASK_UPPER)  # fmt: skip
                p = tl.where(visible, p, 0.0)
            ds = p * (tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION) - delta[:, None])
            if SOFTCAP:
                ds = ds * (1.0 - t * t)
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)

    # 4. dQ = softmax_scale * dS K.
    dq_base = DQ + start_q.to(tl.int64) * stride_dqt + head64 * stride_dqh
    _store_rows(dq_base, rows, stride_dqt, len_q, d, dq * softmax_scale, HEAD_DIM)


# triton.jit interprets a function iff TRITON_INTERPRET=1 when it decorates it: Triton's own tl.max / tl.sum
# when triton is first imported, the kernels above when this module is. CPU tensors need all of them interpreted.
_INTERPRETED = all_interpreted(_varlen_fwd_kernel.fn)


# ----------------------------------------------------------------------------------------------------
# PyTorch reference: exact, one document at a time
# ----------------------------------------------------------------------------------------------------


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    softmax_scale: float | None = None,
    causal: bool = True,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    return_lse: bool = False,
):
    """Exact varlen attention: a loop over documents (see the module docstring for the math).

    Same arguments and result as `varlen_attention`. Memory per document is seqlen_q * seqlen_k per
    head, never total_q * total_k. Empty documents are skipped.
    """
    bounds_q, bounds_k = _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    window = _check_options(window_size, softcap, causal)
    out, lse = _reference_attention(q, k, v, bounds_q, bounds_k, softmax_scale, window, softcap, return_lse)
    return (out, lse) if return_lse else out


def _reference_attention(q, k, v, bounds_q, bounds_k, softmax_scale, window, softcap, return_lse):
    """window = (left, right) with -1 for no edge (causal is right = 0). Returns (out, lse or None)."""
    left, right = window
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    lse_dtype = torch.promote_types(q.dtype, torch.float32)
    # The documents as views from one split per tensor, not one slice each: the backward of a slice writes its
    # gradient into a fresh zero tensor of the whole packed length (n_docs x total x H x D values written per
    # layer and tensor), the backward of a split concatenates the pieces once. Same values, bit for bit; on 2 CPU
    # cores a packed row of 22 documents (2,045 tokens, 4 query / 2 kv heads of 48) went from 40.7 to 22.9 ms
    # forward plus backward, and the demo's SFT from 4,447 to 5,045 tokens/s (+13%).
    docs_q = q.split([end - start for start, end in bounds_q])
    docs_k = k.split([end - start for start, end in bounds_k])
    docs_v = v.split([end - start for start, end in bounds_k])
    outs, lses = [], []
    for piece_q, piece_k, piece_v in zip(docs_q, docs_k, docs_v):
        len_q, len_k = piece_q.shape[0], piece_k.shape[0]
        if len_q == 0:
            continue
        # 1. Rows that see no key output 0 (lse +inf): they are always a prefix, the rows whose window
        #    ends before key 0 (i + len_k - len_q + right < 0), or all rows when there is no key.
        shift = len_k - len_q
        n_blind = len_q if len_k == 0 else (min(len_q, max(0, -(shift + right))) if right >= 0 else 0)
        if n_blind:
            outs.append(_zeros_in_graph(piece_q[:n_blind]))
            lses.append(torch.full((q.shape[1], n_blind), math.inf, dtype=lse_dtype, device=q.device))
        if n_blind == len_q:
            continue
        # 2. The rest, [H, L, D] per document.
        doc_q = piece_q[n_blind:].transpose(0, 1)
        doc_k, doc_v = piece_k.transpose(0, 1), piece_v.transpose(0, 1)
        if softcap == 0.0 and not return_lse:
            # SDPA; square causal documents take its fused causal path (no mask tensor, ~1.3x faster on CPU).
            square_causal = left < 0 and right == 0 and len_q == len_k
            mask = None if square_causal else _window_mask(n_blind, len_q, len_k, left, right, q.device)
            out = F.scaled_dot_product_attention(
                doc_q[None], doc_k[None], doc_v[None], attn_mask=mask, is_causal=square_causal, scale=scale,
                enable_gqa=True,
            )[0]  # fmt: skip
        else:
            mask = _window_mask(n_blind, len_q, len_k, left, right, q.device)
            out, lse = _attention_math(doc_q, doc_k, doc_v, mask, scale, softcap)
            lses.append(lse)
        outs.append(out.transpose(0, 1))
    out = torch.cat(outs, dim=0) if outs else _zeros_in_graph(q)
    if not return_lse:
        return out, None
    lse = torch.cat(lses, dim=1) if lses else torch.zeros(q.shape[1], 0, dtype=lse_dtype, device=q.device)
    return out, lse


def _window_mask(first_row, len_q, len_k, left, right, device):
    """[len_q - first_row, len_k] bool mask of rows first_row.. of a document, or None when all is visible."""
    if left < 0 and right < 0:
        return None
    rows = torch.arange(first_row, len_q, device=device)[:, None] + (len_k - len_q)  # each query's diagonal key
    cols = torch.arange(len_k, device=device)[None, :]
    mask = torch.ones(len_q - first_row, len_k, dtype=torch.bool, device=device)
    if right >= 0:
        mask &= cols <= rows + right
    if left >= 0:
        mask &= cols >= rows - left
    return mask


def _attention_math(q, k, v, mask, scale, softcap):
    """Attention written out, [H, L, D] per document, in fp32 (fp64 for fp64): (out in q's dtype, lse)."""
    compute = torch.promote_types(q.dtype, torch.float32)
    groups = q.shape[0] // k.shape[0]
    k = k.to(compute).repeat_interleave(groups, dim=0)
    v = v.to(compute).repeat_interleave(groups, dim=0)
    scores = (q.to(compute) @ k.transpose(1, 2)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.exp(scores - lse[..., None]) @ v
    return out.to(q.dtype), lse


def _zeros_in_graph(x):
    """Zeros shaped like x that keep x in the autograd graph (zero gradient), as a kernel's output would."""
    return x.masked_fill(torch.ones((), dtype=torch.bool, device=x.device), 0.0)


# ----------------------------------------------------------------------------------------------------
# Input checks (shared by every path)
# ----------------------------------------------------------------------------------------------------

# Checked cu_seqlens, newest last: [(weakref, _version, total, max_seqlen, bounds)]. Every layer of a model
# gets the same cu_seqlens tensor, so only the first pays for reading it on the host (a device sync).
_checked_cu_seqlens: list = []
_CHECKED_CACHE_SIZE = 4


def _check_cu_seqlens(name, cu_seqlens, total, max_seqlen, max_name):
    """Validate one cu_seqlens / max_seqlen pair; return the documents as [(start, end), ...]."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{name} must be a 1-D tensor [n_docs + 1], got {cu_seqlens!r:.80}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"{name} must be int32 (flash-attn convention), got {cu_seqlens.dtype}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise ValueError(f"{max_name} must be an int, got {max_seqlen!r}")
    for ref, version, checked_total, checked_max, bounds in _checked_cu_seqlens:
        same_tensor = ref() is cu_seqlens and version == cu_seqlens._version
        if same_tensor and (checked_total, checked_max) == (total, max_seqlen):
            return bounds
    offsets = cu_seqlens.tolist()  # the host sync
    if offsets[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {offsets[0]}")
    bounds = list(zip(offsets[:-1], offsets[1:]))
    for i, (start, end) in enumerate(bounds):
        if end < start:
            raise ValueError(f"{name} must be non-decreasing, but {name}[{i + 1}] = {end} < {name}[{i}] = {start}")
    if offsets[-1] != total:
        raise ValueError(f"{name}[-1] ({offsets[-1]}) must equal the number of tokens ({total})")
    longest = max((end - start for start, end in bounds), default=0)
    if max_seqlen < longest:
        raise ValueError(f"{max_name} ({max_seqlen}) is smaller than the longest document in {name} ({longest})")
    _checked_cu_seqlens.append((weakref.ref(cu_seqlens), cu_seqlens._version, total, max_seqlen, bounds))
    del _checked_cu_seqlens[:-_CHECKED_CACHE_SIZE]
    return bounds


def _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D [tokens, heads, head_dim], got shape {tuple(t.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must share head_dim, got {q.shape[2]} and {k.shape[2]}")
    n_heads_q, n_heads_kv = q.shape[1], k.shape[1]
    if n_heads_kv < 1 or n_heads_q % n_heads_kv != 0:
        raise ValueError(
            f"the number of query heads ({n_heads_q}) must be a positive multiple "
            f"of the number of kv heads ({n_heads_kv})"
        )
    if not q.dtype.is_floating_point or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same documents, "
            f"got {cu_seqlens_q.numel()} and {cu_seqlens_k.numel()} entries"
        )
    bounds_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q")
    bounds_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k")
    return bounds_q, bounds_k


def _check_options(window_size, softcap, causal):
    """Validate window_size / softcap; return the window as (left, right), -1 = no edge, right = 0 if causal."""
    if (
        not isinstance(window_size, (tuple, list))
        or len(window_size) != 2
        or any(isinstance(w, bool) or not isinstance(w, int) or w < -1 for w in window_size)
    ):
        raise ValueError(f"window_size must be a pair of ints >= -1 (-1: unbounded), got {window_size!r}")
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap >= 0:
        raise ValueError(f"softcap must be a float >= 0 (0: off), got {softcap!r}")
    left, right = window_size
    return left, 0 if causal else right


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------


def _kernel_options(q, k, max_seqlen_q, max_seqlen_k, softmax_scale, window, softcap):
    """Scalars and compile-time flags shared by the three attention kernels."""
    head_dim = q.shape[2]
    scale = head_dim**-0.5 if softmax_scale is None else float(softmax_scale)
    left, right = window
    # An edge no document reaches is no edge: drop it, which also keeps i + shift +/- window in int32.
    left = -1 if left >= max_seqlen_k else left
    right = -1 if right >= max_seqlen_q else right
    return dict(
        group=q.shape[1] // k.shape[1],
        qk_scale=scale / softcap if softcap else scale * _LOG2E,
        softcap_scale=softcap * _LOG2E,
        window_left=max(left, 0),
        window_right=max(right, 0),
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        MASK_LOWER=left >= 0,
        MASK_UPPER=right >= 0,
        SOFTCAP=bool(softcap),
        DOT_PRECISION=DOT_PRECISION,
    )


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(q, k, v, cu_q, cu_k, max_seqlen_q, options):
    """Launch the forward: (out [total_q, Hq, D] in q's dtype, lse [Hq, total_q] fp32)."""
    total_q, n_heads_q, _ = q.shape
    n_docs = cu_q.numel() - 1
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(n_heads_q, total_q, dtype=torch.float32, device=q.device)
    if total_q == 0 or n_docs == 0:
        return out, lse
    grid = lambda meta: (n_docs * n_heads_q, triton.cdiv(max_seqlen_q, meta["BLOCK_M"]))  # noqa: E731
    if launching():  # not inside the memory planner's simulation (kernels.dispatch)
        _varlen_fwd_kernel[grid](
            q, k, v, out, lse, cu_q, cu_k,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), lse.stride(0),
            n_heads_q, **options,
        )  # fmt: skip
    return out, lse


# Splitting a GQA group across dK/dV programs: the key block assumed when counting programs (the autotuned block
# is chosen later), and how many programs per SM to aim for before splitting stops.
_TYPICAL_BLOCK_N = 32
_PROGRAMS_PER_SM = 2


def gqa_split(group: int, key_blocks: int, multiprocessors: int) -> int:
    """How many programs share one kv head's key block in the dK/dV pass: the smallest divisor of `group` that
    gives at least _PROGRAMS_PER_SM programs per multiprocessor (the whole group when none does; 1 when the
    multiprocessor count is unknown, as on CPU). Each split adds a [total_k, Hkv, D] fp32 partial sum for dK
    and one for dV, small exactly when kv heads are few."""
    wanted = _PROGRAMS_PER_SM * multiprocessors
    for split in range(1, group + 1):
        if group % split == 0 and (key_blocks * split >= wanted or split == group):
            return split
    return 1


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


def _backward(dout, dlse, q, k, v, out, lse, cu_q, cu_k, max_seqlen_q, max_seqlen_k, softmax_scale, options):
    """Launch delta, dK/dV and dQ: (dq, dk, dv) in the dtypes of q, k, v."""
    total_q, n_heads_q, head_dim = q.shape
    n_heads_kv = k.shape[1]
    n_docs = cu_q.numel() - 1
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if n_docs == 0 or (total_q == 0 and k.shape[0] == 0):
        return dq, dk, dv
    scale = head_dim**-0.5 if softmax_scale is None else float(softmax_scale)

    # 1. delta = rowsum(dO * O) - dlse, fp32 [Hq, total_q].
    delta = torch.empty_like(lse)
    if total_q:
        if launching():  # not inside the memory planner's simulation (kernels.dispatch)
            _bwd_delta_kernel[(triton.cdiv(total_q, _DELTA_BLOCK), n_heads_q)](
                out, dout, dlse if dlse is not None else lse, delta,
                out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), lse.stride(0), total_q,
                HEAD_DIM=head_dim, BLOCK_D=options["BLOCK_D"], HAS_DLSE=dlse is not None, BLOCK_T=_DELTA_BLOCK,
            )  # fmt: skip
    common = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1))
    common += (dout.stride(0), dout.stride(1))

    # 2. dK, dV: one program per key block, kv head and split of the GQA group.
    if max_seqlen_k:
        key_blocks = n_docs * n_heads_kv * triton.cdiv(max_seqlen_k, _TYPICAL_BLOCK_N)
        n_split = gqa_split(options["group"], key_blocks, _multiprocessor_count(q.device))
        dk_out, dv_out = dk[None], dv[None]
        if n_split > 1:
            dk_out = torch.empty((n_split, *k.shape), dtype=torch.float32, device=k.device)
            dv_out = torch.empty((n_split, *v.shape), dtype=torch.float32, device=v.device)
        grid = lambda meta: (n_docs * n_heads_kv, triton.cdiv(max_seqlen_k, meta["BLOCK_N"]), n_split)  # noqa: E731
        if launching():  # not inside the memory planner's simulation (kernels.dispatch)
            _varlen_bwd_dkdv_kernel[grid](
                q, k, v, dout, lse, delta, dk_out, dv_out, cu_q, cu_k,
                *common, *dk_out.stride()[:3], *dv_out.stride()[:3], lse.stride(0),
                n_heads_kv, heads_per_split=options["group"] // n_split, softmax_scale=scale, **options,
            )  # fmt: skip
        if n_split > 1:  # the splits' partial sums, added in a fixed order and rounded once
            dk.copy_(dk_out.sum(0))
            dv.copy_(dv_out.sum(0))

    # 3. dQ: one program per query block and q head.
    grid = lambda meta: (n_docs * n_heads_q, triton.cdiv(max_seqlen_q, meta["BLOCK_M"]))  # noqa: E731
    if max_seqlen_q:
        if launching():  # not inside the memory planner's simulation (kernels.dispatch)
            _varlen_bwd_dq_kernel[grid](
                q, k, v, dout, lse, delta, dq, cu_q, cu_k,
                *common, dq.stride(0), dq.stride(1), lse.stride(0),
                n_heads_q, softmax_scale=scale, **options,
            )  # fmt: skip
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------
# autograd.Function and the public function
# ----------------------------------------------------------------------------------------------------


class _VarlenAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, softmax_scale, options):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        out, lse = _forward(q, k, v, cu_q, cu_k, max_seqlen_q, options)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.sizes = (max_seqlen_q, max_seqlen_k, softmax_scale, options)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        max_seqlen_q, max_seqlen_k, softmax_scale, options = ctx.sizes
        dout = torch.zeros_like(out) if dout is None else _last_dim_contiguous(dout)
        dlse = None if dlse is None else dlse.float().contiguous()
        grads = _backward(dout, dlse, q, k, v, out, lse, cu_q, cu_k, max_seqlen_q, max_seqlen_k, softmax_scale, options)
        return (*grads, None, None, None, None, None, None)


def _use_triton(backend: str, q: torch.Tensor) -> bool:
    """The backend rule (`kernels.dispatch.use_triton`) with this kernel's limits: head_dim <= MAX_HEAD_DIM (the
    tiles fit shared memory), and no bf16 under Triton's interpreter (its bf16 tl.dot is wrong, docs/design.md)."""
    if backend == "triton":
        check_float_dtype("varlen_attention", "q", q, triton=True)
    beyond = ""
    if q.shape[-1] > MAX_HEAD_DIM:
        beyond = f"takes head_dim <= {MAX_HEAD_DIM}, got {q.shape[-1]}"
    elif q.device.type == "cpu" and q.dtype == torch.bfloat16:
        beyond = "takes no bf16 on CPU tensors: bf16 tl.dot is wrong in Triton's interpreter"
    return use_triton(backend, q.device, _INTERPRETED, "kernels.attention", q.dtype, beyond)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    softmax_scale: float | None = None,
    causal: bool = True,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Attention over packed documents (flash-attn `flash_attn_varlen_func` layout; see the module docstring).

    Dtypes: the policy of every kernel function (the `kernels` package docstring); bf16 under Triton's
    interpreter also takes the reference ("auto") or is refused ("triton"): its bf16 tl.dot is wrong there.

    Args:
        q: [total_q, Hq, D]; k, v: [total_k, Hkv, D], Hq % Hkv == 0 (GQA, contiguous head groups).
        cu_seqlens_q, cu_seqlens_k: int32 [n_docs + 1] document offsets into q and k/v (copied to q's
            device for the Triton path when they are elsewhere).
        max_seqlen_q, max_seqlen_k: ints >= the longest document (the kernels size their grids with them).
        softmax_scale: default head_dim ** -0.5.
        causal: causal mask within each document, aligned bottom-right when seqlen_q != seqlen_k.
        window_size: (left, right) sliding window, -1 = unbounded on that side; right is 0 when causal.
        softcap: > 0 caps the scores as softcap * tanh(scores / softcap) (Gemma 2); 0 = off.
        return_lse: also return lse [Hq, total_q] (natural log, +inf for rows that see no key).
        backend: "auto" | "triton" | "reference" (module docstring).

    Returns out [total_q, Hq, D] in q's dtype, or (out, lse); differentiable in q, k, v (through lse too).

    Raises ValueError for wrong ranks / shapes / dtypes, incompatible head counts, cu_seqlens that are
    not int32, do not start at 0, decrease, or do not end at the token count, max_seqlen smaller than
    a real document, a bad window_size / softcap, or backend="triton" on inputs it cannot take; RuntimeError
    for the Triton path on CPU tensors in a process that is not interpreting Triton.
    cu_seqlens are read on the host once per tensor (a device sync; later calls with the same, unmodified
    tensor and sizes reuse the check).
    """
    bounds_q, bounds_k = _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    window = _check_options(window_size, softcap, causal)
    if not _use_triton(backend, q):
        out, lse = _reference_attention(q, k, v, bounds_q, bounds_k, softmax_scale, window, softcap, return_lse)
        return (out, lse) if return_lse else out
    cu_q = cu_seqlens_q.to(q.device)
    cu_k = cu_seqlens_k.to(q.device)
    options = _kernel_options(q, k, max_seqlen_q, max_seqlen_k, softmax_scale, window, float(softcap))
    out, lse = _VarlenAttentionFunction.apply(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, softmax_scale, options)
    return (out, lse) if return_lse else out
