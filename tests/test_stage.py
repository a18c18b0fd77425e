"""The stage scaffold: run.resume honoured the same way in every stage, pruning that keeps this run's newest
checkpoint, one held-out measurement shared by SFT and GRPO, and the metrics trackers."""
import json
import sys

import pytest
import torch

from fastmath import checkpoint as ckpt
from fastmath.config import load_config
from fastmath.errors import ConfigError
from fastmath.grpo_stage import run_grpo
from fastmath.metrics import MetricsWriter
from fastmath.sft import run_sft
from fastmath.stage import Stage
from fastmath.tracking import Tracker
from tests.tolerances import reduction_rtol, storage_rtol, tiny_atol


def _grpo(tmp_path, embedded_cache, *extra):
    return load_config(None, [
        f"run.output_dir={tmp_path / 'run'}", f"run.cache_dir={embedded_cache}", "run.stages=[grpo]",
        "grpo.rollout.generator=hf", "grpo.max_steps=3", "grpo.prompts_per_step=2", "grpo.rollout.num_generations=2",
        "grpo.rollout.max_prompt_length=96", "grpo.rollout.max_completion_length=16", "grpo.tokens_per_micro_batch=256",
        "grpo.lr=1e-3", "grpo.reward.reward_workers=1", "grpo.reward.rewards=[format,length]",
        "grpo.reward.length_unit=chars",
        "grpo.loss.vllm_is_correction=false", "heldout.num_problems=0", "checkpoint.save_every=1", *extra])


def _steps(root):
    return [p.name for p in ckpt.complete_checkpoints(root)]


def test_grpo_honours_resume_never_and_path_and_prunes_only_its_own(tmp_path, embedded_cache, dist_info,
                                                                     monkeypatch, capsys):
    """The GRPO stage used to ignore run.resume=never / <path> and to prune by step number, deleting the
    checkpoint it had just written when an older run had reached higher steps."""
    out = tmp_path / "run" / "grpo"
    run_grpo(_grpo(tmp_path, embedded_cache, "checkpoint.keep=5"), dist_info)
    assert _steps(out) == ["step_00000001", "step_00000002", "step_00000003"]
    state = json.loads((out / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    assert state["tokens_seen"] > 0  # real tokens, not a placeholder 0

    # never, beside existing checkpoints: refused by name, and nothing is touched.
    with pytest.raises(ConfigError, match="run.resume=never"):
        run_grpo(_grpo(tmp_path, embedded_cache, "run.resume=never"), dist_info)
    assert _steps(out) == ["step_00000001", "step_00000002", "step_00000003"]

    # <path>: resume from step 1 although auto would pick step 3; keep=1. After each save, this run's newest
    # checkpoint must exist; the older run's step 3 is not this run's to delete until this run rewrites it.
    seen = []
    save = ckpt.save_checkpoint

    def save_and_look(*args, **kwargs):
        path = save(*args, **kwargs)
        seen.append((path.name, _steps(out)))
        return path

    monkeypatch.setattr(ckpt, "save_checkpoint", save_and_look)
    capsys.readouterr()
    first = out / "checkpoints" / "step_00000001"
    first_tokens = json.loads((first / "trainer_state.json").read_text())["tokens_seen"]
    summary = run_grpo(_grpo(tmp_path, embedded_cache, f"run.resume={first}", "checkpoint.keep=1"), dist_info)
    assert f"resumed GRPO from {first} at step 1" in capsys.readouterr().out
    assert seen == [("step_00000002", ["step_00000002", "step_00000003"]),
                    ("step_00000003", ["step_00000003"])]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics] == [1, 2, 3]
    assert summary["tokens_seen"] == first_tokens + metrics[1]["tokens"] + metrics[2]["tokens"]


def test_resume_path_belongs_to_the_stage_that_holds_it(tmp_path, dist_info):
    config = load_config(None, [f"run.output_dir={tmp_path}", "run.stages=[sft,grpo]",
                                f"run.resume={tmp_path}/grpo/checkpoints/step_00000004"])
    sft = Stage("sft", config, dist_info, tmp_path, (), heldout=False)
    grpo = Stage("grpo", config, dist_info, tmp_path / "grpo", (), heldout=False)
    assert sft._resume_mode() == "auto"
    assert grpo._resume_mode() == config.run.resume
    alone = load_config(None, [f"run.output_dir={tmp_path}", "run.stages=[sft]", f"run.resume={tmp_path}/x"])
    assert Stage("sft", alone, dist_info, tmp_path, (), heldout=False)._resume_mode() == f"{tmp_path}/x"


def test_sft_after_equals_grpo_before(tmp_path, embedded_cache, dist_info):
    """The demo's two middle columns are one measurement of one model: they must agree exactly."""
    config = load_config(None, [
        f"run.output_dir={tmp_path / 'demo'}", f"run.cache_dir={embedded_cache}", "run.stages=[sft,grpo]",
        "data.max_rows=64", "data.max_length=256", "data.validation=", "sft.tokens_per_micro_batch=512",
        "sft.global_batch=2", "sft.max_steps=3", "sft.lr=2e-3", "heldout.num_problems=12",
        "heldout.max_new_tokens=24", "heldout.batch_size=5", "grpo.rollout.generator=hf", "grpo.max_steps=1",
        "grpo.prompts_per_step=2", "grpo.rollout.num_generations=2", "grpo.rollout.max_prompt_length=96",
        "grpo.rollout.max_completion_length=16", "grpo.tokens_per_micro_batch=256", "grpo.reward.reward_workers=1",
        "grpo.reward.rewards=[format,length]", "grpo.reward.length_unit=chars"])
    sft = run_sft(config, dist_info)
    grpo = run_grpo(config, dist_info)
    assert sft["after"]["heldout"]["n"] == 12
    assert sft["after"]["heldout"] == grpo["before"]["heldout"]
    assert grpo["start"] == sft["export"]


def test_heldout_counts_undecided_answer_checks_with_the_configured_limit(embedded_cache, dist_info, monkeypatch):
    """A timed-out or failed answer check scores as wrong and is reported, never silently folded into accuracy."""
    from fastmath import heldout
    from fastmath.answers import Verdict
    from fastmath.embedded import ensure_embedded_assets

    config = load_config(None, [f"run.cache_dir={embedded_cache}", "heldout.num_problems=4",
                                "heldout.answer_timeout_s=0.25"])
    limits = []

    class FakeChecker:
        def __init__(self, workers, timeout_s):
            limits.append(timeout_s)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def check(self, completions, golds):
            return [Verdict(True, "correct"), Verdict(None, "timeout"), Verdict(None, "timeout"),
                    Verdict(None, "error")]

    monkeypatch.setattr(heldout, "AnswerChecker", FakeChecker)
    monkeypatch.setattr(heldout, "greedy_completions", lambda model, tok, fmt, problems, *args: (
        ["\\boxed{1}"] * len(problems), [5] * len(problems), 0))
    model_dir = str(ensure_embedded_assets(embedded_cache).model_dir)
    result = heldout.heldout_accuracy(model_dir, config, dist_info)
    assert limits == [0.25]
    assert result == {"accuracy": 0.25, "mean_tokens": 5.0, "truncated": 0, "n": 4, "answer_timeouts": 2,
                      "answer_errors": 1}


def test_tensorboard_events_hold_the_jsonl_metrics(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional dependency (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = [{"step": 1, "loss": 2.5, "lr": 1e-3, "mfu": None, "epoch": 0},
               {"step": 2, "loss": 1.25, "lr": 5e-4, "mfu": None, "epoch": 0, "val/loss": 1.5}]
    tracker = Tracker(MetricsWriter(tmp_path / "metrics.jsonl", enabled=True), tmp_path, ["jsonl", "tensorboard"],
                      "t", "sft", {}, resume_step=0, enabled=True)
    for record in records:
        tracker.write(record)
    tracker.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["epoch", "loss", "lr", "val/loss"]  # None is not a number
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for tag in ("loss", "lr", "val/loss"):
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        want = [(r["step"], pytest.approx(r[tag], rel=storage_rtol(torch.float32), abs=0))  # events hold fp32
                for r in lines if tag in r]
        assert got == want, tag


@pytest.mark.parametrize("backend, module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_missing_tracker_package_is_named(tmp_path, monkeypatch, backend, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ConfigError, match=f"names '{backend}' but the {backend} package is not installed"):
        Tracker(MetricsWriter(tmp_path / "m.jsonl", enabled=True), tmp_path, ["jsonl", backend], "t", "sft", {},
                resume_step=0, enabled=True)


def test_wandb_runs_offline_without_a_network(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is an optional dependency (pip install wandb)")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the default must be offline: this machine has no network
    tracker = Tracker(MetricsWriter(tmp_path / "metrics.jsonl", enabled=True), tmp_path, ["jsonl", "wandb"],
                      "t", "sft", {"lr": 1e-3}, resume_step=0, enabled=True)
    tracker.write({"step": 1, "loss": 2.5})
    tracker.close()
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    (events,) = run.glob("run-*.wandb")
    assert events.stat().st_size > 0


def test_the_clip_sees_every_parameter_after_a_forward_without_backward(dist_info):
    """Under FSDP2 the root stays gathered after a forward that no backward follows (GRPO's no-grad log-prob pass,
    SFT's validation loss), with other tensors registered as its parameters until the next backward ends: a
    parameter list read from the module then misses the root's parameters (embeddings, final norm), and the clip
    left them out of the norm and unscaled. The optimizer's list is the one that gets the gradients."""
    from torch.distributed.fsdp import fully_shard

    from fastmath.model import fsdp_mesh
    from fastmath.stage import OptimSettings, clip_gradients, stepped_parameters

    torch.manual_seed(0)
    mesh = fsdp_mesh(dist_info.world_size, 1, dist_info.device)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    fully_shard(model[1], mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.tensor([1, 2, 3, 5])
    with torch.no_grad():
        model(ids)
    read_now = list(model.parameters())
    stepped = stepped_parameters(optimizer)
    assert any(all(p is not q for q in stepped) for p in read_now)  # the swap this test is about took place
    model(ids).square().sum().backward()
    assert all(p.grad is not None for p in stepped)
    grads = [(p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone() for p in stepped]
    truth = sum(g.double().pow(2).sum().item() for g in grads) ** 0.5
    settings = OptimSettings("adamw", 0.1, 0.0, 0.0, 0.0, truth / 2, (0.9, 0.95), 1e-8)
    # Two chained sums of squares (per tensor, then over tensors) of positive terms, the longest 11 * 8 long.
    norm = clip_gradients(stepped, settings).item()
    assert norm == pytest.approx(truth, rel=reduction_rtol(torch.float32, 11 * 8, chain=2), abs=0)
    clipped = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in stepped]
    for before, after in zip(grads, clipped):  # every gradient scaled by the same coefficient, about 1/2
        torch.testing.assert_close(after, before * (truth / 2) / (norm + 1e-6),
                                   rtol=reduction_rtol(torch.float32, 11 * 8, chain=3), atol=tiny_atol(torch.float32))
