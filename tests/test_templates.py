"""Real chat templates on the tiny tokenizer: the models' own (TRL's copies of DeepSeek-R1-Distill's, Qwen2.5's and
Qwen3's) and the seed's SFT template shipped with fastmath. With each: the reasoning prefill is detected, SFT targets
hold exactly one <think>, a well-formed completion earns the format reward through GRPO's reward path, and the eval
extracts the right answer. Then both format rules against the seed's regex, and SFT -> GRPO -> eval end to end on
the DeepSeek template, the template travelling with the SFT export.
"""
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trl

from fastmath.answers import AnswerChecker
from fastmath.config import load_config
from fastmath.preflight import preflight
from fastmath.data import DataReport, Formatter, chat_template_text, prompt_settings, reasoning_prefix
from fastmath.errors import ConfigError, DataError
from fastmath.eval import evaluate, load_problems
from fastmath.grpo_stage import PromptRow, sample_groups
from fastmath.model import load_tokenizer
from fastmath.rewards import FORMAT_RULES, box_after_think, box_before_think_end
from fastmath.rollout import Completion, Generator, Sampling
from tests.conftest import REPO, subprocess_env

TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
# The DeepSeek-R1-Distill tokenizer's special tokens (the Qwen templates use <|im_start|> / <|im_end|>, which the
# tiny tokenizer already has).
DEEPSEEK_SPECIALS = {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>",
                     "additional_special_tokens": ["<｜User｜>", "<｜Assistant｜>"]}
# name -> (data.chat_template setting, special tokens to add, the opening the generation prompt pre-fills)
TEMPLATES = {
    "deepseek_r1_distill": (str(TRL_TEMPLATES / "deepseek_r1_distill.jinja"), DEEPSEEK_SPECIALS, "<think>\n"),
    "qwen2_5": (str(TRL_TEMPLATES / "qwen2_5.jinja"), {}, ""),
    "qwen3": (str(TRL_TEMPLATES / "qwen3.jinja"), {}, ""),
    "fast_math_r1_sft": ("fast_math_r1_sft", {}, ""),
}
SYSTEM, USER_PREFIX = "Please reason step by step.", "Solve the problem, and put the answer in \\boxed{}. "
PROBLEM, ANSWER = "What is 2 + 3?", "5"
# A trace as SFT data holds it (opening its own reasoning block), and the well-formed rest of one as a model writes
# it after the prompt: a box inside the reasoning (the seed's rule) and one after </think> (the other rule).
SOLUTION = "<think>\nAdd: 2 + 3 = 5.\n</think>\nThe answer is \\boxed{5}."
AFTER_OPENING = "Add: 2 + 3 = \\boxed{5}.\n</think>\nThe answer is \\boxed{5}."


def templated_tokenizer(model_dir, name):
    """A fresh copy of the tiny tokenizer with the template's special tokens added."""
    tokenizer = load_tokenizer(str(model_dir))
    if TEMPLATES[name][1]:
        tokenizer.add_special_tokens(TEMPLATES[name][1])
    return tokenizer


@pytest.fixture(params=list(TEMPLATES))
def templated(request, assets):
    """(template name, its Formatter with the seed's kind of system prompt and user prefix)."""
    name = request.param
    tokenizer = templated_tokenizer(assets.model_dir, name)
    formatter = Formatter(tokenizer, system_prompt=SYSTEM, user_prefix=USER_PREFIX, chat_template=TEMPLATES[name][0])
    return name, formatter


@pytest.fixture(scope="module")
def checker():
    with AnswerChecker(1, 10.0) as answer_checker:
        yield answer_checker


def completion_of(tokenizer, text: str) -> Completion:
    """What a generator returns for a completion that writes `text` and ends with eos."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return Completion(ids, None, tokenizer.decode(ids, skip_special_tokens=True), truncated=False)


class FixedGenerator(Generator):
    """Every prompt gets the same scripted completions."""

    def __init__(self, completions: list[Completion]):
        self.completions = completions

    def generate(self, prompt_ids, sampling, n, seeds=None):
        assert n == len(self.completions)
        return [list(self.completions) for _ in prompt_ids]


def written_completion(formatter: Formatter) -> str:
    """A well-formed completion as the model writes it: the reasoning opening unless the prompt pre-fills it."""
    return AFTER_OPENING if formatter.reasoning_prefix else "<think>\n" + AFTER_OPENING


# ---------------------------------------------------------------------------------------------
# Each template


def test_prompt_holds_system_prompt_and_user_prefix_and_the_prefill_is_detected(templated):
    name, formatter = templated
    rendered = formatter.tokenizer.apply_chat_template(formatter.prompt_messages(PROBLEM), tokenize=False,
                                                       add_generation_prompt=True)
    assert SYSTEM in rendered and USER_PREFIX + PROBLEM in rendered
    assert formatter.reasoning_prefix == TEMPLATES[name][2]
    assert rendered.endswith(formatter.reasoning_prefix)


def test_sft_target_holds_exactly_one_think(templated):
    name, formatter = templated
    tokenizer = formatter.tokenizer
    doc = formatter.document({"problem": PROBLEM, "solution": SOLUTION}, DataReport("rows"))
    text = tokenizer.decode(doc.input_ids)
    assert text.count("<think>") == 1 and text.count("</think>") == 1
    trained = tokenizer.decode([t for t, on in zip(doc.input_ids, doc.loss_mask) if on])
    assert trained.endswith("The answer is \\boxed{5}." + tokenizer.eos_token)
    # The opening is trained where the model writes it, and given (no loss) where the prompt pre-fills it.
    assert ("<think>" in trained) == (not formatter.reasoning_prefix)


def test_chat_rows_hold_one_think_or_are_refused_by_name(templated):
    name, formatter = templated
    formatter.messages_field = "messages"
    row = {"messages": [{"role": "user", "content": PROBLEM}, {"role": "assistant", "content": SOLUTION}]}
    if name == "deepseek_r1_distill":  # its assistant turns drop the reasoning: not a prefix of the prompt's render
        with pytest.raises(DataError, match="prompt/solution format"):
            formatter.document(row, DataReport("rows"))
        return
    doc = formatter.document(row, DataReport("rows"))
    assert formatter.tokenizer.decode(doc.input_ids).count("<think>") == 1


def test_well_formed_completion_earns_the_format_reward_through_grpo(templated, checker):
    name, formatter = templated
    tokenizer = formatter.tokenizer
    row = PromptRow(PROBLEM, formatter.prompt_ids(PROBLEM), ANSWER, formatter.reasoning_prefix)
    generator = FixedGenerator([completion_of(tokenizer, written_completion(formatter)),
                                completion_of(tokenizer, "<think>\nno answer here\n</think>\nDone.")])
    sampling = Sampling(temperature=1.0, top_p=1.0, min_p=0.0, max_tokens=64, stop=[], seed=0)
    for rule in FORMAT_RULES:
        config = load_config(None, ["grpo.rollout.num_generations=2", "grpo.reward.rewards=[accuracy,format]",
                                    f"grpo.reward.format_rule={rule}"])
        (group,) = sample_groups(generator, [row], sampling, config, checker)
        assert group.components["format"] == [1.0, 0.0], (name, rule)
        assert group.correct == [True, False], name


def test_eval_extracts_the_answer_with_the_prefill(templated, checker, tmp_path):
    name, formatter = templated
    tokenizer = formatter.tokenizer
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"problem": PROBLEM, "answer": 5}) + "\n")
    config = load_config(None, [f"eval.benchmark={bench}", "eval.samples=2", "eval.budgets=[64]",
                                "eval.stop=[</think>]"])
    problems, _ = load_problems(config, formatter, checker)
    assert problems[0].ids == formatter.prompt_ids(PROBLEM)
    # The seed's way: stop at </think> (the stop string stays in the text) with the box inside the reasoning.
    stopped = written_completion(formatter).split("</think>")[0] + "</think>"
    generator = FixedGenerator([completion_of(tokenizer, stopped), completion_of(tokenizer, "<think>\n2 + 3 = 6")])
    records, _ = evaluate(generator, problems, config.eval, tokenizer, checker, 0, False)
    assert [(r["answer"], r["correct"]) for r in records] == [("5", True), (None, False)]
    assert all(r["text"].startswith(formatter.reasoning_prefix + ("" if formatter.reasoning_prefix else "<think>"))
               for r in records)


# ---------------------------------------------------------------------------------------------
# Template settings


def test_shipped_sft_template_renders_the_seed_turns(assets):
    text = chat_template_text("fast_math_r1_sft")
    formatter = Formatter(load_tokenizer(str(assets.model_dir)), system_prompt="S", chat_template="fast_math_r1_sft")
    assert formatter.tokenizer.chat_template == text
    eos = formatter.tokenizer.eos_token
    conversation = [{"role": "system", "content": "S"}, {"role": "user", "content": "P"},
                    {"role": "assistant", "content": "A"}]
    assert formatter.tokenizer.apply_chat_template(conversation, tokenize=False) == (
        f"<|system|>\nS{eos}\n<|user|>\nP{eos}\n<|assistant|>\nA{eos}\n")
    assert formatter.tokenizer.apply_chat_template(conversation[:2], tokenize=False, add_generation_prompt=True) == (
        f"<|system|>\nS{eos}\n<|user|>\nP{eos}\n<|assistant|>\n")


def test_shipped_templates_are_packaged(tmp_path):
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=REPO,
                   env=subprocess_env(), check=True, capture_output=True, timeout=300)
    assert (tmp_path / "fastmath" / "chat_templates" / "fast_math_r1_sft.jinja").is_file()


def test_template_settings_and_prefill_rules(tmp_path):
    assert chat_template_text("model") is None
    with pytest.raises(ConfigError, match="data.chat_template.*fast_math_r1_sft"):
        chat_template_text("no_such_template")
    with pytest.raises(ConfigError, match="data.chat_template"):  # checked by preflight, before any loading
        preflight(load_config(None, ["data.chat_template=no_such_template", f"run.output_dir={tmp_path}"]))
    assert reasoning_prefix("<｜Assistant｜><think>\n") == "<think>\n"
    assert reasoning_prefix("<｜Assistant｜><think>\n", "no") == ""
    assert reasoning_prefix("<|im_start|>assistant\n<think>\n\n</think>\n\n") == ""  # a closed block opens nothing
    with pytest.raises(ConfigError, match="reasoning_prefill=yes"):
        reasoning_prefix("<|im_start|>assistant\n", "yes")


def test_stage_prompt_settings_fall_back_to_data():
    config = load_config(None, ["data.system_prompt=sft system", "data.user_prefix=sft: ",
                                "grpo.rollout.system_prompt=",
                                "eval.user_prefix=Solve: it"])
    assert prompt_settings(config, "sft")["system_prompt"] == prompt_settings(config, "heldout")["system_prompt"]
    grpo, ev = prompt_settings(config, "grpo"), prompt_settings(config, "eval")
    assert (grpo["system_prompt"], grpo["user_prefix"]) == ("", "sft: ")
    assert (ev["system_prompt"], ev["user_prefix"]) == ("sft system", "Solve: it")


# ---------------------------------------------------------------------------------------------
# Format rules

SEED_FORMAT2 = re.compile(r"^.*?oxed{(.*?)}.*?</think>.*?$", re.DOTALL)  # the seed's format_reward2 pattern


def test_box_before_think_end_agrees_with_the_seeds_pattern():
    pieces = ["oxed{", "\\boxed{", "}", "{", "</think>", "<think>", "x", "\n", "o", "xed{"]
    rng = random.Random(0)
    for _ in range(5000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        assert box_before_think_end(text) == bool(SEED_FORMAT2.match(text)), repr(text)


def test_the_two_rules_check_opposite_places():
    inside = "<think>\nso \\boxed{5}\n</think>\nDone."
    after = "<think>\nso 5\n</think>\nThe answer is \\boxed{5}."
    assert box_before_think_end(inside) and not box_after_think(inside)
    assert box_after_think(after) and not box_before_think_end(after)


@pytest.mark.parametrize("n", [100_000, 1_000_000])
def test_box_before_think_end_of_hostile_text_does_not_hang(n):
    # The seed's regex is quadratic on these; three searches are linear (the bound only catches a hang).
    hostile = ["oxed{" * (n // 5), "\\boxed{" + "{" * n, "\\boxed{}" + "</think"[:-1] * (n // 7)]
    started = time.monotonic()
    assert not any(box_before_think_end(text) for text in hostile)
    assert time.monotonic() - started < 10 * len(hostile) * n / 1_000_000


# ---------------------------------------------------------------------------------------------
# SFT -> GRPO -> eval on the DeepSeek-R1-Distill template


@pytest.fixture(scope="module")
def deepseek_model(assets, tmp_path_factory):
    """The tiny model with its embeddings grown for the DeepSeek special tokens, saved with that tokenizer."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("deepseek_tiny")
    tokenizer = templated_tokenizer(assets.model_dir, "deepseek_r1_distill")
    model = AutoModelForCausalLM.from_pretrained(str(assets.model_dir))
    model.resize_token_embeddings(len(tokenizer))
    for settings in (model.config, model.generation_config):
        settings.bos_token_id, settings.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_sft_grpo_eval_with_the_deepseek_template(tmp_path, embedded_cache, deepseek_model, dist_info, checker,
                                                  monkeypatch):
    from fastmath import heldout
    from fastmath.eval import run_eval
    from fastmath.grpo_stage import load_prompts, run_grpo
    from fastmath.sft import run_sft

    template = TEMPLATES["deepseek_r1_distill"][0]
    run = tmp_path / "run"
    common = [f"run.output_dir={run}", f"run.cache_dir={embedded_cache}", "run.stages=[sft,grpo,eval]",
              f"model.name_or_path={deepseek_model}", "data.max_rows=16", "data.max_length=256", "data.validation=",
              "sft.tokens_per_micro_batch=512", "sft.max_steps=2", "sft.lr=2e-3", "heldout.num_problems=0",
              "grpo.rollout.generator=hf", "grpo.max_steps=1", "grpo.prompts_per_step=2",
              "grpo.rollout.num_generations=2",
              "grpo.rollout.max_prompt_length=96", "grpo.rollout.max_completion_length=16",
              "grpo.tokens_per_micro_batch=256",
              "grpo.reward.reward_workers=1", "grpo.reward.rewards=[accuracy,format]",
              "grpo.reward.format_rule=box_before_think_end",
              "grpo.loss.vllm_is_correction=false", "eval.generator=hf", "eval.samples=2", "eval.budgets=[16]",
              "eval.max_problems=2", "eval.answer_workers=1"]
    # SFT sets the template; GRPO and eval keep the tokenizer's own, i.e. what the SFT export saved.
    run_sft(load_config(None, common + [f"data.chat_template={template}"]), dist_info)
    later = load_config(None, common)
    grpo = run_grpo(later, dist_info)
    results = run_eval(later, dist_info)

    for export in (run / "hf", run / "grpo" / "hf"):
        assert load_tokenizer(str(export)).chat_template == chat_template_text(template)
    exported = load_tokenizer(grpo["export"])
    formatter = Formatter(exported, **prompt_settings(later, "grpo"))
    assert formatter.reasoning_prefix == "<think>\n"
    assert "reward/format/mean" in json.loads((run / "grpo" / "metrics.jsonl").read_text().splitlines()[-1])
    samples = [json.loads(line) for line in (run / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(s["text"].startswith("<think>\n") for s in samples)
    assert results["problems"] == 2

    # The format reward is live: GRPO's own prompt rows and reward path score a well-formed completion 1.
    rows, _ = load_prompts(later, formatter, checker, progress=False)
    good = completion_of(exported, f"So \\boxed{{{rows[0].answer}}}.\n</think>\nThe answer is \\boxed{{{rows[0].answer}}}.")
    bad = completion_of(exported, "no box\n</think>\nDone.")
    sampling = Sampling(temperature=1.0, top_p=1.0, min_p=0.0, max_tokens=64, stop=[], seed=0)
    for rule in FORMAT_RULES:
        config = load_config(None, common + [f"grpo.reward.format_rule={rule}"])
        (group,) = sample_groups(FixedGenerator([good, bad]), rows[:1], sampling, config, checker)
        assert group.components["format"] == [1.0, 0.0] and group.correct == [True, False], rule

    # The held-out check judges the pre-filled opening with the completion too.
    later.heldout.num_problems = 3
    answers = {r["problem"]: r["answer"] for r in heldout.heldout_rows(later)}
    monkeypatch.setattr(heldout, "greedy_completions", lambda model, tok, fmt, problems, *args: (
        [f"{answers[p]} it is.\n</think>\n\\boxed{{{answers[p]}}}" for p in problems], [8] * len(problems), 0))
    assert heldout.heldout_accuracy(grpo["export"], later, dist_info)["accuracy"] == 1.0
