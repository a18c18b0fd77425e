"""The seed recipe's settings beside fastmath's shipped configs, one row per setting: docs/fidelity.md's Fidelity table.

The seed is the Fast-Math-R1 repository (analokmaus/kaggle-aimo2-fast-math-r1; arXiv:2507.08267). Each value in
the `seed` column was read from its code: experiments/train_first_stage.py (SFT: TRL 0.15 SFTTrainer, 8 GPUs,
DeepSpeed ZeRO-3), experiments/train_second_stage.py (GRPO: its FastGRPOTrainer from finetune/openr1_mod, 8 GPUs,
ZeRO-2), finetune/grpo_rewards.py, experiments/train_fast_qwen3_14b.py (TRL 0.17 GRPOTrainer, 4 training GPUs)
and experiments/train_fast_nemotron_14b.py (FastGRPOTrainer), with HF TrainingArguments' defaults where a script
sets nothing; the eval protocol from its README (inference example and the pass@1 tables).

A row whose `key` names a config field is a claim that every config of its recipe sets `value` there;
tests/test_fidelity.py checks each claim and that docs/fidelity.md holds `fidelity_markdown()`. The qwen3 and nemotron
recipes list only what differs from the grpo recipe; every other grpo row must hold in their configs too.
"""
from __future__ import annotations

from dataclasses import dataclass

CONFIGS = {
    "sft": "configs/fast_math_r1_14b_sft.yaml",
    "grpo": "configs/fast_math_r1_14b_grpo.yaml",
    "qwen3": "configs/fast_qwen3_14b_grpo.yaml",
    "nemotron": "configs/fast_nemotron_14b_grpo.yaml",
    "eval": "configs/aime_eval.yaml",
}
# Recipes that are the grpo recipe with some rows replaced.
INHERITS = {"qwen3": "grpo", "nemotron": "grpo"}

SFT_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{{}}."
GRPO_SYSTEM = ("You are a helpful and harmless assistant. You are Qwen developed by Alibaba. You should think "
               "step-by-step. Return final answer within \\boxed{{}}.")
BRACES = ("the seed's Python literal is never formatted, so its models saw `{{}}`; kept for exactness")

# The seed's SFT data make 39 optimizer steps per epoch (its packed 24,000-token rows, 64 per step; the count the
# issue tracker's comparison with the seed found). The 20-epoch cosine then spans 780 steps, and checkpoint-350 is
# 350 / 39 = 8.97 epochs in (the end of epoch 9) with the rate at 0.5 * (1 + cos(pi * 350 / 780)) = 0.58 of peak.
SEED_SFT_STEPS_PER_EPOCH = 39

OPTIMIZER = ("bitsandbytes' 8-bit AdamW cannot update FSDP2's sharded parameters (bitsandbytes issue #1633), so "
             "the multi-GPU configs keep torch AdamW: fp32 moments instead of 8-bit blockwise ones (14 GB per GPU "
             "for 14B on 8 GPUs); optim.name=adamw_8bit is the seed's in a one-process run")


@dataclass(frozen=True)
class Row:
    recipe: str       # a CONFIGS key
    setting: str      # what is set
    seed: str         # the seed's value, as its code has it
    key: str | None   # the fastmath config key (None: no key; `value` then says what fastmath does)
    value: object     # what the recipe's config sets at `key` (checked), or the text of what fastmath does
    why: str = ""     # for a deliberate difference: why


ROWS = [
    # -- SFT (train_first_stage.py) -----------------------------------------------------------------------------
    Row("sft", "base model", "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", "model.name_or_path",
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B"),
    Row("sft", "data", "RabotniKuma/Fast-Math-R1-SFT, split train", "data.train", "RabotniKuma/Fast-Math-R1-SFT"),
    Row("sft", "prompt field", "problem", "data.prompt_field", "problem"),
    Row("sft", "target field", "generation (the R1 trace)", "data.solution_field", "generation"),
    Row("sft", "chat template", "custom `<|system|>` / `<|user|>` / `<|assistant|>` turns, each ending in eos",
        "data.chat_template", "fast_math_r1_sft"),
    Row("sft", "system prompt", SFT_SYSTEM, "data.system_prompt", SFT_SYSTEM, BRACES),
    Row("sft", "max length", "max_seq_length 24000", "data.max_length", 24000,
        "longer traces are dropped and counted (the seed's packing cut them across rows)"),
    Row("sft", "packing", "TRL 0.15 packing: all examples concatenated and cut into 24000-token rows; attention "
        "crosses documents", "sft.tokens_per_micro_batch", 24000,
        "rows are packed padding-free with position ids restarting per document and varlen attention: no token "
        "attends to another document and none is cut, so each example trains as it would alone"),
    Row("sft", "loss tokens", "every token (system, user, assistant)", "data.loss_on", "completion",
        "the model should learn to write solutions, not problems; data.loss_on=all gives the seed's"),
    Row("sft", "eos loss", "none: TRL's collator sets the labels of every pad token to -100, and R1-Distill's pad "
        "token is its eos", "data.mask_pad_tokens", True),
    Row("sft", "BOS", "one, from the tokenizer's config (add_bos_token: true) when TRL encodes each rendered example",
        "data.bos", "tokenizer"),
    Row("sft", "batch", "1 row per GPU x 8 accumulation x 8 GPUs = 64 rows per step", "sft.global_batch", 64),
    Row("sft", "learning rate", "1e-5", "sft.lr", 1e-5),
    Row("sft", "schedule", "cosine over num_train_epochs = 20", "sft.schedule_epochs", 20.0),
    Row("sft", "stop", "checkpoint-350 (the GRPO stage starts there): at 39 steps per epoch, the end of epoch 9 "
        "(8.97 epochs), the rate 0.58 of its peak", "sft.max_steps", 350,
        "steps count fastmath's packed rows, which hold fewer tokens than the seed's cut rows (no document is "
        "split), so 350 steps see slightly fewer tokens"),
    Row("sft", "epochs", "20", "sft.epochs", 20),
    Row("sft", "warmup", "none (TrainingArguments: warmup_ratio 0, warmup_steps 0)", "sft.warmup_ratio", 0.0),
    Row("sft", "lr floor", "0 (HF's cosine ends at 0)", "sft.min_lr_ratio", 0.0),
    Row("sft", "optimizer", "paged_adamw_8bit", "optim.name", "adamw", OPTIMIZER),
    Row("sft", "adam beta1", "0.9 (default)", "optim.adam_beta1", 0.9),
    Row("sft", "adam beta2", "0.999 (default)", "optim.adam_beta2", 0.999),
    Row("sft", "adam epsilon", "1e-8 (default)", "optim.adam_eps", 1e-8),
    Row("sft", "weight decay", "0.0 (default)", "optim.weight_decay", 0.0),
    Row("sft", "gradient clip", "max_grad_norm 1.0 (default)", "optim.grad_clip", 1.0),
    Row("sft", "precision", "bf16", "model.precision", "auto", "auto is bf16 autocast on CUDA"),
    Row("sft", "gradient checkpointing", "on", "model.activation_checkpointing", True),
    Row("sft", "attention", "flash_attention_2", "model.attn_implementation", "fastmath_varlen",
        "the same exact attention, fastmath's own varlen kernel (flash_attention_2 is accepted too)"),
    Row("sft", "checkpoints", "every 50 steps", "checkpoint.save_every", 50),
    Row("sft", "checkpoints kept", "1 (save_total_limit)", "checkpoint.keep", 1),
    Row("sft", "validation", "none", "data.validation", ""),
    Row("sft", "seed", "2025", "run.seed", 2025),
    # -- GRPO (train_second_stage.py, FastGRPOTrainer, grpo_rewards.py) ----------------------------------------
    Row("grpo", "start", "ft_models/train_first_stage/checkpoint-350", "grpo.init_from",
        "runs/fast_math_r1_14b_sft/hf", "the SFT stage's export, made at its step 350"),
    Row("grpo", "prompts", "RabotniKuma/Fast-Math-R1-GRPO, split train", "grpo.prompts",
        "RabotniKuma/Fast-Math-R1-GRPO"),
    Row("grpo", "gold answer field", "answer", "grpo.answer_field", "answer"),
    Row("grpo", "chat template", "the SFT template, saved with the SFT checkpoint", "data.chat_template",
        "fast_math_r1_sft"),
    Row("grpo", "system prompt", GRPO_SYSTEM, "grpo.rollout.system_prompt", GRPO_SYSTEM, BRACES),
    Row("grpo", "rewards", "format_reward2, cosine, len_reward (no accuracy reward: correctness enters through "
        "cosine and length)", "grpo.reward.rewards", ["format", "cosine", "length"]),
    Row("grpo", "reward weights", "all 1.0 (reward_weights unset)", "grpo.reward.reward_weights", [1.0, 1.0, 1.0]),
    Row("grpo", "format rule", "`^.*?oxed{(.*?)}.*?</think>.*?$`: a box before `</think>`", "grpo.reward.format_rule",
        "box_before_think_end"),
    Row("grpo", "length unit", "characters of the decoded completion (cosine and length)", "grpo.reward.length_unit",
        "chars"),
    Row("grpo", "cosine max_len", "30000, clip_len=True", "grpo.reward.cosine_max_length", 30000),
    Row("grpo", "cosine, correct", "1.0 at length 0 -> 0.1 at max_len", "grpo.reward.cosine_correct", [1.0, 0.1]),
    Row("grpo", "cosine, wrong", "-1.0 at length 0 -> -0.1 at max_len (min/max_value_wrong swapped in the "
        "formula)", "grpo.reward.cosine_wrong", [-1.0, -0.1]),
    Row("grpo", "length reward span", "Kimi k1.5 min/max over the 16 completions one rank scores (2 prompts)",
        "grpo.reward.length_span", "rank_batch"),
    Row("grpo", "answer check", "math-verify over the whole completion: boxed first, then any anchored LaTeX answer; "
        "nits and malformed_operators off", "grpo.reward.answer_check", "seed_parse"),
    Row("grpo", "BOS", "one, from the tokenizer's config, when vLLM encodes the rendered prompt", "data.bos",
        "tokenizer"),
    Row("grpo", "unparseable gold answer", "scores 1.0 in every reward that checks answers", None,
        "the prompt is dropped at load and counted", "a reward that every completion earns teaches nothing"),
    Row("grpo", "generations per prompt", "8", "grpo.rollout.num_generations", 8),
    Row("grpo", "prompts per step", "2 per rank (2 x 8 accumulation / 8 generations) x 8 ranks = 16",
        "grpo.prompts_per_step", 16),
    Row("grpo", "max prompt length", "512 tokens; longer prompts cut from the left for training",
        "grpo.rollout.max_prompt_length", 512, "longer prompts are skipped and counted rather than trained headless"),
    Row("grpo", "max completion length", "16384 (vLLM's max_model_len 16384 also caps prompt + completion)",
        "grpo.rollout.max_completion_length", 16384, "the prompt does not eat into the completion's 16384 tokens"),
    Row("grpo", "temperature", "1.0", "grpo.rollout.temperature", 1.0),
    Row("grpo", "top_p", "0.9", "grpo.rollout.top_p", 0.9),
    Row("grpo", "min_p", "0.05", "grpo.rollout.min_p", 0.05),
    Row("grpo", "top_k", "none (its SamplingParams set none)", "grpo.rollout.top_k", 0),
    Row("grpo", "KL beta", "0.04", "grpo.loss.beta", 0.04),
    Row("grpo", "clip epsilon (low)", "0.2", "grpo.loss.epsilon_low", 0.2),
    Row("grpo", "clip epsilon (high)", "0.2 (one epsilon)", "grpo.loss.epsilon_high", 0.2),
    Row("grpo", "iterations per batch", "1", "grpo.loss.num_iterations", 1),
    Row("grpo", "advantages", "(r - group mean) / (group std + 1e-4)", "grpo.loss.scale_rewards", "group"),
    Row("grpo", "loss normaliser", "token mean of each micro-batch of 2 completions, averaged over 8 accumulation "
        "steps and 8 ranks", "grpo.loss.loss_type", "bnpo"),
    Row("grpo", "completions per micro-batch", "2, in order of prompt + completion length",
        "grpo.loss.completions_per_micro_batch", 2),
    Row("grpo", "update row budget", "(padded micro-batches of 2)", "grpo.tokens_per_micro_batch", 33792,
        "2 x (512 + 16384): room for two completions of the longest kind"),
    Row("grpo", "sampler importance correction", "none", "grpo.loss.vllm_is_correction", False),
    Row("grpo", "truncated completions", "kept in the loss", "grpo.loss.mask_truncated", False),
    Row("grpo", "learning rate", "4e-6", "grpo.lr", 4e-6),
    Row("grpo", "schedule", "cosine over total_steps_per_device = floor(prompt rows / 16): one pass",
        "grpo.schedule_steps", -1, "rows counted after unusable prompts are dropped"),
    Row("grpo", "warmup", "none", "grpo.warmup_ratio", 0.0),
    Row("grpo", "lr floor", "0", "grpo.min_lr_ratio", 0.0),
    Row("grpo", "stop", "MAX_STEPS = 40 (FastGRPOTrainer's loop ignores it; the published curves end at step 50)",
        "grpo.max_steps", 40),
    Row("grpo", "optimizer", "paged_adamw_8bit", "optim.name", "adamw", OPTIMIZER),
    Row("grpo", "adam beta2", "0.999 (default)", "optim.adam_beta2", 0.999),
    Row("grpo", "weight decay", "0.0 (default)", "optim.weight_decay", 0.0),
    Row("grpo", "gradient clip", "1.0 (DeepSpeed's, from max_grad_norm)", "optim.grad_clip", 1.0),
    Row("grpo", "checkpoints", "every 5 steps, 2 kept", "grpo.save_every", 5),
    Row("grpo", "checkpoints kept", "2", "checkpoint.keep", 2),
    Row("grpo", "seed", "2025", "run.seed", 2025),
    Row("grpo", "rollouts", "vLLM colocated, tensor parallel 4, enforce_eager",
        "grpo.rollout.vllm_tensor_parallel_size", 4,
        "CUDA graphs kept (grpo.rollout.vllm_enforce_eager: false): throughput only; sampling settings are the same"),
    # -- GRPO-only on Qwen3-14B (train_fast_qwen3_14b.py, TRL 0.17 GRPOTrainer): what differs from grpo ---------
    Row("qwen3", "start", "Qwen/Qwen3-14B", "grpo.init_from", "Qwen/Qwen3-14B"),
    Row("qwen3", "chat template", "Qwen3's own", "data.chat_template", "model"),
    Row("qwen3", "max completion length", "24000", "grpo.rollout.max_completion_length", 24000),
    Row("qwen3", "cosine max_len", "48000, clipped", "grpo.reward.cosine_max_length", 48000),
    Row("qwen3", "prompts per step", "2 per rank x 8 accumulation x 4 ranks / 8 generations = 8",
        "grpo.prompts_per_step", 8),
    Row("qwen3", "temperature", "0.9 (TRL 0.17's default)", "grpo.rollout.temperature", 0.9),
    Row("qwen3", "top_p", "1.0 (default)", "grpo.rollout.top_p", 1.0),
    Row("qwen3", "min_p", "none (default)", "grpo.rollout.min_p", 0.0),
    Row("qwen3", "top_k", "50 (TRL 0.17's default, passed to vLLM)", "grpo.rollout.top_k", 50),
    Row("qwen3", "length reward span", "min/max over the 2 completions of one rank's micro-batch (TRL 0.17 scores "
        "each micro-batch alone)", "grpo.reward.length_span", "group",
        "a 2-completion span is noise; the group of 8 is Kimi's definition (rank_batch is the same 8 here)"),
    Row("qwen3", "loss normaliser", "TRL 0.17 bnpo (its default): micro-batches of 2 in sampling order",
        "grpo.loss.loss_type", "bnpo", "fastmath's micro-batches of 2 are taken in length order"),
    Row("qwen3", "update row budget", "(padded micro-batches of 2)", "grpo.tokens_per_micro_batch", 49024,
        "2 x (512 + 24000)"),
    Row("qwen3", "schedule", "cosine over max_steps (TRL's Trainer honours max_steps)", "grpo.schedule_steps", 0),
    Row("qwen3", "stop", "50", "grpo.max_steps", 50),
    Row("qwen3", "checkpoints", "every 10 steps, 2 kept", "grpo.save_every", 10),
    # -- GRPO-only on OpenMath-Nemotron-14B (train_fast_nemotron_14b.py, FastGRPOTrainer) -----------------------
    Row("nemotron", "start", "nvidia/OpenMath-Nemotron-14B", "grpo.init_from", "nvidia/OpenMath-Nemotron-14B"),
    Row("nemotron", "chat template", "the model's own", "data.chat_template", "model"),
    Row("nemotron", "max completion length", "24000 (vLLM's max_model_len 24000 caps prompt + completion)",
        "grpo.rollout.max_completion_length", 24000),
    Row("nemotron", "cosine max_len", "48000, clipped", "grpo.reward.cosine_max_length", 48000),
    Row("nemotron", "update row budget", "(padded micro-batches of 2)", "grpo.tokens_per_micro_batch", 49024,
        "2 x (512 + 24000)"),
    Row("nemotron", "stop", "MAX_STEPS = 50 (ignored by FastGRPOTrainer's loop, as in stage 2)", "grpo.max_steps",
        50),
    Row("nemotron", "checkpoints", "every 10 steps, 2 kept", "grpo.save_every", 10),
    # -- Evaluation (the seed's README: inference example and pass@1 tables) -----------------------------------
    Row("eval", "samples per problem", "64 (pass@1 averaged over 64)", "eval.samples", 64),
    Row("eval", "token budgets", "8000, 12000, 16000, 24000, 32000", "eval.budgets",
        [8000, 12000, 16000, 24000, 32000]),
    Row("eval", "temperature", "1.0", "eval.temperature", 1.0),
    Row("eval", "top_p", "0.9", "eval.top_p", 0.9),
    Row("eval", "min_p", "0.05", "eval.min_p", 0.05),
    Row("eval", "top_k", "none", "eval.top_k", 0),
    Row("eval", "BOS", "vLLM encodes the rendered prompt with the tokenizer's special tokens", "data.bos",
        "tokenizer"),
    Row("eval", "stop", "`</think>` in the inference example ('for even faster inference'); the tables do not "
        "say", "eval.stop", [], "off by default so answers after `</think>` count; eval.stop=['</think>'] for "
        "the early stop"),
    Row("eval", "user prefix", "'Solve the problem, and put the answer in \\boxed{{}}. ' (in its Python literal "
        "`\\b` is a backspace)", "eval.user_prefix", "Solve the problem, and put the answer in \\boxed{}. ",
        "the text the example means"),
    Row("eval", "system prompt", "none", "eval.system_prompt", ""),
    Row("eval", "chat template", "the model's own (saved with the export)", "data.chat_template", "model"),
    Row("eval", "benchmark split", "AIME 2024 / 2025 sets", "eval.benchmark_split", "auto",
        "auto takes test, else train (hub AIME sets ship only train)"),
]


def recipe_rows(recipe: str) -> list[Row]:
    """The rows a recipe's config must satisfy: its own, then its parent's rows for keys it does not replace."""
    own = [row for row in ROWS if row.recipe == recipe]
    parent = INHERITS.get(recipe)
    if parent is None:
        return own
    replaced = {row.key for row in own if row.key}
    return own + [row for row in ROWS if row.recipe == parent and row.key not in replaced]


def _cell(value: object) -> str:
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, list):
        text = "[" + ", ".join(_cell(v).strip("`") for v in value) + "]"
    elif isinstance(value, str):
        text = value if value else "''"
    else:
        text = f"{value:g}" if isinstance(value, float) else str(value)
    return _escape(f"`{text}`")


def _escape(text: str) -> str:
    """A table cell's text with its pipes escaped (GitHub reads `\\|` as a pipe, in code spans too)."""
    return text.replace("|", "\\|")


def fidelity_markdown() -> str:
    """docs/fidelity.md's Fidelity table."""
    lines = ["| recipe | setting | seed (its code) | fastmath key | fastmath value | why it differs |",
             "|---|---|---|---|---|---|"]
    for row in ROWS:
        key = f"`{row.key}`" if row.key else "-"
        value = _cell(row.value) if row.key else row.value
        lines.append(f"| {row.recipe} | {row.setting} | {_escape(row.seed)} | {key} | {value} | {row.why} |")
    return "\n".join(lines)
