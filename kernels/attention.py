"""Packed-sequence (varlen) attention, in the layout of flash-attn's `flash_attn_varlen_func`.

Several documents are concatenated along the token axis; `cu_seqlens` (int32, [n_docs + 1], starting
at 0, non-decreasing, ending at the token count) marks where each document starts. Tokens attend only
within their own document:

    out[t] = softmax(scale * q[t] @ k[doc(t)].T + mask) @ v[doc(t)]        scale = softmax_scale or D**-0.5

Shapes and dtypes:
    q [total_q, Hq, D], k and v [total_k, Hkv, D], one floating dtype, one device; Hq % Hkv == 0.
    GQA: query head h reads kv head h // (Hq // Hkv) (contiguous groups, as repeat_interleave).
    Returns [total_q, Hq, D] in q's dtype.

Causal masking is aligned bottom-right, flash-attn's convention (>= 2.1) when a document has
seqlen_q != seqlen_k: query i of a document attends key j iff j <= i + seqlen_k - seqlen_q. Query rows
that see no key (seqlen_q > seqlen_k, or seqlen_k == 0) output 0, as flash-attn does.

Backends (`backend=`):
    "reference": per-document loop over torch.nn.functional.scaled_dot_product_attention (the spec and
                 the CPU path; autograd through it is the CPU backward).
    "triton":    the Triton varlen flash-attention kernel. It lands in issue #3/#4; until then forcing it
                 raises NotImplementedError.
    "auto":      the rule of DESIGN.md: Triton for CUDA tensors, or for CPU tensors when
                 TRITON_INTERPRET=1, reference otherwise. Until the Triton kernel lands, "auto" always
                 takes the reference path.

Paper: Dao, "FlashAttention-2" (2023), whose varlen interface this mirrors.
"""

import torch
import torch.nn.functional as F

_BACKENDS = ("auto", "triton", "reference")


# ----------------------------------------------------------------------------------------------------
# PyTorch reference: exact, one SDPA call per document
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
) -> torch.Tensor:
    """Exact varlen attention: a loop over documents, each one `scaled_dot_product_attention` call.

    Same arguments and result as `varlen_attention`. Memory per document is seqlen_q * seqlen_k per
    head (SDPA's own), never total_q * total_k. Empty documents are skipped.
    """
    bounds_q, bounds_k = _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return _reference_attention(q, k, v, bounds_q, bounds_k, softmax_scale, causal)


def _reference_attention(q, k, v, bounds_q, bounds_k, softmax_scale, causal):
    outs = []
    for (start_q, end_q), (start_k, end_k) in zip(bounds_q, bounds_k):
        len_q, len_k = end_q - start_q, end_k - start_k
        if len_q == 0:
            continue
        # 1. Query rows that see no key output 0 (bottom-right causal with len_q > len_k, or no keys).
        if len_k == 0:
            n_blind = len_q
        else:
            n_blind = max(0, len_q - len_k) if causal else 0
        if n_blind:
            outs.append(_zeros_in_graph(q[start_q : start_q + n_blind]))
        if n_blind == len_q:
            continue
        # 2. SDPA on the rest, [1, H, L, D]; the causal mask keeps its bottom-right alignment.
        doc_q = q[start_q + n_blind : end_q].transpose(0, 1).unsqueeze(0)
        doc_k = k[start_k:end_k].transpose(0, 1).unsqueeze(0)
        doc_v = v[start_k:end_k].transpose(0, 1).unsqueeze(0)
        rows = len_q - n_blind
        mask, is_causal = None, causal
        if causal and rows != len_k:
            mask = torch.ones(rows, len_k, dtype=torch.bool, device=q.device).tril(diagonal=len_k - rows)
            is_causal = False
        out = F.scaled_dot_product_attention(
            doc_q, doc_k, doc_v, attn_mask=mask, is_causal=is_causal, scale=softmax_scale, enable_gqa=True
        )
        outs.append(out.squeeze(0).transpose(0, 1))
    if not outs:
        return _zeros_in_graph(q)
    return torch.cat(outs, dim=0)


def _zeros_in_graph(x):
    """Zeros shaped like x that keep x in the autograd graph (zero gradient), as a kernel's output would."""
    return x.masked_fill(torch.ones((), dtype=torch.bool, device=x.device), 0.0)


# ----------------------------------------------------------------------------------------------------
# Input checks (shared by every path)
# ----------------------------------------------------------------------------------------------------


def _check_cu_seqlens(name, cu_seqlens, total, max_seqlen, max_name):
    """Validate one cu_seqlens / max_seqlen pair; return the documents as [(start, end), ...]."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{name} must be a 1-D tensor [n_docs + 1], got {cu_seqlens!r:.80}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"{name} must be int32 (flash-attn convention), got {cu_seqlens.dtype}")
    offsets = cu_seqlens.tolist()  # one host sync; the reference needs the boundaries on the host anyway
    if offsets[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {offsets[0]}")
    bounds = list(zip(offsets[:-1], offsets[1:]))
    for i, (start, end) in enumerate(bounds):
        if end < start:
            raise ValueError(f"{name} must be non-decreasing, but {name}[{i + 1}] = {end} < {name}[{i}] = {start}")
    if offsets[-1] != total:
        raise ValueError(f"{name}[-1] ({offsets[-1]}) must equal the number of tokens ({total})")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise ValueError(f"{max_name} must be an int, got {max_seqlen!r}")
    longest = max((end - start for start, end in bounds), default=0)
    if max_seqlen < longest:
        raise ValueError(f"{max_name} ({max_seqlen}) is smaller than the longest document in {name} ({longest})")
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


# ----------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------


def _select_backend(backend: str) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "triton":
        raise NotImplementedError(
            "varlen_attention: the Triton path lands in issue #3/#4; use backend='auto' or 'reference'"
        )
    # "auto" would pick Triton for CUDA tensors or TRITON_INTERPRET=1; no Triton kernel exists yet.
    return "reference"


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
    backend: str = "auto",
) -> torch.Tensor:
    """Attention over packed documents (flash-attn `flash_attn_varlen_func` layout; see the module docstring).

    Args:
        q: [total_q, Hq, D]; k, v: [total_k, Hkv, D], Hq % Hkv == 0 (GQA, contiguous head groups).
        cu_seqlens_q, cu_seqlens_k: int32 [n_docs + 1] document offsets into q and k/v.
        max_seqlen_q, max_seqlen_k: ints >= the longest document (flash-attn sizes its grid with them).
        softmax_scale: default head_dim ** -0.5.
        causal: causal mask within each document, aligned bottom-right when seqlen_q != seqlen_k.
        backend: "auto" | "triton" | "reference". "triton" raises NotImplementedError until the Triton
            kernel lands (issue #3/#4); "auto" uses the reference until then.

    Returns [total_q, Hq, D] in q's dtype; differentiable in q, k, v.

    Raises ValueError for wrong ranks / shapes / dtypes, incompatible head counts, cu_seqlens that are
    not int32, do not start at 0, decrease, or do not end at the token count, and max_seqlen smaller than
    a real document. Validation reads cu_seqlens on the host (one sync).
    """
    bounds_q, bounds_k = _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    _select_backend(backend)
    return _reference_attention(q, k, v, bounds_q, bounds_k, softmax_scale, causal)
