"""The embedded default: data, tokenizer and a freshly initialised tiny model, made locally (no downloads).

    assets = ensure_embedded_assets()        # ~/.cache/fastmath/embedded-v2-seed0, built once (a few seconds)
    AutoTokenizer.from_pretrained(assets.model_dir); AutoModelForCausalLM.from_pretrained(assets.model_dir)

Layout of `root` (`<cache>/embedded-<EMBEDDED_VERSION>-seed<seed>`):

    data/train.jsonl, data/validation.jsonl, data/test.jsonl   rows of fastmath.synthetic.make_splits(seed)
    model/   config.json, model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json, ...
    COMPLETE                                                     written last; a folder without it is never used

Sizes:

| part      | value                                                                                             |
|-----------|---------------------------------------------------------------------------------------------------|
| data      | 4,000 train (half verbose solutions) / 200 validation / 200 test rows, three families             |
| tokenizer | byte-level BPE with Qwen2's pre-tokenizer (every digit its own token), 387 tokens: 256 bytes,     |
|           | 125 merges, specials <|endoftext|> (pad), <|im_start|>, <|im_end|> (eos), and <think>, </think>,  |
|           | \\boxed{ as single added tokens. Mean solution tokens, concise / verbose: arithmetic 57 / 87,      |
|           | linear 36 / 63, word 35 / 55; prompts (with the template) 21-51 tokens                            |
| model     | Qwen2, 4 layers, hidden 192, MLP 512, 4 query / 2 key-value heads (head_dim 48), tied embeddings, |
|           | max 512 positions, float32, 1.70 M parameters                                                     |

Chat template (Qwen style): `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, then
`<|im_start|>assistant\\n` when add_generation_prompt=True. The prompt's ids are an exact prefix of the ids of
the prompt plus its answer, because the template and the BPE pre-tokenizer never merge across "\\n".
Note (transformers 5.x): `tokenizer.apply_chat_template(messages)` tokenizes and returns a BatchEncoding
(`["input_ids"]`, `["attention_mask"]`) by default; pass `return_dict=False` for a plain list of ids, or
`tokenize=False` for the text.

Concurrency: several processes (torchrun ranks) may call ensure_embedded_assets at once. Each builds into its
own temporary folder beside the target and `os.rename`s it into place; the rename is atomic, so exactly one
wins and the others discard their copy. Builds are deterministic, so every copy is identical anyway.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from transformers.utils import logging as hf_logging

from fastmath.errors import DataError
from fastmath.synthetic import make_splits, write_jsonl

EMBEDDED_VERSION = "v2"  # v2: sums and differences by columns (fastmath.synthetic); a new version rebuilds the cache
COMPLETE_MARKER = "COMPLETE"
_PROGRESS_BAR_SWITCH = threading.Lock()  # see _build: transformers' progress-bar switch is process-wide

PAD_TOKEN, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
REASONING_TOKENS = ("<think>", "</think>", "\\boxed{")
VOCAB_SIZE = 384  # BPE budget, special tokens included; the 3 reasoning tokens come on top
# transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX (a test checks they agree).
QWEN2_SPLIT_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

HIDDEN_SIZE = 192
INTERMEDIATE_SIZE = 512
NUM_LAYERS = 4
NUM_HEADS = 4
NUM_KV_HEADS = 2
MAX_POSITIONS = 512

_TORCH_RNG_LOCK = threading.Lock()

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class EmbeddedAssets:
    """Paths of a complete embedded build: data_dir has {train,validation,test}.jsonl, model_dir an HF checkpoint."""

    root: Path
    data_dir: Path
    model_dir: Path


def _assets(root: Path) -> EmbeddedAssets:
    return EmbeddedAssets(root=root, data_dir=root / "data", model_dir=root / "model")


def default_cache_dir() -> Path:
    """$FASTMATH_CACHE, else ~/.cache/fastmath."""
    return Path(os.environ.get("FASTMATH_CACHE") or Path.home() / ".cache" / "fastmath")


def ensure_embedded_assets(cache_dir: str | Path | None = None, seed: int = 0) -> EmbeddedAssets:
    """Return the embedded assets for `seed`, building them on first use (safe to call from several processes)."""
    root = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"embedded-{EMBEDDED_VERSION}-seed{seed}"
    if (root / COMPLETE_MARKER).is_file():
        return _assets(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    print(f"fastmath: building embedded data, tokenizer and model (seed {seed}) in {root}", file=sys.stderr)
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.build-"))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        _build(staging, seed)
        if root.exists() and not (root / COMPLETE_MARKER).is_file():
            # Left incomplete by something other than this function (which only renames complete folders):
            # move it aside atomically so the rename below can take its place.
            stale = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.stale-"))
            try:
                os.rename(root, stale / "old")
            except FileNotFoundError:
                pass  # another process moved it first
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(staging, root)
        except OSError:
            if not (root / COMPLETE_MARKER).is_file():
                raise
            # Lost the race to another process: its complete copy is in place (and identical); drop ours.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _assets(root)


def embedded_train_with_verbose_fraction(assets: EmbeddedAssets, fraction: float) -> Path:
    """The embedded train problems, in the same order, with `fraction` of them carrying the verbose solution
    (make_splits' own choice of rows): data/train-verbose<F>.jsonl, written once beside train.jsonl. The tokenizer
    and model stay those built from the embedded data; only which rows show the re-checks changes."""
    path = assets.data_dir / f"train-verbose{fraction:g}.jsonl"
    if path.is_file():
        return path
    seed = json.loads((assets.root / COMPLETE_MARKER).read_text(encoding="utf-8"))["seed"]
    rows = make_splits(seed=seed, verbose_fraction=fraction)["train"]
    built = [json.loads(line)["uid"] for line in (assets.data_dir / "train.jsonl").read_text("utf-8").splitlines()]
    if [row["uid"] for row in rows] != built:  # the generator changed under a cached build: say so, never mix
        raise DataError(f"the embedded data in {assets.root} were built by another version of fastmath.synthetic; "
                        f"delete that folder to rebuild it")
    write_jsonl(rows, path)  # atomic: processes writing it at once each replace it with the same bytes
    return path


def _build(root: Path, seed: int) -> None:
    """Write data/, model/ and finally the completion marker into `root`."""
    splits = make_splits(seed=seed)
    for name, rows in splits.items():
        write_jsonl(rows, root / "data" / f"{name}.jsonl")
    tokenizer = build_tokenizer([_chat_text(row) for row in splits["train"]])
    model = build_model(tokenizer, seed)
    # The one-line message above is all a build prints. The switch is process-wide, so two threads building at
    # once take turns: otherwise the first to finish turns the bar back on while the other is still saving.
    with _PROGRESS_BAR_SWITCH:
        bar_was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            model.save_pretrained(root / "model", safe_serialization=True)
        finally:
            if bar_was_enabled:
                hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(root / "model")
    marker = {"version": EMBEDDED_VERSION, "seed": seed, "vocab_size": len(tokenizer),
              "parameters": sum(p.numel() for p in model.parameters())}
    (root / COMPLETE_MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")


def _chat_text(row: dict) -> str:
    """The text the model is trained on, so the BPE also learns the template's "user\\n" / "assistant\\n"."""
    return (f"{IM_START}user\n{row['problem']}{IM_END}\n"
            f"{IM_START}assistant\n{row['solution']}{IM_END}\n")


def build_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `corpus`, with every digit its own token and a Qwen-style chat template.

    The pipeline is exactly Qwen2's: NFC, then the Qwen2 split regex (which isolates every digit, like
    `pre_tokenizers.Digits(individual_digits=True)`, and splits words, punctuation runs and newlines), then
    byte-level mapping, so decode(encode(s)) == s for any NFC string. It has to be Qwen2's: for a checkpoint
    whose config says model_type "qwen2", transformers 5.x `AutoTokenizer` (and so vLLM) loads
    `Qwen2Tokenizer`, which keeps our vocab and merges but rebuilds this pipeline whatever tokenizer.json says.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD_TOKEN, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text stays encodable
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    # Regular (not special) added tokens: one id each, and kept by decode(skip_special_tokens=True).
    tokenizer.add_tokens([AddedToken(t, normalized=False) for t in REASONING_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
    )


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 sized by the module constants; the init depends only on `seed`."""
    pad_id = tokenizer.pad_token_id
    eos_id = tokenizer.eos_token_id
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=pad_id,  # as in Qwen2: <|endoftext|>; the tokenizer adds no BOS
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
    )
    # A private RNG stream: the same seed gives the same weights whatever the caller's torch RNG state was.
    # fork_rng still draws from the one global generator, hence the lock against other threads building.
    with _TORCH_RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id)
    return model
