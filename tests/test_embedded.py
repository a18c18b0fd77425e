"""fastmath.embedded: build once / reuse, concurrent builders, tokenizer properties, loadable deterministic model."""

import json
import multiprocessing
import threading

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, BatchEncoding

from fastmath.embedded import (
    COMPLETE_MARKER,
    EMBEDDED_VERSION,
    HIDDEN_SIZE,
    NUM_LAYERS,
    QWEN2_SPLIT_REGEX,
    build_model,
    ensure_embedded_assets,
)

MODEL_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return ensure_embedded_assets(tmp_path_factory.mktemp("cache"), seed=0)


@pytest.fixture(scope="module")
def tokenizer(assets):
    return AutoTokenizer.from_pretrained(assets.model_dir)


@pytest.fixture(scope="module")
def train_rows(assets):
    with open(assets.data_dir / "train.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def same_files(a, b, names) -> bool:
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def no_leftovers(cache_dir) -> bool:
    """Only the finished folder remains: no staging or stale folders."""
    return [p.name for p in cache_dir.iterdir()] == [f"embedded-{EMBEDDED_VERSION}-seed0"]


def test_layout_and_reuse_without_rebuild(assets, capfd):
    assert assets.root.name == f"embedded-{EMBEDDED_VERSION}-seed0"
    assert all((assets.data_dir / f"{s}.jsonl").is_file() for s in ("train", "validation", "test"))
    assert all((assets.model_dir / name).is_file() for name in MODEL_FILES)
    marker = assets.root / COMPLETE_MARKER
    stamps = [p.stat().st_mtime_ns for p in (marker, assets.model_dir / "model.safetensors")]
    capfd.readouterr()
    assert ensure_embedded_assets(assets.root.parent, seed=0) == assets
    assert [p.stat().st_mtime_ns for p in (marker, assets.model_dir / "model.safetensors")] == stamps
    assert capfd.readouterr().err == ""
    assert no_leftovers(assets.root.parent)


def test_cache_dir_defaults_to_env(assets, monkeypatch):
    monkeypatch.setenv("FASTMATH_CACHE", str(assets.root.parent))
    assert ensure_embedded_assets() == assets


def test_concurrent_threads_build_once_and_agree(assets, tmp_path, capfd):
    barrier = threading.Barrier(2)
    results = []

    def build():
        barrier.wait()
        results.append(ensure_embedded_assets(tmp_path, seed=0))

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    assert (results[0].root / COMPLETE_MARKER).is_file() and no_leftovers(tmp_path)
    assert same_files(results[0].model_dir, assets.model_dir, MODEL_FILES)
    err = capfd.readouterr().err.strip().splitlines()
    assert 1 <= len(err) <= 2 and all("building embedded" in line for line in err)


def test_concurrent_processes_agree_with_this_one(assets, tmp_path):
    """Two spawned processes (like two torchrun ranks) race; the result is byte-identical to this process's build."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=ensure_embedded_assets, args=(tmp_path, 0)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    root = tmp_path / assets.root.name
    assert (root / COMPLETE_MARKER).is_file() and no_leftovers(tmp_path)
    assert same_files(root / "model", assets.model_dir, MODEL_FILES)
    assert same_files(root / "data", assets.data_dir, ("train.jsonl", "validation.jsonl", "test.jsonl"))


def test_incomplete_folder_is_replaced(tmp_path):
    root = tmp_path / f"embedded-{EMBEDDED_VERSION}-seed0"
    (root / "model").mkdir(parents=True)
    (root / "model" / "half-written").write_text("x")
    built = ensure_embedded_assets(tmp_path, seed=0)
    assert built.root == root and (root / COMPLETE_MARKER).is_file()
    assert not (root / "model" / "half-written").exists() and no_leftovers(tmp_path)


def test_other_seed_gives_other_data_and_weights(assets, tmp_path):
    other = ensure_embedded_assets(tmp_path, seed=1)
    assert other.root.name == f"embedded-{EMBEDDED_VERSION}-seed1"
    assert not same_files(other.data_dir, assets.data_dir, ("train.jsonl",))
    assert not same_files(other.model_dir, assets.model_dir, ("model.safetensors",))


def test_tokenizer_round_trips_and_matches_its_file(assets, tokenizer, train_rows):
    # AutoTokenizer gives Qwen2Tokenizer (model_type qwen2), which rebuilds the pre-tokenizer: it must match ours.
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    assert QWEN2_SPLIT_REGEX == PRETOKENIZE_REGEX
    raw = Tokenizer.from_file(str(assets.model_dir / "tokenizer.json"))
    texts = [r[k] for r in train_rows[:400] for k in ("problem", "solution")] + ["any text: héllo\n\t{}[] 2+2=4 ?!"]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert ids == raw.encode(text).ids


def test_digits_are_single_tokens(tokenizer):
    for token in tokenizer.get_vocab():
        text = tokenizer.convert_tokens_to_string([token])
        assert not any(c.isdigit() for c in text) or len(text) == 1, token
    ids = tokenizer("1234567890")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == list("1234567890")


def test_special_and_reasoning_tokens(tokenizer, assets):
    assert (tokenizer.pad_token, tokenizer.eos_token) == ("<|endoftext|>", "<|im_end|>")
    for text in ("<|im_start|>", "<think>", "</think>", "\\boxed{"):
        assert len(tokenizer(text)["input_ids"]) == 1, text
    kept = tokenizer.decode(tokenizer("<think> 1 </think> \\boxed{1}<|im_end|>")["input_ids"], skip_special_tokens=True)
    assert kept == "<think> 1 </think> \\boxed{1}"
    assert 300 <= len(tokenizer) <= 512


def test_chat_template_prompt_is_a_prefix(tokenizer, train_rows):
    by_kind = {(r["family"], r["style"]): r for r in train_rows}
    assert len(by_kind) == 6
    for row in by_kind.values():
        messages = [{"role": "user", "content": row["problem"]}, {"role": "assistant", "content": row["solution"]}]
        prompt = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages)
        assert isinstance(full, BatchEncoding)  # transformers 5.x: tokenize=True returns a BatchEncoding
        prompt_ids, full_ids = prompt["input_ids"], full["input_ids"]
        assert full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids)
        assert tokenizer.apply_chat_template(messages, return_dict=False) == full_ids
        assert tokenizer.apply_chat_template(messages, tokenize=False) == (
            f"<|im_start|>user\n{row['problem']}<|im_end|>\n<|im_start|>assistant\n{row['solution']}<|im_end|>\n"
        )


def test_model_loads_and_runs(assets, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(assets.model_dir)
    assert model.dtype == torch.float32
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (HIDDEN_SIZE, NUM_LAYERS)
    assert model.config.vocab_size == len(tokenizer)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert 1_000_000 < sum(p.numel() for p in model.parameters()) < 2_500_000
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 47 + 38 - 6?"}],
                                        add_generation_prompt=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer)) and torch.isfinite(logits).all()


def test_initial_weights_ignore_and_keep_the_callers_rng(tokenizer):
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = build_model(tokenizer, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(456)
    second = build_model(tokenizer, seed=0)
    third = build_model(tokenizer, seed=1)
    for (name, a), b, c in zip(first.state_dict().items(), second.state_dict().values(), third.state_dict().values()):
        assert torch.equal(a, b), name
    assert not all(torch.equal(a, c) for a, c in zip(first.state_dict().values(), third.state_dict().values()))


def test_verbose_fraction_keeps_the_problems_and_the_demo_uses_the_recorded_setting(embedded_cache):
    """data.embedded_verbose_fraction: the same train problems in the same order, that share of them verbose,
    byte for byte the file bench/experiments/toy_levers.py --verbose-fraction writes (the records the demo relies on); other
    splits and the default stay the built files. The demo runs the recorded 80% / 12-epoch setting."""
    from fastmath.config import load_config
    from fastmath.stage import data_source
    from fastmath.synthetic import make_splits
    from tests.conftest import REPO

    assets = ensure_embedded_assets(embedded_cache)
    config = load_config(None, [f"run.cache_dir={embedded_cache}", "data.embedded_verbose_fraction=0.8"])
    path = data_source(config, "embedded", "train")
    assert path.endswith("train-verbose0.8.jsonl")
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    built = [json.loads(line) for line in open(assets.data_dir / "train.jsonl", encoding="utf-8")]
    assert [r["uid"] for r in rows] == [r["uid"] for r in built]
    assert [r["answer"] for r in rows] == [r["answer"] for r in built]
    assert sum(r["style"] == "verbose" for r in rows) == round(0.8 * len(rows))
    assert rows == make_splits(seed=0, verbose_fraction=0.8)["train"]
    assert data_source(config, "embedded", "validation") == str(assets.data_dir / "validation.jsonl")
    default = load_config(None, [f"run.cache_dir={embedded_cache}"])
    assert data_source(default, "embedded", "train") == str(assets.data_dir / "train.jsonl")
    demo = load_config(REPO / "configs" / "demo.yaml")
    assert (demo.data.embedded_verbose_fraction, demo.sft.epochs) == (0.8, 12)
