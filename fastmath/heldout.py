"""The held-out check of every training stage: greedy accuracy and completion length on held-out problems.

One measurement with one engine, so "after SFT" and "before GRPO" (the same exported model) give the same
figures: the model saved at a path is loaded with plain transformers on the main rank, each prompt is decoded
once, greedily, with HF `generate` in batches of `heldout.batch_size`, the answer is checked with math-verify
(`fastmath.answers`) on the judged text (the reasoning opening the prompt pre-fills, if any, plus the completion:
`Formatter.judged`), and the completion's tokens are counted up to its eos. The other ranks wait. Prompts use
data.system_prompt / data.user_prefix in every stage, so the before and after figures stay one measurement.

Not the paper's evaluation (pass@1 over k samples at token budgets, with vLLM): that is the eval stage's job.
The problems come from the embedded data (`heldout.split`), so the check applies to the embedded default only.
"""
from __future__ import annotations

import json

import torch
from tqdm import tqdm

from fastmath.answers import AnswerChecker
from fastmath.config import Config
from fastmath.data import Formatter, prompt_settings
from fastmath.distributed import DistInfo, barrier
from fastmath.model import load_causal_lm, load_tokenizer


def heldout_rows(config: Config) -> list[dict]:
    """The first heldout.num_problems rows of the embedded data's heldout.split file."""
    from fastmath.embedded import ensure_embedded_assets

    data_dir = ensure_embedded_assets(config.run.cache_dir or None).data_dir
    with open(data_dir / f"{config.heldout.split}.jsonl", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    return rows[: config.heldout.num_problems]


def heldout_accuracy(model_path: str, config: Config, dist_info: DistInfo) -> dict | None:
    """{"accuracy", "mean_tokens", "truncated", "n", "answer_timeouts", "answer_errors"} of the model at
    `model_path` on the main rank, None on the others (every rank must call this)."""
    result = None
    if dist_info.is_main:
        rows = heldout_rows(config)
        _, tokens, truncated, verdicts = judged_completions(model_path, config, rows, dist_info.device)
        correct = sum(bool(v.correct) for v in verdicts)
        n = len(rows)
        # Undecided checks score as wrong; counted here so a slow checker cannot pass for a worse model.
        undecided = {status: sum(v.status == status for v in verdicts) for status in ("timeout", "error")}
        result = {"accuracy": correct / n if n else 0.0, "mean_tokens": sum(tokens) / n if n else 0.0,
                  "truncated": truncated, "n": n, "answer_timeouts": undecided["timeout"],
                  "answer_errors": undecided["error"]}
    barrier()
    return result


def judged_completions(model_path: str, config: Config, rows: list[dict], device: torch.device):
    """(texts, token counts, how many hit heldout.max_new_tokens, math-verify verdicts) of the model at
    `model_path` on `rows`: greedy decoding, answers judged on the text the prompt's opening completes."""
    tokenizer = load_tokenizer(model_path, config.model.trust_remote_code)
    formatter = Formatter(tokenizer, config.data.prompt_field, **prompt_settings(config, "heldout"))
    model = load_causal_lm(model_path, "sdpa", config.model.trust_remote_code).to(device)
    texts, tokens, truncated = greedy_completions(model, tokenizer, formatter, [r["problem"] for r in rows],
                                                  config.heldout.max_new_tokens, config.heldout.batch_size, device)
    del model
    with AnswerChecker(1, config.heldout.answer_timeout_s) as checker:
        verdicts = checker.check([formatter.judged(t) for t in texts], [str(r["answer"]) for r in rows])
    return texts, tokens, truncated, verdicts


@torch.no_grad()
def greedy_completions(causal_lm, tokenizer, formatter: Formatter, problems: list[str], max_new_tokens: int,
                       batch_size: int, device: torch.device) -> tuple[list[str], list[int], int]:
    """Each problem decoded greedily: (texts, token counts up to eos, how many hit max_new_tokens)."""
    causal_lm.eval()
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    texts, tokens, truncated = [], [], 0
    for start in tqdm(range(0, len(problems), batch_size), desc="held-out check", leave=False):
        prompts = [formatter.prompt_ids(p) for p in problems[start:start + batch_size]]
        width = max(len(p) for p in prompts)
        # Left padding, so every prompt ends where generation starts.
        input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = causal_lm.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id)
        for completion in out[:, width:].tolist():
            if eos_id in completion:
                completion = completion[: completion.index(eos_id)]
            else:
                truncated += 1
            tokens.append(len(completion))
            texts.append(tokenizer.decode(completion, skip_special_tokens=True))
    return texts, tokens, truncated
