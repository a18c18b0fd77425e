"""Run in a subprocess by tests/test_rollout.py (vLLM binds threads and keeps global state: keep it out of
the pytest process). Prints one JSON line with what the test asserts.

    python tests/workers/rollout_sync.py <model_dir>
"""
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from fastmath.data import Formatter  # noqa: E402
from fastmath.model import load_causal_lm, load_tokenizer  # noqa: E402
from fastmath.policy import PolicyWithGRPOLoss, Sequence, gathered_weights, pack_sequences  # noqa: E402
from fastmath.rollout import Sampling, VLLMGenerator  # noqa: E402


def main(model_dir: str) -> None:
    tok = load_tokenizer(model_dir)
    fmt = Formatter(tok)
    prompts = [fmt.prompt_ids(p) for p in ("What is 12 + 30?", "Solve 3x + 1 = 10.", "Compute 7 * 8.")]
    gen = VLLMGenerator(model_dir, max_model_len=256, seed=0, gpu_memory_utilization=0.1, cpu_kv_cache_gib=1,
                        enforce_eager=True)

    # 1. Sampled-token log-probs from vLLM equal the trainer's (temperature 0.7, processed log-probs).
    torch.manual_seed(0)
    lm = load_causal_lm(model_dir, "fastmath_varlen")
    policy = PolicyWithGRPOLoss(lm, temperature=0.7, loss_options={})
    (group,) = gen.generate(prompts[:1], Sampling(temperature=0.7, max_tokens=24, seed=1), 2)
    seqs = [Sequence(prompts[0], c.token_ids, c.logprobs, 0.0, True) for c in group]
    (batch,) = pack_sequences(seqs, 1024)
    with torch.no_grad():
        trainer_lp, _ = policy(batch, mode="logprobs")
    logprob_diff = (trainer_lp - batch.sampler_logprobs).abs().max().item()
    logprob_scale = max(1.0, trainer_lp.abs().max().item())
    config = lm.config
    model_width = max(config.hidden_size, config.intermediate_size, config.vocab_size, int(batch.mask.numel()))

    # 2. Update the weights (as an optimizer step would), sync in place, greedy outputs match HF generate.
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(0.02 * torch.randn_like(p))
    gen.load_weights(gathered_weights(lm, bucket_bytes=64 * 1024))  # small buckets: many per model
    greedy = gen.generate(prompts, Sampling(temperature=0.0, max_tokens=40), 1)
    hf = load_causal_lm(model_dir, "sdpa")
    hf.load_state_dict(lm.state_dict())
    same = []
    for p, (c,) in zip(prompts, greedy):
        out = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=40, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        same.append(out == list(c.token_ids))
    print(json.dumps({"logprob_max_abs_diff": logprob_diff, "n_logprobs": int(batch.mask.numel()),
                      "logprob_scale": logprob_scale, "width": model_width, "layers": config.num_hidden_layers,
                      "greedy_equal": same, "start_seconds": gen.start_seconds}))


if __name__ == "__main__":
    main(sys.argv[1])
