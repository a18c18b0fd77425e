"""Greedy accuracy on held-out problems: the quick check printed in the SFT summary.

Not the paper's evaluation (pass@1 over 64 samples at token budgets, with vLLM): that is `eval.py`'s
job. This decodes each prompt once, greedily, with HF `generate`, reads the last `\\boxed{}` and
compares it to the gold answer, and counts the completion's tokens up to its eos.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from fastmath.synthetic import answers_match, extract_boxed


@torch.no_grad()
def greedy_accuracy(causal_lm, tokenizer, formatter, rows: list[dict], max_new_tokens: int,
                    batch_size: int, device: torch.device, progress: bool = False) -> dict:
    """{"accuracy", "mean_tokens", "truncated", "n"} over `rows` (each with `problem` and `answer`)."""
    was_training = causal_lm.training
    causal_lm.eval()
    pad_id = tokenizer.pad_token_id
    eos_id = tokenizer.eos_token_id
    correct, tokens, truncated = 0, 0, 0
    batches = range(0, len(rows), batch_size)
    for start in tqdm(batches, desc="greedy eval", disable=not progress, leave=False):
        chunk = rows[start:start + batch_size]
        prompts = [formatter.prompt_ids(row["problem"]) for row in chunk]
        width = max(len(p) for p in prompts)
        # Left padding, so every prompt ends where generation starts.
        input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = causal_lm.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id)
        for row, completion in zip(chunk, out[:, width:].tolist()):
            if eos_id in completion:
                completion = completion[: completion.index(eos_id)]
            else:
                truncated += 1
            tokens += len(completion)
            text = tokenizer.decode(completion, skip_special_tokens=True)
            correct += answers_match(extract_boxed(text), row["answer"])
    causal_lm.train(was_training)
    n = len(rows)
    return {"accuracy": correct / n if n else 0.0, "mean_tokens": tokens / n if n else 0.0,
            "truncated": truncated, "n": n}
