"""Checkpoints that a crash, a power cut or a damaged file cannot turn into a silently wrong run.

Covers: the manifest check (a corrupted shard falls back under run.resume=auto and is refused by name when the
checkpoint was named), a missing DCP .metadata, deleted COMPLETE markers, replacements a crash interrupted,
pruning that spares an older run's checkpoints, the finite-only export, and metrics.jsonl after a resume.
"""
import json
import os
import re
import shutil

import pytest
import torch

from fastmath import checkpoint as ckpt
from fastmath.config import load_config
from fastmath.errors import CheckpointError
from fastmath.sft import run_sft


def _run(tmp_path, embedded_cache, name, *overrides):
    return load_config(None, [f"run.output_dir={tmp_path / name}", f"run.cache_dir={embedded_cache}",
                              "data.max_rows=48", "sft.tokens_per_micro_batch=512", "data.max_length=256",
                              "sft.global_batch=2", "sft.epochs=1", "sft.lr=2e-3", "heldout.num_problems=0",
                              "data.validation=", "sft.log_every=1", "sft.max_steps=4", "sft.save_every=2",
                              "checkpoint.keep=5", *overrides])


def _corrupt_middle(path):
    """4 KiB (or half the file) of random bytes in the middle, size unchanged."""
    size = path.stat().st_size
    n = min(4096, size // 2)
    with open(path, "r+b") as handle:
        handle.seek((size - n) // 2)
        handle.write(os.urandom(n))
    assert path.stat().st_size == size


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, embedded_cache, dist_info):
    """One finished 4-step run (checkpoints at steps 2 and 4, an export); tests copy it before changing it."""
    base = tmp_path_factory.mktemp("durability")
    run_sft(_run(base, embedded_cache, "run"), dist_info)
    return base / "run"


def _copy(finished_run, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(finished_run, target)
    return target


def test_corrupted_shard_falls_back_under_auto_and_is_refused_by_name(finished_run, tmp_path, embedded_cache,
                                                                      dist_info, capsys):
    out = _copy(finished_run, tmp_path)
    export = (out / "hf" / "model.safetensors").read_bytes()
    shard = out / "checkpoints" / "step_00000004" / "model_and_optim" / "__0_0.distcp"
    _corrupt_middle(shard)

    # Named by path: the run stops, naming the file, and the export is untouched.
    named = _run(tmp_path, embedded_cache, "run", f"run.resume={shard.parent.parent}")
    with pytest.raises(CheckpointError, match=r"step_00000004 is corrupt: model_and_optim/__0_0\.distcp does not "
                                              r"match its checksum") as err:
        run_sft(named, dist_info)
    assert "\n" not in str(err.value)
    assert (out / "hf" / "model.safetensors").read_bytes() == export

    # auto: falls back to step 2, says so, redoes steps 3-4 and exports the same weights bit for bit.
    run_sft(_run(tmp_path, embedded_cache, "run"), dist_info)
    printed = capsys.readouterr().out
    assert "__0_0.distcp does not match its checksum" in printed and "falling back" in printed
    assert re.search(r"resumed (SFT )?from \S+step_00000002 at step 2", printed), printed
    assert (out / "hf" / "model.safetensors").read_bytes() == export
    assert ckpt.checkpoint_problem(out / "checkpoints" / "step_00000004", dist_info) is None


def test_every_checkpoint_corrupt_is_refused(finished_run, tmp_path, embedded_cache, dist_info):
    out = _copy(finished_run, tmp_path)
    for step in ("step_00000002", "step_00000004"):
        _corrupt_middle(out / "checkpoints" / step / "model_and_optim" / "__0_0.distcp")
    with pytest.raises(CheckpointError, match="no older checkpoint .* passes its check either"):
        run_sft(_run(tmp_path, embedded_cache, "run"), dist_info)


def test_missing_dcp_metadata_is_one_line_naming_it(finished_run, tmp_path, embedded_cache, dist_info):
    out = _copy(finished_run, tmp_path)
    step = out / "checkpoints" / "step_00000004"
    (step / "model_and_optim" / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"model_and_optim/\.metadata is missing") as err:
        run_sft(_run(tmp_path, embedded_cache, "run", f"run.resume={step}"), dist_info)
    assert "\n" not in str(err.value)
    # Without a manifest to name it, loading still names the file instead of printing the loader's tracebacks.
    model = torch.nn.Linear(2, 2)
    (step / "MANIFEST.sha256").unlink()
    ckpt._VERIFIED.add(step.resolve())  # as if the manifest had been checked, to reach the loader's own check
    with pytest.raises(CheckpointError, match=r"model_and_optim/\.metadata is missing"):
        ckpt.load_checkpoint(step, model, torch.optim.AdamW(model.parameters()), dist_info)


def test_deleted_complete_markers_are_refused_not_overwritten(finished_run, tmp_path, embedded_cache, dist_info):
    out = _copy(finished_run, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("*") if p.is_file()}
    for marker in (out / "checkpoints").glob("step_*/COMPLETE"):
        marker.unlink()
    with pytest.raises(CheckpointError, match=r"without a COMPLETE marker \(step_00000002, step_00000004\)"):
        run_sft(_run(tmp_path, embedded_cache, "run"), dist_info)
    after = {p: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("*") if p.is_file()}
    assert after == {p: t for p, t in before.items() if p.name != "COMPLETE"}


def test_interrupted_replacement_is_settled_on_resume(finished_run, tmp_path, dist_info):
    """A crash between 'old step_N aside' and 'new step_N in place' loses neither copy."""
    out = _copy(finished_run, tmp_path)
    root = out / "checkpoints"
    # Crash after the old copy was moved aside; the new copy (complete) still under .tmp.
    shutil.copytree(root / "step_00000004", root / "step_00000004.tmp")
    os.replace(root / "step_00000004", root / "step_00000004.old")
    # Crash after the old copy was moved aside, but the new one unfinished (no COMPLETE): the old one returns.
    shutil.copytree(root / "step_00000002", root / "step_00000002.tmp")
    (root / "step_00000002.tmp" / "COMPLETE").unlink()
    os.replace(root / "step_00000002", root / "step_00000002.old")
    assert ckpt.find_resume_point(out, "auto", dist_info) == root / "step_00000004"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000004"]
    assert ckpt.checkpoint_problem(root / "step_00000002", dist_info) is None


def test_pruning_spares_an_older_runs_higher_steps(tmp_path, dist_info):
    """Checkpoints this run did not write (an older run's step 10 and 12) are neither deleted nor counted."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    out = tmp_path / "run"
    for older in (10, 12):
        folder = ckpt.step_dir(out, older)
        folder.mkdir(parents=True)
        (folder / ckpt.MARKER).write_text("ok\n")
    ckpt.save_checkpoint(out, 2, 0, model, optimizer, {}, dist_info, keep=1)
    assert ckpt.step_dir(out, 2).is_dir()
    ckpt.save_checkpoint(out, 4, 0, model, optimizer, {}, dist_info, keep=1)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step_00000004", "step_00000010", "step_00000012"]


def test_export_refuses_non_finite_weights_and_keeps_the_good_one(assets, tokenizer, tmp_path, dist_info):
    from fastmath.model import load_causal_lm

    model = load_causal_lm(str(assets.model_dir), "sdpa")
    export = ckpt.export_hf(model, tokenizer, tmp_path / "hf", dist_info)
    good = (export / "model.safetensors").read_bytes()
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="refusing to export non-finite weights"):
        ckpt.export_hf(model, tokenizer, tmp_path / "hf", dist_info)
    assert (export / "model.safetensors").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def _strict_records(path):
    def refuse(token):
        raise AssertionError(f"{token} is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_metrics_hold_one_line_per_step_after_a_resume_and_no_nan(finished_run, tmp_path, embedded_cache,
                                                                    dist_info):
    out = _copy(finished_run, tmp_path)
    reference = _strict_records(out / "metrics.jsonl")
    assert [r["step"] for r in reference if "loss" in r] == [1, 2, 3, 4]
    assert reference[0] == {"step": 0, "val/loss": None}  # validation off: NaN is written as null
    # A run killed after logging steps 3 and 4 but before saving step 4 (and a half-written line).
    shutil.rmtree(out / "checkpoints" / "step_00000004")
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "lo')
    run_sft(_run(tmp_path, embedded_cache, "run"), dist_info)
    again = _strict_records(out / "metrics.jsonl")
    assert [(r["step"], sorted(r)) for r in again] == [(r["step"], sorted(r)) for r in reference]
    assert [r["loss"] for r in again if "loss" in r] == [r["loss"] for r in reference if "loss" in r]
    # Resumed at its last step (killed after the final checkpoint): the final record is replaced, not repeated.
    run_sft(_run(tmp_path, embedded_cache, "run"), dist_info)
    assert [(r["step"], sorted(r)) for r in _strict_records(out / "metrics.jsonl")] == \
        [(r["step"], sorted(r)) for r in reference]
