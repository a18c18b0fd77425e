"""Log-probs of the sampled tokens under the LM head, without the [N, V] logits (`fused_linear_logprobs`), and
the chunk loop the fused GRPO loss (kernels/grpo_fused_loss.py) shares.

Per token t with x_t = hidden_t @ weight.T:
    z_t = x_t / T,  lse_t = logsumexp(z_t),  logp_t = z_t[y_t] - lse_t,  H_t = -sum_v p_tv log p_tv
    d logp_t / d x_t = (onehot(y_t) - softmax(z_t)) / T

FLOPs: 2NdV forward and 6NdV backward (the logits recomputed: the backward's grad_output is a vector known only
then). Elementwise work is O(NV) and memory-bound: the row kernels read each chunk's logits twice and write them
once (3 * chunk * V * b bytes, b = 2 for bf16), against 6 * chunk * d * V matmul FLOPs.

Memory (the reason this exists): full logits are N * V * b bytes (16k tokens at V = 152k: 4.6 GiB in bf16),
and eager autograd keeps several such buffers (an fp32 copy, the log-softmax, their gradients). Here:
    Triton path:  one chunk of logits, chunk * V * b bytes, overwritten by its gradient (default: rows that fit
                  512 MiB, a multiple of 128: 1,664 rows at V = 152k bf16);
    PyTorch path: two chunk-sized buffers in the compute dtype (fp32; float64 for float64 inputs), reused
                  across chunks: the logits (worked over in place) and the softmax numerators, which become the
                  gradient (default: rows that fit 64 MiB each), plus a compute-dtype copy of a 16-bit weight;
    both:         a d weight accumulator in the compute dtype (V * d * 4 bytes), plus O(N) per-token vectors.

Numerics: the row kernels run in log2 units (z2 = z log2 e, so exp2 / log2 are the hardware instructions), with
one fp32 online pass giving the max, sum and the entropy sum h = sum 2^(z2 - m) (z2 - m) <= 0 (rescaled like the
sum when the max moves; H = ln 2 (log2 s - h / s) has no cancellation against the max). Logits are rounded to
the input dtype once on the Triton path (as HF eager), kept in the compute dtype on the PyTorch path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.chunking import (
    MAX_BLOCK_V, accumulate_chunk_grads, default_chunk_size, logits_buffer, row_tile, weight_grad_accumulator,
)
from kernels.dispatch import all_interpreted, launching, use_triton
from kernels.grpo_inputs import check_linear_inputs, check_temperature, check_values, compute_dtype

# The row kernels' largest vocabulary tile (kernels.chunking.row_tile picks the tile and warps from V under it).
_MAX_BLOCK_V = MAX_BLOCK_V
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _logprob_rows_kernel(
    # Pointers
    logits_ptr,  # [n_rows, n_cols] raw logits x, fp16 / bf16 / fp32 (read only)
    targets_ptr,  # [n_rows] int64
    logp_ptr,  # [n_rows] fp32 out
    m2_ptr,  # [n_rows] fp32 out: max of z2 = z log2 e
    log2_s_ptr,  # [n_rows] fp32 out: log2 sum 2^(z2 - m2); log-sum-exp = (m2 + log2 s) ln 2
    entropy_ptr,  # [n_rows] fp32 out (ENTROPY)
    # Sizes and strides
    n_cols,
    logits_row_stride,
    # Scalars
    scale,  # log2(e) / temperature
    # Compile-time switches
    ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per row: one online pass over the vocabulary for log-sum-exp, log p(target) and entropy."""
    # int64: row * row_stride passes 2^31 for more than 2 G logits (14k rows at V = 152k).
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    target = tl.load(targets_ptr + row)
    # An out-of-range target (not checked on accelerators: kernels/grpo_inputs.py) reads nothing and gives a
    # NaN log-prob, which reaches the loss.
    target_ok = (target >= 0) & (target < n_cols)
    z2_target = tl.load(row_ptr + target, mask=target_ok, other=0.0).to(tl.float32) * scale
    # The running max starts at the target's logit (a finite lower bound), so no -inf - -inf appears.
    m2 = z2_target
    s = 0.0
    h = 0.0  # sum 2^(z2 - m2) (z2 - m2), for the entropy
    for start in range(0, n_cols, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        ok = offs < n_cols
        z2 = tl.load(row_ptr + offs, mask=ok, other=0.0).to(tl.float32) * scale
        m2_new = tl.maximum(m2, tl.max(tl.where(ok, z2, float("-inf")), axis=0))
        alpha = tl.exp2(m2 - m2_new)
        dz = tl.where(ok, z2 - m2_new, 0.0)
        p = tl.where(ok, tl.exp2(dz), 0.0)
        if ENTROPY:
            h = alpha * (h + s * (m2 - m2_new)) + tl.sum(p * dz, axis=0)
        s = s * alpha + tl.sum(p, axis=0)
        m2 = m2_new
    log2_s = tl.log2(s)
    tl.store(m2_ptr + row, m2)
    tl.store(log2_s_ptr + row, log2_s)
    # log_softmax's order, (z_y - m) - log s: exact-ish when the target is the max.
    tl.store(logp_ptr + row, tl.where(target_ok, ((z2_target - m2) - log2_s) * _LN2, float("nan")))
    if ENTROPY:
        tl.store(entropy_ptr + row, (log2_s - h / s) * _LN2)


@triton.jit
def _logprob_grad_rows_kernel(
    # Pointers
    logits_ptr,  # [n_rows, n_cols] raw logits, overwritten with coef * d logp / d x
    targets_ptr,  # [n_rows] int64
    m2_ptr,  # [n_rows] fp32, from _logprob_rows_kernel
    log2_s_ptr,  # [n_rows] fp32, from _logprob_rows_kernel
    coef_ptr,  # [n_rows] fp32: d loss / d logp of the row
    entropy_ptr,  # [n_rows] fp32: the row's entropy H (ENTROPY_GRAD)
    ent_coef_ptr,  # [n_rows] fp32: d loss / d H of the row (ENTROPY_GRAD)
    # Sizes and strides
    n_cols,
    logits_row_stride,
    # Scalars
    scale,  # log2(e) / temperature
    inv_temperature,
    # Compile-time switches
    ENTROPY_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per row, one pass: x <- coef (onehot(y) - softmax(x / T)) / T, in fp32, rounded once; with
    ENTROPY_GRAD also + ent_coef d H / d x = -ent_coef p (log p + H) / T."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    target = tl.load(targets_ptr + row)
    m2 = tl.load(m2_ptr + row)
    log2_s = tl.load(log2_s_ptr + row)
    coef = tl.load(coef_ptr + row) * inv_temperature
    if ENTROPY_GRAD:
        ent_coef = tl.load(ent_coef_ptr + row) * inv_temperature
        h = tl.load(entropy_ptr + row)
    for start in range(0, n_cols, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        ok = offs < n_cols
        x = tl.load(row_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        log2_p = (x * scale - m2) - log2_s  # (z2 - m) first: exact-ish near the max, like log_softmax
        p = tl.exp2(log2_p)
        grad = (tl.where(offs == target, 1.0, 0.0) - p) * coef
        if ENTROPY_GRAD:
            grad -= ent_coef * p * (log2_p * _LN2 + h)
        tl.store(row_ptr + offs, grad.to(row_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------------
# PyTorch reference (the definition)
# ----------------------------------------------------------------------------------------------------


def linear_logprobs_reference(hidden, weight, targets, *, temperature=1.0, return_entropy=False):
    """Unchunked definition on full [N, V] logits in the compute dtype (fp32; float64 for float64 inputs: the
    tests' truth); same arguments and result as `fused_linear_logprobs` (here the entropy is differentiable)."""
    check_values(check_linear_inputs("linear_logprobs_reference", hidden, weight, targets, None, triton=False))
    check_temperature(temperature)
    dtype = compute_dtype(hidden)
    logq = torch.log_softmax((hidden.to(dtype) @ weight.to(dtype).T) / temperature, dim=1)
    logp = logq.gather(1, targets.long().unsqueeze(1)).squeeze(1)
    if not return_entropy:
        return logp
    return logp, -(logq.exp() * logq).sum(1)


# ----------------------------------------------------------------------------------------------------
# One chunk of rows: PyTorch steps and Triton launchers
# ----------------------------------------------------------------------------------------------------


def row_logprobs(logits, targets, inv_t, entropy, use_triton, scratch=None):
    """Row statistics of one chunk of raw logits [c, V]: (logp, m, log s, entropy or None) [c], and the softmax
    numerators.

    Triton: fp32, m and log s in log2 units, the logits left intact, numerators None. PyTorch: the logits' dtype
    (the compute dtype), natural units, the logits overwritten (with (z - m), then (z - m) exp(z - m) for the
    entropy), and numerators = exp(z - m) [c, V] (written into `scratch` when given; `row_dlogits(...,
    numerators=...)` turns them into the gradient in place): one exp pass serves the sum, the entropy and the
    gradient.
    """
    c, v = logits.shape
    if use_triton:
        logp, m2, log2_s, ent = (torch.empty(c, dtype=torch.float32, device=logits.device) for _ in range(4))
        if c:
            block, warps = row_tile(v, _MAX_BLOCK_V)
            if launching():  # not inside the memory planner's simulation (kernels.dispatch)
                _logprob_rows_kernel[(c,)](
                    logits, targets, logp, m2, log2_s, ent, v, logits.stride(0), _LOG2E.value * inv_t,
                    ENTROPY=entropy, BLOCK_V=block, num_warps=warps,
                )
        return logp, m2, log2_s, ent if entropy else None, None
    z = logits.mul_(inv_t) if inv_t != 1.0 else logits
    m = z.amax(dim=1, keepdim=True)
    shifted = z.sub_(m)
    numerators = shifted.exp() if scratch is None else torch.exp(shifted, out=scratch)
    s = numerators.sum(dim=1)
    log_s = s.log()
    # log_softmax's order, (z_y - m) - log s: exact-ish when the target is the max.
    logp = shifted.gather(1, targets.unsqueeze(1)).squeeze(1) - log_s
    ent = None
    if entropy:  # H = log s - sum_v e_v (z_v - m) / s, the Triton kernel's form; the logits are spent here
        ent = log_s - shifted.mul_(numerators).sum(dim=1) / s
    return logp, m.squeeze(1), log_s, ent, numerators


def row_dlogits(logits, targets, row_stats, coef, inv_t, use_triton, numerators=None, entropy_grad=None):
    """coef_t * d logp_t / d x_t = coef_t (onehot - softmax) / T for one chunk, written in place and returned;
    entropy_grad = (ent_coef [c], entropy [c]) adds ent_coef_t d H_t / d x_t = -ent_coef_t p (log p + H_t) / T
    (the fused GRPO loss's entropy bonus; the PyTorch path then holds one more [c, V] temporary).

    row_stats: (logp, m, log s) of these rows from `row_logprobs` (same path); coef: [c] in the compute dtype.
    Triton: over the raw logits. PyTorch: over `numerators` from `row_logprobs` when given, else over the raw
    logits (which become exp(z - m) first).
    """
    logp, m, log_s = row_stats
    c, v = logits.shape
    if use_triton:
        if c:
            block, warps = row_tile(v, _MAX_BLOCK_V)
            ent_coef, entropy = entropy_grad if entropy_grad is not None else (coef, coef)
            if launching():  # not inside the memory planner's simulation (kernels.dispatch)
                _logprob_grad_rows_kernel[(c,)](
                    logits, targets, m, log_s, coef, entropy, ent_coef, v, logits.stride(0), _LOG2E.value * inv_t, inv_t,
                    ENTROPY_GRAD=entropy_grad is not None, BLOCK_V=block, num_warps=warps,
                )
        return logits
    if numerators is None:
        numerators = logits.mul_(inv_t).sub_(m.unsqueeze(1)).exp_()
    entropy_term = None
    if entropy_grad is not None:  # -(e / T) p (log p + H), with p log p = 0 at p = 0
        ent_coef, entropy = entropy_grad
        p = numerators * torch.exp(-log_s).unsqueeze(1)
        entropy_term = (torch.special.xlogy(p, p) + p * entropy.unsqueeze(1)).mul_((-ent_coef * inv_t).unsqueeze(1))
    g = (coef * inv_t).unsqueeze(1)
    grad = numerators.mul_(-g * torch.exp(-log_s).unsqueeze(1))  # -g softmax
    # The target entry as (1 - p) = -expm1(logp): no cancellation when p -> 1.
    grad.scatter_(1, targets.unsqueeze(1), -torch.expm1(logp).unsqueeze(1) * g)
    return grad if entropy_term is None else grad.add_(entropy_term)


def fp16_gradient_scale(coef, dtype, use_triton):
    """The fp32 factor taken out of the coefficients d loss / d logp before the row kernels write
    coef (onehot - softmax) / T into fp16 dlogits, or None where none is needed.

    A token mean over N tokens puts 1/N into every coefficient, and at N = 16k coef * p (p ~ 1/V) falls below
    fp16's smallest normal (6e-5) for most of a large vocabulary, and below its smallest subnormal (6e-8) for
    the rare entries, whose gradient is then lost. Divided by the largest |coef| the coefficients are at most 1
    and the dlogits as well scaled as a sum's; the caller multiplies the results back in fp32 (`rescaled`).
    bf16 (fp32's exponent range), fp32, and the PyTorch path (fp32 logits) need no factor."""
    if not use_triton or dtype != torch.float16 or coef.numel() == 0:
        return None
    top = coef.detach().abs().amax().to(torch.float32)
    # All-zero or non-finite coefficients: factor 1 (zeros stay zeros; NaN / inf reach the gradient as before).
    return torch.where(torch.isfinite(top) & (top > 0), top, torch.ones_like(top))


def rescaled(grad, factor, dtype):
    """grad (fp16 d hidden or the fp32 d weight accumulator) times an fp32 factor, multiplied in fp32 and rounded
    once into dtype; None passes through."""
    return None if grad is None else (grad.to(torch.float32) * factor).to(dtype)


# ----------------------------------------------------------------------------------------------------
# The chunk loops (both paths)
# ----------------------------------------------------------------------------------------------------


class ChunkLoop:
    """The chunks of rows and the matmul that makes their logits [c, V] into one reused buffer: in the input
    dtype (Triton), or in the compute dtype from a compute-dtype copy of the weight (PyTorch). The PyTorch path
    also gets a reused scratch buffer of the same shape (`scratch`, for the softmax numerators): reusing both,
    rather than allocating per chunk, saves the page faults of fresh large allocations on CPU."""

    def __init__(self, hidden, weight, chunk, use_triton, scratch=True):
        self.hidden, self.use_triton, self.n, self.chunk = hidden, use_triton, hidden.shape[0], chunk
        self.dtype = hidden.dtype if use_triton else compute_dtype(hidden)
        self.w = weight if use_triton else weight.to(self.dtype)
        shape = (min(chunk, self.n), weight.shape[0])
        # Triton: rows padded to 16 elements, so the row kernels' loads stay vectorised for any V.
        self.buf = logits_buffer(hidden, *shape) if use_triton else hidden.new_empty(shape, dtype=self.dtype)
        self.scratch = hidden.new_empty(shape, dtype=self.dtype) if scratch and not use_triton else None

    def __iter__(self):
        """Yields (rows, logits, scratch or None), views of the reused buffers."""
        for start in range(0, self.n, self.chunk):
            rows = slice(start, min(start + self.chunk, self.n))
            c = rows.stop - start
            h = self.hidden[rows].to(self.dtype)
            yield rows, torch.mm(h, self.w.T, out=self.buf[:c]), None if self.scratch is None else self.scratch[:c]

    def grad_buffers(self, weight, need):
        """(d hidden in hidden's dtype, d weight accumulator in the compute dtype), None where not needed."""
        need_h, need_w = need
        return (torch.empty_like(self.hidden) if need_h else None,
                weight_grad_accumulator(weight, compute_dtype(weight), self.n) if need_w else None)


def logprob_pass(hidden, weight, targets, inv_t, chunk, entropy, use_triton):
    """Row statistics of every row, no gradients: (logp, m, log s, entropy or None) [N] in the compute dtype."""
    dtype = compute_dtype(hidden)
    out = [torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device) for _ in range(4)]
    for rows, logits, scratch in ChunkLoop(hidden, weight, chunk, use_triton):
        for buf, value in zip(out, row_logprobs(logits, targets[rows], inv_t, entropy, use_triton, scratch)[:4]):
            if value is not None:
                buf[rows] = value
    return (*out[:3], out[3] if entropy else None)


def grad_pass(hidden, weight, targets, row_stats, coef, inv_t, chunk, need, use_triton, entropy_grad=None):
    """Gradients of sum_t coef_t logp_t (+ sum_t ent_coef_t H_t with entropy_grad = (ent_coef, entropy), [N]) for
    hidden and weight, the logits recomputed chunk by chunk."""
    loop = ChunkLoop(hidden, weight, chunk, use_triton, scratch=False)
    grad_hidden, grad_weight_acc = loop.grad_buffers(weight, need)
    for rows, logits, _ in loop:
        stats = tuple(t[rows] for t in row_stats)
        ent = None if entropy_grad is None else tuple(t[rows] for t in entropy_grad)
        dlogits = row_dlogits(logits, targets[rows], stats, coef[rows], inv_t, use_triton, entropy_grad=ent)
        accumulate_chunk_grads(dlogits, hidden[rows].to(loop.dtype), loop.w, rows, grad_hidden, grad_weight_acc)
    return grad_hidden, grad_weight_acc


# ----------------------------------------------------------------------------------------------------
# autograd Function and public function
# ----------------------------------------------------------------------------------------------------


class _LinearLogprobs(torch.autograd.Function):
    """Chunked log-probs (and entropy, no gradient); backward recomputes the logits chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_t, chunk, entropy, use_triton):
        with torch.autocast(hidden.device.type, enabled=False):
            logp, m, log_s, ent = logprob_pass(hidden, weight, targets, inv_t, chunk, entropy, use_triton)
        ctx.save_for_backward(hidden, weight, targets, logp, m, log_s)
        ctx.inv_t, ctx.chunk, ctx.use_triton = inv_t, chunk, use_triton
        ent = logp.new_empty(0) if ent is None else ent
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, targets, *row_stats = ctx.saved_tensors
        need = ctx.needs_input_grad[:2]
        coef = grad_logp.to(row_stats[0].dtype).contiguous()
        factor = fp16_gradient_scale(coef, hidden.dtype, ctx.use_triton)
        with torch.autocast(hidden.device.type, enabled=False):
            grad_hidden, grad_weight_acc = grad_pass(
                hidden, weight, targets, row_stats, coef if factor is None else coef / factor, ctx.inv_t,
                ctx.chunk, need, ctx.use_triton,
            )
        if factor is not None:
            return (rescaled(grad_hidden, factor, hidden.dtype), rescaled(grad_weight_acc, factor, weight.dtype),
                    None, None, None, None, None)  # fmt: skip
        grad_weight = None if grad_weight_acc is None else grad_weight_acc.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


# Interpreted or compiled is fixed at import (kernels.dispatch): this module's kernels and tl.max / tl.sum.
KERNELS_INTERPRETED = all_interpreted(_logprob_rows_kernel, _logprob_grad_rows_kernel)


def _use_triton(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> bool:
    return use_triton(backend, device, KERNELS_INTERPRETED, "kernels.grpo_logprobs", dtype)


def fused_linear_logprobs(hidden, weight, targets, *, temperature=1.0, return_entropy=False, chunk_size=None,
                          backend="auto", chunk_bytes=None):
    """Log-probs of `targets` under softmax(hidden @ weight.T / temperature), without the [N, V] logits.

    Args:
        hidden: [N, d] final hidden states; weight: [V, d] LM head, same dtype.
        targets: [N] integer token ids in [0, V).
        temperature: T > 0 (the sampling temperature: log-probs of the distribution the tokens came from).
        return_entropy: also return each row's entropy ([N], no gradient).
        chunk_size: rows per chunk; default: rows whose logits fit 512 MiB (Triton, input dtype, multiple of
            128) or 64 MiB (PyTorch, fp32).
        backend: "auto" | "triton" | "reference".
        chunk_bytes: that logits budget instead of the default (not with chunk_size; kernels/chunking.py).

    Dtypes: the policy of every kernel function (the `kernels` package docstring); logits in the input dtype
    (Triton) or fp32 (PyTorch).

    Returns logprobs [N], or (logprobs, entropy): fp32 (float64 for float64 inputs). Gradients flow to hidden
    and weight (accumulated in fp32 or float64, rounded into their dtype); backward recomputes the logits one
    chunk at a time (8NdV FLOPs in all). Value checks of `targets` run on CPU tensors only (no host sync on an
    accelerator; kernels/grpo_inputs.py).
    """
    use_triton_path = _use_triton(backend, hidden.device, hidden.dtype)
    check_values(check_linear_inputs("fused_linear_logprobs", hidden, weight, targets, chunk_size, use_triton_path,
                                     chunk_bytes))
    check_temperature(temperature)
    n, v = hidden.shape[0], weight.shape[0]
    chunk = chunk_size or default_chunk_size(n, v, use_triton_path, hidden.element_size(), chunk_bytes)
    logp, entropy = _LinearLogprobs.apply(
        hidden, weight, targets.long().contiguous(), 1.0 / temperature, chunk, return_entropy, use_triton_path
    )
    return (logp, entropy) if return_entropy else logp
