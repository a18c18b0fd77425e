"""The memory planner (fastmath/planner.py): held to a real run, its architectures, its verdicts, and every shipped
GPU config against the GPUs its header names (the CI proof that they fit)."""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, subprocess_env

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
# Training configs for real models (the embedded demo, the eval-only and the token-scheduler configs aside).
GPU_CONFIGS = [c for c in CONFIGS if "\nmodel:" in c.read_text() and "name_or_path: embedded" not in c.read_text()
               and "stages: [eval]" not in c.read_text()]

# The sizes the model cards publish (rounded as they round them), in billions of parameters.
PUBLISHED_BILLIONS = {
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": 1.78,
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": 7.62,
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B": 14.8,
    "nvidia/OpenMath-Nemotron-14B": 14.8,
    "Qwen/Qwen3-14B": 14.8,
}


def test_the_plan_matches_a_real_two_process_step():
    """bench/plan_validation.py --quick: a real 2-process gloo SFT step (AC, 2 micro-batches per rank, AdamW) against
    the plan of the same config; the plan must be within 10% of the measured peak of both ranks."""
    done = subprocess.run([sys.executable, str(REPO / "bench" / "plan_validation.py"), "--quick"],
                          capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    row = json.loads(done.stdout[done.stdout.index("{"):done.stdout.rindex("}") + 1])
    for rank in row["measured"]:
        assert abs(row["predicted_peak_bytes"] / rank["peak_step_2"] - 1) <= 0.10, row
    # The plan's resident part is exact arithmetic: sharded fp32 parameters and two AdamW moments.
    by_category = row["predicted_by_category"]
    assert by_category["optimizer states"] >= 2 * by_category["parameters"]


@pytest.mark.parametrize("name", sorted(PUBLISHED_BILLIONS))
def test_shipped_architectures_have_the_published_sizes(name):
    import torch
    from transformers import AutoModelForCausalLM

    from fastmath.model import count_parameters
    from fastmath.planner import architecture_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(architecture_config(name))
    billions = count_parameters(model)["total"] / 1e9
    assert round(billions, 2 if billions < 10 else 1) == PUBLISHED_BILLIONS[name]


def test_an_unknown_hub_id_is_refused_with_the_known_ones_named():
    from fastmath.errors import ModelError
    from fastmath.planner import architecture_config

    with pytest.raises(ModelError, match="DeepSeek-R1-Distill-Qwen-14B"):
        architecture_config("someone/unknown-model")


def test_every_gpu_config_names_its_gpus():
    from fastmath.gpu_specs import GPUS
    from fastmath.planner import header_gpus

    for path in GPU_CONFIGS:
        gpus = header_gpus(str(path))
        assert gpus is not None, f"{path.name} has no '# GPUs: N node(s) x M <gpu>' header line"
        assert gpus[2] in GPUS, path.name


def _plan(config, *args, timeout=600):
    return subprocess.run([sys.executable, str(REPO / "fastmath" / "train.py"), "--config", str(config), "--plan",
                           *args], capture_output=True, text=True, env=subprocess_env(), timeout=timeout)


@pytest.mark.parametrize("config", GPU_CONFIGS, ids=lambda p: p.stem)
def test_every_gpu_config_fits_the_gpus_its_header_names(config):
    """The CI proof: each shipped GPU config's step, simulated at its world size, leaves 10% of the GPU free."""
    done = _plan(config)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert re.search(r"\| (sft|grpo) \|.*\| yes \|", done.stdout), done.stdout


def _plan_json(*args):
    done = subprocess.run([sys.executable, "-m", "fastmath.planner", "--json", *args], capture_output=True,
                          text=True, env=subprocess_env(), timeout=600)
    assert done.returncode in (0, 1), done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_gradient_sync_per_step_shows_the_full_gradient(embedded_cache):
    """parallel.gradient_sync=step keeps each rank's unsharded fp32 gradient until the last micro-batch: the plan
    shows it, world_size times the sharded gradient of the default (4 ranks here)."""
    base = ["--gpu", "h100-80gb", "--gpus-per-node", "4", f"run.cache_dir={embedded_cache}", "run.stages=[sft]",
            "sft.global_batch=8", "sft.tokens_per_micro_batch=256", "data.max_length=128"]
    (sharded,) = _plan_json(*base)["stages"]
    (full,) = _plan_json(*base, "parallel.gradient_sync=step")["stages"]
    params = sharded["parameters"]
    assert sharded["by_category"]["gradients"] == pytest.approx(4 * params / 4, rel=0.05)
    assert full["by_category"]["gradients"] >= 4 * params * 0.95


def test_a_run_that_cannot_fit_gets_one_line_with_its_largest_terms(embedded_cache):
    done = subprocess.run([sys.executable, "-m", "fastmath.planner", "--json", "--gpu-bytes", str(2**20),
                           "--gpu-name", "a 1 MiB GPU", "--gpus-per-node", "1", "--config",
                           str(REPO / "configs" / "demo.yaml"), f"run.cache_dir={embedded_cache}",
                           "run.stages=[sft]"], capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert done.returncode == 1, done.stderr[-2000:]
    verdict = json.loads(done.stdout.strip().splitlines()[-1])
    (problem,) = verdict["problems"]
    assert "a 1 MiB GPU" in problem and "largest:" in problem and "fix:" in problem
    assert math.isfinite(verdict["peaks"]["sft"])


def test_readme_memory_plan_table_is_the_newest_record():
    """docs/gpus.md's table is bench/memory_plans.py's rendering of its newest record (regenerate with --table)."""
    sys.path.insert(0, str(REPO / "bench"))
    import memory_plans

    from bench.common import load_records, results_path

    record = load_records(results_path("memory_plans", "cpu"))[-1]
    readme = (REPO / "docs" / "gpus.md").read_text(encoding="utf-8")
    start = readme.index("<!-- memory_plans table: generated by bench/memory_plans.py --table -->")
    end = readme.index("<!-- end of memory_plans table -->")
    assert readme[start:end].split("-->", 1)[1].strip() == memory_plans.table(record)
    planned = {Path(p["config"]).name for p in record["results"]}
    assert planned == {c.name for c in GPU_CONFIGS}, "a GPU config is missing from the record: rerun the bench"
