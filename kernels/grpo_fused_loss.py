"""From final hidden states to the GRPO loss in one chunked pass (`fused_linear_grpo_loss`): the log-probs of
kernels/grpo_logprobs.py and the loss of kernels/grpo_policy_loss.py, never the full [N, V] logits.

Once old log-probs, advantages and normalisers are known, d loss / d logp_t is a function of the token's own
logp_t (token level), so each chunk of rows computes its logits (cuBLAS), the row log-sum-exp, entropy and logp
(Triton, one program per row), the token terms (Triton), and overwrites the logits with
d loss / d x_t = (d loss / d logp_t)(onehot - softmax)/T, then d hidden (rows) = dlogits @ weight and
d weight += dlogits^T @ hidden (fp32 accumulator): the gradients exist when the forward returns; backward only
multiplies by grad_output. Sequence level (GSPO) needs every token's logp before any ratio is known: pass 1
computes logp and the log-sum-exp of every row (no gradients), then the per-sequence ratios, then pass 2
recomputes the logits chunk by chunk and writes the gradients (one vocabulary pass per row instead of two: the
log-sum-exp is kept from pass 1).

FLOPs: logits 2NdV, d hidden 2NdV, d weight 2NdV: 6NdV at token level, 8NdV at sequence level (logits twice).
Memory: as kernels/grpo_logprobs.py, plus O(N) per-token vectors (d loss / d logp, 5 stats terms) and O(S) per
sequence.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from kernels import grpo_logprobs, grpo_policy_loss
from kernels.chunking import accumulate_chunk_grads, default_chunk_size
from kernels.dispatch import use_triton
from kernels.grpo_inputs import (
    LossInputs,
    LossOptions,
    check_linear_inputs,
    check_loss_inputs,
    check_values,
    compute_dtype,
    loss_options,
)
from kernels.grpo_logprobs import (
    ChunkLoop,
    fp16_gradient_scale,
    grad_pass,
    linear_logprobs_reference,
    logprob_pass,
    rescaled,
    row_dlogits,
    row_logprobs,
)
from kernels.grpo_policy_loss import (
    GRPOStats,
    grpo_loss_reference,
    scaled,
    sequence_inputs,
    token_inputs,
    token_terms,
)


# ----------------------------------------------------------------------------------------------------
# PyTorch reference (the definition)
# ----------------------------------------------------------------------------------------------------


def linear_grpo_loss_reference(
    hidden, weight, targets, old_logprobs, advantages, seq_ids, *, temperature=1.0, **loss_kwargs
):
    """Unchunked definition of `fused_linear_grpo_loss`: full logits in the compute dtype (fp32; float64 for
    float64 inputs), `linear_logprobs_reference`, then `grpo_loss_reference` (same keyword arguments), plus the
    entropy sum over masked tokens."""
    logp, entropy = linear_logprobs_reference(hidden, weight, targets, temperature=temperature, return_entropy=True)
    entropies = entropy if loss_kwargs.get("entropy_coef") else None
    loss, stats = grpo_loss_reference(logp, old_logprobs, advantages, seq_ids, entropies=entropies, **loss_kwargs)
    mask = loss_kwargs.get("mask")
    m = torch.ones_like(entropy) if mask is None else mask.to(entropy.dtype)
    return loss, stats._replace(entropy_sum=(entropy * m).sum().detach())


# ----------------------------------------------------------------------------------------------------
# The two level passes (both backends)
# ----------------------------------------------------------------------------------------------------


def _token_level_pass(hidden, weight, targets, tok, opts: LossOptions, chunk, need, use_triton):
    """Token-level fused GRPO: one pass; each chunk's logits become its gradient while live.

    Returns (entropy [N], terms [5, N], d hidden, d weight accumulator), in the compute dtype."""
    n, inv_t, write_grad = hidden.shape[0], 1.0 / opts.temperature, any(need)
    loop = ChunkLoop(hidden, weight, chunk, use_triton)
    grad_hidden, grad_weight_acc = loop.grad_buffers(weight, need)
    dtype = compute_dtype(hidden)
    entropy = torch.empty(n, dtype=dtype, device=hidden.device)
    terms = torch.empty(5, n, dtype=dtype, device=hidden.device)
    for rows, logits, scratch in loop:
        logp, m, log_s, entropy[rows], numerators = row_logprobs(logits, targets[rows], inv_t, True, use_triton,
                                                                 scratch)
        part = tok.rows(rows)
        dlogp, terms[:, rows] = token_terms(logp, part, None, None, opts, write_grad, use_triton)
        if write_grad:
            ent = None if part.ent_coef is None else (part.ent_coef, entropy[rows])
            dlogits = row_dlogits(logits, targets[rows], (logp, m, log_s), dlogp, inv_t, use_triton, numerators, ent)
            accumulate_chunk_grads(dlogits, hidden[rows].to(loop.dtype), loop.w, rows, grad_hidden, grad_weight_acc)
    return entropy, terms, grad_hidden, grad_weight_acc


def _sequence_level_pass(hidden, weight, targets, tok, opts: LossOptions, chunk, need, use_triton):
    """Sequence-level (GSPO) fused GRPO: pass 1 row statistics, then ratios, then pass 2 gradients."""
    inv_t = 1.0 / opts.temperature
    logp, m, log_s, entropy = logprob_pass(hidden, weight, targets, inv_t, chunk, True, use_triton)
    seq_lr, seq_w = sequence_inputs(logp, tok)
    dlogp, terms = token_terms(logp, tok, seq_lr, seq_w, opts, any(need), use_triton)
    grads = (None, None)
    if any(need):
        ent = None if tok.ent_coef is None else (tok.ent_coef, entropy)
        grads = grad_pass(hidden, weight, targets, (logp, m, log_s), dlogp, inv_t, chunk, need, use_triton, ent)
    return entropy, terms, *grads


# ----------------------------------------------------------------------------------------------------
# autograd Function and public function
# ----------------------------------------------------------------------------------------------------


class _LinearGRPOLoss(torch.autograd.Function):
    """Fused GRPO loss: gradients computed in the forward; backward scales them by the scalar grad_output."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, tok, opts, chunk, need, use_triton):
        level_pass = _token_level_pass if opts.level == "token" else _sequence_level_pass
        # fp16 dlogits: the normalisers' 1/N taken out (grpo_logprobs.fp16_gradient_scale), put back in backward.
        ctx.factor = fp16_gradient_scale(tok.coef, hidden.dtype, use_triton) if any(need) else None
        run_tok = tok if ctx.factor is None else replace(
            tok, coef=tok.coef / ctx.factor, ent_coef=None if tok.ent_coef is None else tok.ent_coef / ctx.factor)
        with torch.autocast(hidden.device.type, enabled=False):
            entropy, terms, grad_hidden, grad_weight_acc = level_pass(
                hidden, weight, targets, run_tok, opts, chunk, need, use_triton
            )
        ctx.save_for_backward(grad_hidden, grad_weight_acc)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        sums = torch.cat([terms[1:].sum(dim=1), torch.where(tok.mask != 0, entropy, 0.0).sum().unsqueeze(0)])
        ctx.mark_non_differentiable(sums)
        loss = terms[0].sum()
        if run_tok.ent_coef is not None:  # the entropy bonus, -entropy_coef * masked mean of H
            loss = loss + (run_tok.ent_coef * entropy).sum()
        return loss if ctx.factor is None else loss * ctx.factor, sums

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_sums):
        if ctx.factor is not None:
            factor = grad_loss.to(torch.float32) * ctx.factor
            grads = (rescaled(g, factor, dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes))
        else:
            grads = (scaled(g, grad_loss, dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes))
        return (*grads, None, None, None, None, None, None)


# Interpreted or compiled is fixed at import (kernels.dispatch): the kernels this path launches.
KERNELS_INTERPRETED = grpo_logprobs.KERNELS_INTERPRETED and grpo_policy_loss.KERNELS_INTERPRETED


def _use_triton(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> bool:
    return use_triton(backend, device, KERNELS_INTERPRETED, "kernels.grpo_fused_loss", dtype)


def fused_linear_grpo_loss(hidden, weight, targets, old_logprobs, advantages, seq_ids, *, mask=None,
                           ref_logprobs=None, beta=0.0, epsilon_low=0.2, epsilon_high=0.2, loss_type="dapo",
                           importance_sampling_level="token", max_completion_length=None, num_items_in_batch=None,
                           num_sequences=None, importance_weights=None, temperature=1.0, chunk_size=None,
                           backend="auto", chunk_bytes=None, delta=None, use_bias_correction_kl=False,
                           sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, entropy_coef=0.0):
    """From final hidden states to the GRPO loss in one chunked pass (module docstring).

    hidden [N, d], weight [V, d] (same float dtype), targets [N] (the sampled token ids), temperature,
    chunk_size and chunk_bytes as in `fused_linear_logprobs`; every other argument as in `grpo_loss` (a
    Liger-style drop-in signature: internally the options travel as one `LossOptions` and the tensors as one
    `LossInputs`).
    Gradients for hidden and weight are computed during the forward (backward only scales them). Token level:
    6NdV FLOPs, one pass; sequence level: 8NdV, two passes.

    Dtypes: the policy of every kernel function (the `kernels` package docstring), for hidden / weight and every
    float side input; logits in the input dtype (Triton) or fp32 (PyTorch); float64 end to end when hidden is
    float64 (side inputs are converted to the compute dtype).

    Returns (loss, GRPOStats, entropy_sum included): fp32 (float64 for float64 hidden). Value checks (targets,
    seq_ids, mask) run on CPU tensors only: no host sync on an accelerator (kernels/grpo_inputs.py).
    """
    opts = loss_options(beta, epsilon_low, epsilon_high, loss_type, importance_sampling_level, max_completion_length,
                        temperature, delta, use_bias_correction_kl, sapo_temperature_pos, sapo_temperature_neg,
                        entropy_coef)
    inputs = LossInputs(old_logprobs, advantages, seq_ids, mask, ref_logprobs, importance_weights,
                        num_items_in_batch, num_sequences)
    triton_path = _use_triton(backend, hidden.device, hidden.dtype)
    name, n, device = "fused_linear_grpo_loss", hidden.shape[0], hidden.device
    checks = check_linear_inputs(name, hidden, weight, targets, chunk_size, triton_path, chunk_bytes)
    check_values(checks + check_loss_inputs(name, n, device, inputs, opts, triton_path))
    chunk = chunk_size or default_chunk_size(n, weight.shape[0], triton_path, hidden.element_size(), chunk_bytes)
    tok = token_inputs(n, device, inputs, opts, compute_dtype(hidden))
    need = tuple(torch.is_grad_enabled() and t.requires_grad for t in (hidden, weight))
    loss, sums = _LinearGRPOLoss.apply(hidden, weight, targets.long().contiguous(), tok, opts, chunk, need,
                                       triton_path)
    return loss, GRPOStats(tok.mask.sum(), *sums.unbind(0))
