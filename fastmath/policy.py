"""The GRPO policy side: sampled sequences packed padding-free, the model wrapper that turns a packed row into
per-token log-probs or the GRPO loss (never the [tokens, vocab] logits), and the bucketed weight gather
that feeds the generator after every optimizer step.

A sampled sequence is prompt + completion. In a packed row only the completion tokens are predicted (the
targets of prompt positions are IGNORE_INDEX), so the decoder's hidden states at the positions whose target
is set are exactly the completion tokens, in order, sequence by sequence: the wrapper selects those rows
(N x d, cheap) and hands them with the lm_head weight to `kernels.grpo`. Per-token side inputs (old /
reference / sampler log-probs, the loss mask) are flat [N] tensors in the same order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from fastmath.config import GRPOConfig
from fastmath.packing import IGNORE_INDEX, PackedBatch, best_fit_decreasing, collate_packed
from fastmath.sharded_load import plain_name
from kernels.grpo import fused_linear_grpo_loss, fused_linear_logprobs


@dataclass
class Sequence:
    """One sampled completion with everything the update needs."""

    prompt_ids: list[int]
    completion_ids: list[int]
    sampler_logprobs: list[float] | None
    advantage: float
    counted: bool  # False: kept out of the loss (masked truncation, or an empty completion)


@dataclass
class UpdateBatch:
    """One packed row of sequences plus its flat per-completion-token tensors."""

    packed: PackedBatch
    seq_ids: torch.Tensor        # [N] local sequence index 0..S-1 of each completion token
    advantages: torch.Tensor     # [S]
    mask: torch.Tensor           # [N] bool
    sampler_logprobs: torch.Tensor | None  # [N] or None
    num_sequences: int
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    # [N] int64: the packed row's positions whose target is a completion token, found on the host when the row
    # is built, so selecting their hidden states has a known size (a boolean mask would make the device report
    # its count back to the host every micro-batch, and cannot run on the memory planner's fake tensors).
    completion_positions: torch.Tensor | None = None

    def to(self, device):
        def move(t):
            return None if t is None else t.to(device)

        return UpdateBatch(self.packed.to(device), move(self.seq_ids), move(self.advantages), move(self.mask),
                           move(self.sampler_logprobs), self.num_sequences, move(self.old_logprobs),
                           move(self.ref_logprobs), move(self.completion_positions))


def pack_sequences(seqs: list[Sequence], budget: int, per_row: int = 0) -> list[UpdateBatch]:
    """Best-fit-decreasing into rows of `budget` tokens; or, with per_row > 0, exactly per_row sequences per row
    taken in order of length (the last row holds the rest), as the seed's trainer forms its micro-batches of 2
    from length-sorted completions. Each row becomes one UpdateBatch."""
    lengths = [len(s.prompt_ids) + len(s.completion_ids) for s in seqs]
    if per_row:
        order = sorted(range(len(seqs)), key=lengths.__getitem__)
        rows = [order[i:i + per_row] for i in range(0, len(order), per_row)]
    else:
        rows = best_fit_decreasing(lengths, budget)
    batches = []
    for row in rows:
        row.sort()  # keep sampling order inside a row (deterministic, and easy to read when debugging)
        docs, seq_ids, mask, sampler, advantages = [], [], [], [], []
        for local, i in enumerate(row):
            s = seqs[i]
            docs.append((s.prompt_ids + s.completion_ids, [False] * len(s.prompt_ids) + [True] * len(s.completion_ids)))
            seq_ids += [local] * len(s.completion_ids)
            mask += [s.counted] * len(s.completion_ids)
            sampler += s.sampler_logprobs if s.sampler_logprobs is not None else [0.0] * len(s.completion_ids)
            advantages.append(s.advantage)
        have_sampler = all(seqs[i].sampler_logprobs is not None for i in row)
        packed = collate_packed(docs)
        batches.append(UpdateBatch(
            packed=packed,
            seq_ids=torch.tensor(seq_ids, dtype=torch.long),
            advantages=torch.tensor(advantages, dtype=torch.float32),
            mask=torch.tensor(mask, dtype=torch.bool),
            sampler_logprobs=torch.tensor(sampler, dtype=torch.float32) if have_sampler else None,
            num_sequences=len(row),
            completion_positions=(packed.targets.flatten() != IGNORE_INDEX).nonzero().squeeze(1)))
    return batches


def empty_update_batch(pad_id: int) -> UpdateBatch:
    """A row with one fully masked one-token completion: keeps ranks in lockstep (FSDP collectives)."""
    (batch,) = pack_sequences([Sequence([pad_id], [pad_id], [0.0], 0.0, False)], budget=2)
    return batch


def grpo_loss_options(grpo: GRPOConfig) -> dict:
    """The GRPO loss's options (keyword arguments of `kernels.grpo.fused_linear_grpo_loss`) from the config's grpo
    section: grpo.loss, and the completion length dr_grpo normalises by."""
    loss = grpo.loss
    return dict(beta=loss.beta, epsilon_low=loss.epsilon_low, epsilon_high=loss.epsilon_high, loss_type=loss.loss_type,
                importance_sampling_level=loss.importance_sampling_level,
                max_completion_length=grpo.rollout.max_completion_length)


class PolicyWithGRPOLoss(nn.Module):
    """Packed row -> completion-token log-probs, or the GRPO loss and its stats (the FSDP root)."""

    def __init__(self, causal_lm: nn.Module, temperature: float, loss_options: dict, chunk_bytes: int | None = None):
        super().__init__()
        self.causal_lm = causal_lm
        self.temperature = temperature
        self.loss_options = loss_options
        self.chunk_bytes = chunk_bytes  # the LM-head chunks' logits budget (None: the kernels' default)

    def _completion_hidden(self, packed: PackedBatch, positions: torch.Tensor | None = None):
        decoder = self.causal_lm.get_decoder()
        cu = packed.cu_seqlens
        hidden = decoder(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
                         cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=packed.max_seqlen,
                         max_length_k=packed.max_seqlen).last_hidden_state.flatten(0, 1)
        targets = packed.targets.flatten()
        keep = (targets != IGNORE_INDEX).nonzero().squeeze(1) if positions is None else positions
        weight = self.causal_lm.get_output_embeddings().weight
        hidden = hidden.index_select(0, keep)
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):  # the head matmuls in the autocast dtype, as in SFT
            dtype = torch.get_autocast_dtype(device_type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        return hidden, weight, targets.index_select(0, keep)

    def forward(self, batch: UpdateBatch, mode: str = "loss", num_items_in_batch=None, num_sequences=None,
                importance_weights=None):
        hidden, weight, targets = self._completion_hidden(batch.packed, batch.completion_positions)
        if mode == "logprobs":
            logprobs, entropy = fused_linear_logprobs(hidden, weight, targets, temperature=self.temperature,
                                                      return_entropy=True, chunk_bytes=self.chunk_bytes)
            return logprobs, entropy
        return fused_linear_grpo_loss(
            hidden, weight, targets, batch.old_logprobs, batch.advantages, batch.seq_ids, mask=batch.mask,
            ref_logprobs=batch.ref_logprobs, importance_weights=importance_weights,
            num_items_in_batch=num_items_in_batch, num_sequences=num_sequences, temperature=self.temperature,
            chunk_bytes=self.chunk_bytes, **self.loss_options)


# ---------------------------------------------------------------------------------------------
# Weight sync: full tensors out of FSDP shards, one all-gather per bucket


def gathered_weights(causal_lm: nn.Module, bucket_bytes: int, dtype: torch.dtype | None = None
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for every entry of the model's state dict, gathered a bucket at a time.

    Under FSDP2 each parameter is a DTensor sharded on dim 0 into world_size chunks of ceil(rows / W) rows
    (the last chunks may be short or empty). A bucket packs every rank's local chunks, each padded to the
    full chunk size, into one flat buffer; one `all_gather_into_tensor` then gives every rank every chunk,
    and each full tensor is the concatenation of its chunks cut to its row count. Bytes moved per rank per
    bucket: (W - 1) / W * bucket, the minimum for an all-gather; one collective instead of one per tensor.
    Tensors are cast to `dtype` (the generator's) before the gather, halving the traffic for bf16.
    Every rank must iterate this to the end (it is collective).
    """
    state = causal_lm.state_dict()
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in state.items():
        bucket.append((plain_name(name), tensor))
        size += tensor.numel() * (tensor.element_size() if dtype is None else torch.finfo(dtype).bits // 8)
        if size >= bucket_bytes:
            yield from _gather_bucket(bucket, dtype)
            bucket, size = [], 0
    if bucket:
        yield from _gather_bucket(bucket, dtype)


def _gather_bucket(bucket, dtype):
    sharded = [(n, t) for n, t in bucket if hasattr(t, "to_local")]
    for name, tensor in bucket:
        if not hasattr(tensor, "to_local"):
            yield name, tensor.detach().to(dtype or tensor.dtype)
    if not sharded:
        return
    if any(t.device_mesh.ndim > 1 for _, t in sharded):
        # HSDP (parallel.replicate > 1): shards live on the mesh's inner dimension only; DTensor's own gather over
        # that group, tensor by tensor (more collectives than one flat bucket, the same bytes).
        for name, tensor in sharded:
            yield name, tensor.detach().to(dtype or tensor.dtype).full_tensor()
        return
    world = dist.get_world_size()
    pieces, layout = [], []
    for name, tensor in sharded:
        rows = tensor.shape[0]
        chunk_rows = -(-rows // world)
        inner = math.prod(tensor.shape[1:])  # from the global shape: indexing a DTensor would communicate
        local = tensor.to_local().detach().to(dtype or tensor.dtype).reshape(-1)
        padded = torch.zeros(chunk_rows * inner, dtype=local.dtype, device=local.device)
        padded[:local.numel()] = local
        pieces.append(padded)
        layout.append((name, tuple(tensor.shape), rows * inner, chunk_rows * inner))
    flat = torch.cat(pieces)
    out = torch.empty(world * flat.numel(), dtype=flat.dtype, device=flat.device)
    dist.all_gather_into_tensor(out, flat)
    out = out.view(world, -1)
    offset = 0
    for name, shape, numel, chunk in layout:
        full = out[:, offset:offset + chunk].reshape(-1)[:numel]  # rank chunks in order, padding cut
        yield name, full.reshape(shape)
        offset += chunk
