"""Plug `kernels.varlen_attention` into Hugging Face transformers models (transformers 5.x).

Usage:

    import kernels.hf
    kernels.hf.register()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=kernels.hf.ATTENTION_NAME)
    # one packed row of documents, position_ids restarting at 0 per document
    out = model(input_ids=ids[None], position_ids=pos[None],
                cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=m, max_length_k=m)

    # or, for a model already loaded (and moved to the GPU): packed attention plus Liger-Kernel's
    # RMSNorm / SwiGLU / RoPE on CUDA
    model = kernels.hf.patch(model)

The attention runs `varlen_attention` with backend "auto": the Triton kernels on CUDA (and on CPU under
TRITON_INTERPRET=1), the exact PyTorch reference on CPU.

How transformers calls us. Every decoder attention module (Llama, Qwen2, ... written against
`AttentionInterface`) calls `fn(module, query, key, value, attention_mask, dropout=, scaling=, **kwargs)`
with query (B, Hq, T, D) and key/value (B, Hkv, S, D) (GQA not expanded); the kwargs are whatever the
caller passed to `model(...)` (FlashAttentionKwargs: cu_seq_lens_q/k, max_length_q/k) plus the
model's `position_ids` (always present: the model builds arange when the caller gives none). It must
return (out (B, T, Hq, D), None).

Where the documents come from, in order:
    1. `cu_seq_lens_q` (and `cu_seq_lens_k`, default the same) with `max_length_q/k` (default: read
       from cu_seq_lens, one host sync): the packed row as given. Needs batch size 1, and no padding
       mask beside it (pad a packed row with a document of its own instead).
    2. a 2-D padding mask (B, S) (only when it has padding; see the mask function below): each row's
       unpadded tokens are one document, gathered, attended, and scattered back (zeros at padding).
    3. `position_ids` when T == S: a document starts where position_ids == 0 and at each row start.
       Derived once per forward (cached on the position_ids tensor), not once per layer.
    4. otherwise each batch row is one document (this also covers decoding with a KV cache,
       T < S, through the bottom-right causal alignment).

The mask function registered under the same name in `AttentionMaskInterface` returns None or the 2-D
padding mask, never a dense T x T mask (the flash-attention convention). Without a mask entry,
transformers skips mask creation entirely and padding would be silently ignored.

Sliding windows (`sliding_window=W` from Qwen2 / Mistral / Gemma 2 layers) become window_size =
(W - 1, W - 1) as in transformers' flash-attention path (a causal layer ignores the right edge), and
logit soft-capping (`softcap`, Gemma 2) passes through.
Not supported (raise): dropout > 0, attention sinks (s_aux), 4-D masks.
Module-level state: the one-entry position_ids cache (a weak reference, so it never keeps a batch alive).
"""

import logging
import weakref

import torch
import torch.nn.functional as F

from kernels.attention import varlen_attention

ATTENTION_NAME = "fastmath_varlen"
logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# Document layouts: (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
# ----------------------------------------------------------------------------------------------------


def _cu_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


# The last derivation, keyed on the position_ids tensor itself: every layer of one forward gets the
# same tensor object, so only the first layer pays for the host sync.
_position_ids_cache: dict = {"ref": None, "version": None, "batch": None, "layout": None}


def _layout_from_position_ids(position_ids: torch.Tensor, batch_size: int):
    cache = _position_ids_cache
    hit = (
        cache["ref"] is not None
        and cache["ref"]() is position_ids
        and cache["version"] == position_ids._version
        and cache["batch"] == batch_size
    )
    if not hit:
        layout = _derive_layout(position_ids, batch_size)
        cache.update(ref=weakref.ref(position_ids), version=position_ids._version, batch=batch_size, layout=layout)
    return cache["layout"]


def _derive_layout(position_ids: torch.Tensor, batch_size: int):
    """Documents start where position_ids == 0 and at every row start (rows are flattened in order)."""
    starts = position_ids.expand(batch_size, -1) == 0
    starts[:, 0] = True
    offsets = starts.reshape(-1).nonzero().squeeze(1).to(torch.int32)
    cu = torch.cat([offsets, offsets.new_tensor([starts.numel()])])
    max_len = int(cu.diff().max())  # the one host sync of the derivation
    return cu, cu, max_len, max_len


def _layout_from_kwargs(kwargs: dict, batch_size: int):
    if batch_size != 1:
        raise ValueError(
            f"cu_seq_lens_q/k describe one packed row, so the batch size must be 1, got {batch_size}; "
            "flatten the batch into one row (position_ids restarting at 0 per document)"
        )
    cu_q = kwargs["cu_seq_lens_q"].to(torch.int32)
    cu_k = cu_q if kwargs.get("cu_seq_lens_k") is None else kwargs["cu_seq_lens_k"].to(torch.int32)
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    max_q = int(cu_q.diff().max()) if max_q is None else int(max_q)
    max_k = int(cu_k.diff().max()) if max_k is None else int(max_k)
    return cu_q, cu_k, max_q, max_k


def _rows_layout(batch_size: int, len_q: int, len_k: int, device):
    rows = torch.arange(batch_size + 1, dtype=torch.int32, device=device)
    return rows * len_q, rows * len_k, len_q, len_k


# ----------------------------------------------------------------------------------------------------
# The attention function and the mask function transformers call
# ----------------------------------------------------------------------------------------------------


def _check_supported(module, attention_mask, dropout, kwargs):
    if dropout:
        raise NotImplementedError(f"{ATTENTION_NAME}: attention dropout is not supported (got {dropout})")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError(f"{ATTENTION_NAME}: attention sinks (s_aux) unsupported ({type(module).__name__})")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"{ATTENTION_NAME} takes a 2-D padding mask or None, got a {attention_mask.dim()}-D mask; "
            "describe packed documents with position_ids or cu_seq_lens_q/k instead"
        )
    if kwargs.get("cu_seq_lens_q") is not None and attention_mask is not None:
        raise ValueError(f"{ATTENTION_NAME}: pass either cu_seq_lens_q/k or a padding attention_mask, not both")


def _common_dtype(q, k, v):
    """Under autocast, RoPE's fp32 cos/sin promote q and k to fp32 while v stays in the autocast dtype (SDPA
    is an autocast op and casts them back itself; we are not): compute in the autocast dtype, else in v's."""
    device_type = q.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else v.dtype
    return q.to(dtype), k.to(dtype), v.to(dtype)


# Document boundaries are data (cu_seqlens values), which torch.compile would specialise on and recompile
# for every packed row; keep the attention call itself outside compiled graphs.
@torch.compiler.disable
def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query (B, Hq, T, D), key/value (B, Hkv, S, D) -> ((B, T, Hq, D), None).

    See the module docstring for where the document boundaries come from.
    """
    _check_supported(module, attention_mask, dropout, kwargs)
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    # transformers' sliding_window counts the query itself: W tokens = W - 1 to the left (flash-attn's edges).
    sliding_window = kwargs.get("sliding_window")
    options = dict(
        softmax_scale=scaling,
        causal=causal,
        window_size=(-1, -1) if sliding_window is None else (sliding_window - 1, sliding_window - 1),
        softcap=kwargs.get("softcap") or 0.0,
    )
    batch_size, n_heads_q, len_q, head_dim = query.shape
    len_k = key.shape[2]
    # (B, H, T, D) -> (B, T, H, D): the token-major layout varlen attention flattens.
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    q, k, v = _common_dtype(q, k, v)

    if attention_mask is not None:
        # Padding: gather the real tokens of each row (the last len_q columns are the queries).
        if attention_mask.shape != (batch_size, len_k):
            raise ValueError(
                f"{ATTENTION_NAME}: padding mask of shape {tuple(attention_mask.shape)}, "
                f"expected (batch, kv_length) = ({batch_size}, {len_k})"
            )
        mask_k = attention_mask.bool()
        mask_q = mask_k[:, -len_q:]
        lengths_q, lengths_k = mask_q.sum(1), mask_k.sum(1)
        out = varlen_attention(
            q[mask_q], k[mask_k], v[mask_k],
            _cu_from_lengths(lengths_q), _cu_from_lengths(lengths_k),
            int(lengths_q.max()), int(lengths_k.max()), **options,
        )  # fmt: skip
        padded = out.new_zeros(batch_size, len_q, n_heads_q, head_dim)
        padded[mask_q] = out
        return padded, None

    if kwargs.get("cu_seq_lens_q") is not None:
        layout = _layout_from_kwargs(kwargs, batch_size)
    elif len_q == len_k and kwargs.get("position_ids") is not None:
        layout = _layout_from_position_ids(kwargs["position_ids"], batch_size)
    else:
        layout = _rows_layout(batch_size, len_q, len_k, query.device)
    out = varlen_attention(
        q.reshape(batch_size * len_q, n_heads_q, head_dim),
        k.reshape(batch_size * len_k, -1, head_dim),
        v.reshape(batch_size * len_k, -1, head_dim),
        *layout,
        **options,
    )
    return out.view(batch_size, len_q, n_heads_q, head_dim), None


def padding_only_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """transformers mask function: None, or the 2-D (B, kv_length) bool padding mask when it has padding.

    Causality and document boundaries are not encoded in a mask: the attention function applies them.
    """
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    return None if bool(attention_mask.all()) else attention_mask


# ----------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------


def register() -> None:
    """Register ATTENTION_NAME with transformers' AttentionInterface and AttentionMaskInterface (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, varlen_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, padding_only_mask)


def patch(model, *, liger: bool = True):
    """register(), switch an instantiated model to packed attention and, on CUDA, apply Liger-Kernel.

    Attention: equivalent to loading with `attn_implementation=ATTENTION_NAME` after `register()`.
    Liger-Kernel (when `liger` and installed): its RMSNorm, SwiGLU MLP and RoPE for the model's
    architecture (`_apply_liger_kernel_to_instance`), not its cross-entropy (fastmath's fused linear
    cross-entropy takes the loss). Its kernels are Triton on CUDA, so a model whose parameters are not on
    a CUDA device keeps PyTorch's modules (a logged note): move the model to the GPU before patching.
    Liger swaps RoPE and the module classes for the whole architecture in this process, not only for
    this model. Returns the model.
    """
    if isinstance(model, type):
        raise ValueError(
            "patch() takes a model instance; to load a class with packed attention call register() and pass "
            f"attn_implementation={ATTENTION_NAME!r} to from_pretrained / from_config"
        )
    register()
    model.set_attn_implementation(ATTENTION_NAME)
    if liger:
        _apply_liger(model)
    return model


def _is_cuda_model(model) -> bool:
    return any(p.is_cuda for p in model.parameters())


def _apply_liger(model) -> None:
    if not _is_cuda_model(model):
        logger.info("kernels.hf.patch: model not on CUDA, Liger-Kernel skipped (RMSNorm / SwiGLU / RoPE stay PyTorch)")
        return
    if liger_import_problem() is not None:
        logger.warning("kernels.hf.patch: liger-kernel is not installed; RMSNorm / SwiGLU / RoPE stay PyTorch")
        return
    apply_liger(model)


def liger_import_problem() -> str | None:
    """None when Liger-Kernel's transformers patches import, else why not (one line)."""
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError as err:
        return f"liger_kernel does not import ({err})"
    return None


def apply_liger(model) -> None:
    """Liger-Kernel's RMSNorm, SwiGLU MLP and RoPE on this model, wherever its parameters are now (the trainer
    applies it before moving or sharding the model onto the GPU); not Liger's losses: fastmath's fused linear
    cross-entropy takes the loss. `patch` calls this for a CUDA model."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(
        model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )
