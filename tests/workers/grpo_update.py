"""One GRPO update on fixed sequences, run under torchrun by tests/test_grpo.py (1 vs 2 processes).

Every rank builds the same 12 sequences and takes its share (rank r: sequences r, r + W, ...), so the
packed rows differ between world sizes while the step's loss (normalised over the global step) must not.
Writes <out>/grads_rank<r>.pt (the full gradient of the step's loss, before any optimizer step),
<out>/stepped_rank<r>.pt (the full gradient the first optimizer step of `update_policy` used: clipped, at
grpo.grad_clip=0.05 below the step's gradient norm so that clipping acts), <out>/result.json (loss, grad norm,
stats) and <out>/weights_rank<r>.pt (the weights gathered with `gathered_weights`, as each rank sees them after
the update).

    torchrun --nproc_per_node=N tests/workers/grpo_update.py <model_dir> <out_dir> [grpo.key=value ...]
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from fastmath.config import load_config  # noqa: E402
from fastmath.distributed import all_reduce_sum, barrier, init_distributed, shutdown  # noqa: E402
from fastmath.grpo_stage import attach_logprobs, build_update_batches, update_policy, update_settings  # noqa: E402
from fastmath.model import load_causal_lm, load_tokenizer, parallelize  # noqa: E402
from fastmath.policy import PolicyWithGRPOLoss, Sequence, gathered_weights, grpo_loss_options  # noqa: E402
from fastmath.stage import build_optimizer, micro_batches, optim_settings  # noqa: E402


def fixed_sequences(tokenizer) -> list[Sequence]:
    gen = torch.Generator().manual_seed(0)
    seqs = []
    for i in range(12):
        prompt = tokenizer(f"Compute {i} + {2 * i}.", add_special_tokens=False)["input_ids"]
        length = int(torch.randint(3, 20, (1,), generator=gen))
        completion = torch.randint(3, len(tokenizer), (length,), generator=gen).tolist()
        sampler = (-3.0 + 0.3 * torch.randn(length, generator=gen)).tolist()
        seqs.append(Sequence(prompt, completion, sampler, float(torch.randn((), generator=gen)), counted=i != 5))
    return seqs


def main(model_dir: str, out_dir: str, overrides: list[str]) -> None:
    info = init_distributed()
    config = load_config(None, ["grpo.max_steps=1", "grpo.lr=1e-3", "grpo.grad_clip=0.05", *overrides])
    g = config.grpo
    torch.manual_seed(0)
    tok = load_tokenizer(model_dir)
    lm = load_causal_lm(model_dir, "fastmath_varlen")
    model = parallelize(PolicyWithGRPOLoss(lm, g.rollout.temperature, grpo_loss_options(g)), info.world_size,
                        info.device, False, False, False, replicate=config.parallel.replicate)
    optimizer = build_optimizer(model, optim_settings(config, "grpo"))
    seqs = fixed_sequences(tok)[info.rank::info.world_size]
    batches, _, counts = build_update_batches(seqs, budget=96, pad_id=tok.pad_token_id, device=info.device)
    tokens, n_seqs = counts.tokens, counts.sequences
    weights = attach_logprobs(model, None, batches, g, lambda: torch.autocast("cpu", enabled=False))
    # The raw gradient of the step first (Adam would hide a wrong gradient scale), then the real update.
    for micro, b in micro_batches(model, batches, config.parallel.gradient_sync):
        loss, _ = model(b, num_items_in_batch=tokens, num_sequences=n_seqs, importance_weights=weights[micro])
        (loss * info.world_size).backward()
    grads = {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for name, p in model.named_parameters()}
    torch.save(grads, Path(out_dir) / f"grads_rank{info.rank}.pt")
    optimizer.zero_grad(set_to_none=True)
    names = {id(p): name for name, p in model.named_parameters()}  # the sharded parameters, as the optimizer holds
    # As in the stage, the no-grad pass runs right before the update: under FSDP2 it leaves the root's parameters
    # (embeddings, final norm) gathered, which swaps other tensors in as the module's registered parameters.
    weights = attach_logprobs(model, None, batches, g, lambda: torch.autocast("cpu", enabled=False))
    stepped = {}

    def keep_stepped_gradient(opt, args, kwargs):
        if not stepped:  # the first optimizer step only (num_iterations may take more)
            for group in opt.param_groups:
                for p in group["params"]:
                    stepped[names[id(p)]] = (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()

    optimizer.register_step_pre_hook(keep_stepped_gradient)
    settings = update_settings(config, optim_settings(config, "grpo"), g.max_steps, info.world_size,
                               lambda: torch.autocast("cpu", enabled=False))
    result = update_policy(model, optimizer, batches, weights, counts, settings, 0)
    full = {name: t.clone() for name, t in gathered_weights(lm, bucket_bytes=32 * 1024)}
    out = Path(out_dir)
    torch.save(stepped, out / f"stepped_rank{info.rank}.pt")
    torch.save(full, out / f"weights_rank{info.rank}.pt")
    summed = all_reduce_sum(result.stats.stacked().tolist(), info.device)
    if info.is_main:
        (out / "result.json").write_text(json.dumps({"loss": result.loss, "grad_norm": float(result.grad_norm),
                                                     "skipped": result.skipped, "stats": summed,
                                                     "tokens": tokens, "sequences": n_seqs}))
    barrier()  # both ranks done before either tears its group down (see fastmath/train.py)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
