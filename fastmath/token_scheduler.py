"""The token scheduler: predict, from a problem's text, how many tokens the policy will spend on it, and give each
problem its own generation budget instead of one fixed cap.

    python -m fastmath.token_scheduler train --records RUN/eval/token_records.jsonl --out RUN/token_scheduler \\
        [--config configs/token_scheduler_modernbert_base.yaml] [scheduler.key=value ...]
    python -m fastmath.token_scheduler predict --scheduler RUN/token_scheduler --problems problems.jsonl \\
        --max-budget 16000                      # prints one {"problem", "predicted_tokens", "budget"} per line
    python fastmath/train.py --config X run.stages=[eval] eval.token_scheduler=RUN/token_scheduler

The seed (experiments/train_token_scheduler.py) fine-tunes answerdotai/ModernBERT-base as a regressor (one output,
mean-squared error) on (problem, mean completion length / 12800) pairs of its policy: problems cut to 256 tokens,
batch 32, 3 epochs, lr 1e-5 on a cosine without warmup, AdamW, gradient clip 1, 10% of the rows held out (seed
2025). fastmath keeps the architecture (transformers' ModernBertConfig -> ModernBertForSequenceClassification,
num_labels 1) and the loss:
    * records: the eval stage writes `token_records.jsonl` (one line per problem: its text and the tokens of each
      sample at the sampling budget); the label of a problem is the mean of those, divided by `label_scale`;
    * `scheduler.model: tiny` (the embedded default) builds a small ModernBERT from its config, randomly
      initialised, on the policy's tokenizer (the model the records came from): no download; an HF id or a path
      loads that checkpoint and its own tokenizer (configs/token_scheduler_modernbert_base.yaml: the seed's);
    * training: the loop below, AdamW, a cosine to 0 without warmup, gradient clip 1, fp32 on CPU, bf16 autocast
      on CUDA; the held-out records give the mean absolute error in tokens.

The budget rule: budget = ceil(predicted x (1 + margin_ratio) + margin_tokens), clipped to [min_budget,
max_budget] (the eval stage's largest fixed budget). The prediction is a mean, and half of a problem's samples run
longer than its median, so the margin is what keeps the long ones. The seed's repository ships no inference code
for its scheduler, so this rule is fastmath's, not read from the seed.

A trained scheduler folder holds the HF model (safetensors, loaded without unpickling), its tokenizer and
`scheduler.json` (label scale, margin rule, training report).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fastmath.errors import DataError, FastmathError, first_line

SCHEDULER_FILE = "scheduler.json"
RECORDS_FILE = "token_records.jsonl"


@dataclass
class BudgetRule:
    """budget = ceil(predicted x (1 + margin_ratio) + margin_tokens), clipped to [min_budget, max_budget]."""

    margin_ratio: float = 0.5
    margin_tokens: int = 0
    min_budget: int = 1

    def budget(self, predicted_tokens: float, max_budget: int) -> int:
        raw = math.ceil(max(0.0, predicted_tokens) * (1.0 + self.margin_ratio) + self.margin_tokens)
        return max(min(self.min_budget, max_budget), min(raw, max_budget))


# ---------------------------------------------------------------------------------------------
# Records


def token_records(problems, records: list[dict], budget: int) -> list[dict]:
    """One record per problem from the eval stage's sample records: its text and each sample's tokens at `budget`
    (the sampling budget: a sample cut there counts `budget` tokens), their mean and the pass rate."""
    by_problem: dict[int, list[dict]] = {}
    for r in records:
        if r["budget"] == budget and not r.get("scheduled"):
            by_problem.setdefault(r["problem"], []).append(r)
    out = []
    for p in problems:
        rows = sorted(by_problem.get(p.key, []), key=lambda r: r["sample"])
        if not rows:
            continue
        tokens = [r["tokens"] for r in rows]
        out.append({"id": p.id, "problem": p.text, "tokens": tokens, "mean_tokens": sum(tokens) / len(tokens),
                    "pass_rate": sum(bool(r["correct"]) for r in rows) / len(rows), "budget": budget})
    return out


def read_records(path: str | Path) -> list[dict]:
    """(problem text, mean tokens) records from a token_records.jsonl (or a folder holding one); a line that is not
    such a record is a DataError naming the line."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORDS_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read token records {path}: {first_line(err)}") from None
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path} line {number} is not JSON") from None
        if not (isinstance(row, dict) and isinstance(row.get("problem"), str)
                and isinstance(row.get("mean_tokens"), (int, float)) and not isinstance(row["mean_tokens"], bool)
                and math.isfinite(row["mean_tokens"]) and row["mean_tokens"] >= 0):
            raise DataError(f"{path} line {number} is not a token record (needs 'problem' text and a "
                            f"non-negative 'mean_tokens')")
        out.append(row)
    if len(out) < 2:
        raise DataError(f"{path} holds {len(out)} token records; training needs at least 2")
    return out


# ---------------------------------------------------------------------------------------------
# Model


def build_regressor(settings, tokenizer):
    """ModernBERT with a one-output regression head: the tiny one from its config, or a pretrained checkpoint."""
    from transformers import ModernBertConfig, ModernBertForSequenceClassification

    if settings.model != "tiny":
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(settings.model, num_labels=1,
                                                                  problem_type="regression")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ends = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else pad
    config = ModernBertConfig(
        vocab_size=len(tokenizer), hidden_size=settings.tiny_hidden_size,
        intermediate_size=2 * settings.tiny_hidden_size, num_hidden_layers=settings.tiny_layers,
        num_attention_heads=settings.tiny_heads, max_position_embeddings=settings.max_length,
        pad_token_id=pad, bos_token_id=ends, eos_token_id=ends, cls_token_id=ends, sep_token_id=ends,
        num_labels=1, problem_type="regression",
        classifier_pooling="mean",  # the policy's tokenizer adds no [CLS] to pool from
        reference_compile=False)
    return ModernBertForSequenceClassification(config)


def load_tokenizer_for(settings, policy_model: str):
    from transformers import AutoTokenizer

    source = policy_model if settings.model == "tiny" else settings.model
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Training


def split_records(records: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded shuffle, then the last round(val_fraction x n) records held out (at least one train record)."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = min(len(records) - 1, round(val_fraction * len(records)))
    cut = len(records) - held
    return [records[i] for i in order[:cut]], [records[i] for i in order[cut:]]


def _batches(texts: list[str], tokenizer, settings, device):
    for start in range(0, len(texts), settings.batch_size):
        enc = tokenizer(texts[start:start + settings.batch_size], padding=True, truncation=True,
                        max_length=settings.max_length, return_tensors="pt")
        yield start, {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


@torch.no_grad()
def predict_scaled(model, tokenizer, texts: list[str], settings, device) -> list[float]:
    model.eval()
    out: list[float] = []
    for _, batch in _batches(texts, tokenizer, settings, device):
        out += model(**batch).logits[:, 0].float().tolist()
    return out


def train_scheduler(records: list[dict], settings, seed: int, policy_model: str, out_dir: str | Path,
                    device: torch.device | None = None) -> dict:
    """Train on `records`, write the scheduler folder, return its report (also in scheduler.json)."""
    from fastmath.stage import lr_at

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    tokenizer = load_tokenizer_for(settings, policy_model)
    model = build_regressor(settings, tokenizer).to(device)
    train, held = split_records(records, settings.val_fraction, seed)
    texts = [r["problem"] for r in train]
    labels = torch.tensor([r["mean_tokens"] / settings.label_scale for r in train], dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(len(train) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    rng = random.Random(seed)
    step, losses = 0, []
    for _ in range(settings.epochs):
        order = list(range(len(train)))
        rng.shuffle(order)
        model.train()
        for start, batch in _batches([texts[i] for i in order], tokenizer, settings, device):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, settings.lr, 0.0, 0.0)
            target = labels[order[start:start + settings.batch_size]].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                pred = model(**batch).logits[:, 0].float()
            loss = torch.nn.functional.mse_loss(pred, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item())  # a host sync per step: the scheduler is small and its steps few
            step += 1
    report = {"records": len(records), "train": len(train), "held_out": len(held), "steps": step,
              "final_train_mse": sum(losses[-steps_per_epoch:]) / max(1, len(losses[-steps_per_epoch:])),
              "label_scale": settings.label_scale, "model": settings.model, "policy_model": policy_model,
              "seed": seed, "rule": asdict(rule_of(settings))}
    if held:
        pred = [p * settings.label_scale for p in
                predict_scaled(model, tokenizer, [r["problem"] for r in held], settings, device)]
        truth = [r["mean_tokens"] for r in held]
        mean_truth = sum(truth) / len(truth)
        report["held_out_mae_tokens"] = sum(abs(p - t) for p, t in zip(pred, truth)) / len(held)
        report["held_out_mae_of_the_mean_tokens"] = sum(abs(mean_truth - t) for t in truth) / len(held)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    settings_dict = {k: getattr(settings, k) for k in ("model", "max_length", "label_scale", "batch_size")}
    (out_dir / SCHEDULER_FILE).write_text(json.dumps({"settings": settings_dict, "report": report}, indent=2))
    return report


def rule_of(settings) -> BudgetRule:
    return BudgetRule(settings.margin_ratio, settings.margin_tokens, settings.min_budget)


# ---------------------------------------------------------------------------------------------
# Inference


@dataclass
class _Saved:
    max_length: int
    batch_size: int
    label_scale: float


class TokenScheduler:
    """A trained scheduler folder: `predict_tokens(problems)` and `budgets(problems, max_budget)`."""

    def __init__(self, folder: str | Path, rule: BudgetRule | None = None, device: torch.device | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = Path(folder)
        try:
            saved = json.loads((folder / SCHEDULER_FILE).read_text(encoding="utf-8"))["settings"]
            self.settings = _Saved(int(saved["max_length"]), int(saved["batch_size"]), float(saved["label_scale"]))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(f"{folder} is not a trained token scheduler ({SCHEDULER_FILE}: {first_line(err)}); "
                            f"train one with python -m fastmath.token_scheduler train") from None
        self.rule = rule or BudgetRule()
        self.device = device or torch.device("cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=True).to(self.device)

    def predict_tokens(self, problems: list[str]) -> list[float]:
        scaled = predict_scaled(self.model, self.tokenizer, problems, self.settings, self.device)
        return [max(0.0, p * self.settings.label_scale) for p in scaled]

    def budgets(self, problems: list[str], max_budget: int) -> list[tuple[float, int]]:
        """(predicted tokens, budget) per problem."""
        return [(p, self.rule.budget(p, max_budget)) for p in self.predict_tokens(problems)]


# ---------------------------------------------------------------------------------------------
# Command line


def _policy_model(records_path: Path) -> str:
    """The model whose tokens the records count: results.json beside them names it."""
    folder = records_path if records_path.is_dir() else records_path.parent
    try:
        return json.loads((folder / "results.json").read_text(encoding="utf-8"))["model"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"no eval results.json beside {records_path} naming the policy model; the tiny scheduler "
                        f"uses that model's tokenizer") from None


def main(argv: list[str] | None = None) -> int:
    from fastmath.config import load_config

    parser = argparse.ArgumentParser(prog="python -m fastmath.token_scheduler", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a scheduler from an eval stage's token records")
    train.add_argument("--records", required=True, help="token_records.jsonl, or the eval folder holding it")
    train.add_argument("--out", required=True, help="folder to write the scheduler to")
    train.add_argument("--config", default=None, help="YAML config whose scheduler section to use")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides (scheduler.*, run.seed)")
    predict = sub.add_parser("predict", help="predicted tokens and budgets for problems")
    predict.add_argument("--scheduler", required=True, help="a trained scheduler folder")
    predict.add_argument("--problems", required=True, help=".jsonl with a 'problem' field per line")
    predict.add_argument("--max-budget", type=int, required=True, help="the largest budget to give")
    predict.add_argument("--config", default=None, help="YAML config whose scheduler margin rule to use")
    predict.add_argument("overrides", nargs="*", help="key.sub=value overrides (scheduler.margin_*)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(args.config, args.overrides)
        if args.command == "train":
            records = read_records(args.records)
            report = train_scheduler(records, config.scheduler, config.run.seed, _policy_model(Path(args.records)),
                                     args.out)
            print(json.dumps(report, indent=2), flush=True)
        else:
            problems = [row["problem"] for row in read_problem_rows(args.problems)]
            scheduler = TokenScheduler(args.scheduler, rule_of(config.scheduler))
            for text, (tokens, budget) in zip(problems, scheduler.budgets(problems, args.max_budget)):
                print(json.dumps({"problem": text, "predicted_tokens": round(tokens, 1), "budget": budget}))
    except FastmathError as err:
        print(f"fastmath: error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


def read_problem_rows(path: str) -> list[dict]:
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read problems {path}: {first_line(err)}") from None
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{path} line {number} is not JSON") from None
            if not isinstance(row, dict) or not isinstance(row.get("problem"), str):
                raise DataError(f"{path} line {number} has no 'problem' text")
            rows.append(row)
    return rows


if __name__ == "__main__":
    sys.exit(main())
