"""The benchmark harness's arithmetic and bookkeeping (bench/): FLOPs, MFU, the floor, timings, records, docs/performance.md."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

import bench_cross_entropy  # noqa: E402
import bench_sft_e2e as e2e  # noqa: E402
import common  # noqa: E402
import readme_performance  # noqa: E402

# Qwen/Qwen2.5-{0.5B,1.5B,7B}: the parameter counts their model cards publish.
PUBLISHED_PARAMETERS = {"qwen2.5-0.5b": 494_032_768, "qwen2.5-1.5b": 1_543_714_304, "qwen2.5-7b": 7_615_616_512}


@pytest.mark.parametrize("model", sorted(PUBLISHED_PARAMETERS))
def test_qwen25_shapes_have_the_published_parameter_counts(model):
    from transformers import AutoModelForCausalLM, Qwen2Config

    from fastmath.model import count_parameters

    counted = e2e.qwen2_parameters(**e2e.QWEN25[model])
    assert counted["total"] == PUBLISHED_PARAMETERS[model]
    with torch.device("meta"):  # the real module tree, no memory
        causal_lm = AutoModelForCausalLM.from_config(Qwen2Config(**e2e.QWEN25[model], **e2e.QWEN25_COMMON))
    assert count_parameters(causal_lm) == counted
    embed = e2e.QWEN25[model]["vocab_size"] * e2e.QWEN25[model]["hidden_size"]
    tied = e2e.QWEN25[model]["tie_word_embeddings"]
    assert counted["matmul"] == counted["total"] - (0 if tied else embed)


def test_step_flops_by_hand():
    # 6 * P * tokens + 6 * layers * d_attn * sum(L^2): 6*1000*10 + 6*2*8*(36+16) = 60000 + 4992
    assert e2e.step_flops(1000, [6, 4], n_layers=2, d_attn=8) == 64_992
    # Qwen2.5-0.5B, one 4096-token document: 6*494,032,768*4096 + 6*24*896*4096^2
    assert e2e.step_flops(494_032_768, [4096], 24, 896) == 12_141_349_306_368 + 2_164_663_517_184


def test_derive_tokens_per_second_and_mfu_at_the_median_step():
    steps = [{"seconds": 2.0, "tokens": 100, "flops": 4e12}, {"seconds": 1.0, "tokens": 100, "flops": 4e12},
             {"seconds": 4.0, "tokens": 100, "flops": 4e12}]
    out = e2e.derive(steps, peak_flops=4e12, datasheet_flops=None)
    assert out["step_s"] == {"min": 1.0, "median": 2.0, "max": 4.0, "n": 3}
    assert out["tokens_per_s"] == {"min": 25.0, "median": 50.0, "max": 100.0, "n": 3}
    assert out["tflops"]["median"] == 2.0
    assert out["mfu"] == 0.5  # 4e12 FLOPs in 2 s against a 4e12 FLOP/s peak
    assert out["mfu_datasheet"] is None  # unknown peak: no number, never a guess


def test_mfu_and_floor_by_hand():
    assert common.mfu(1e12, 0.5, 4e12) == 0.5
    assert common.mfu(1e12, 0.5, None) is None
    floor = {"matmul": {"tflops": 100.0}, "copy": {"gbps": 1000.0}}
    assert common.floor_ms(1e12, 1e9, floor) == pytest.approx(10.0)   # compute-bound: 1e12 / 1e14 s
    assert common.floor_ms(1e12, 2e10, floor) == pytest.approx(20.0)  # memory-bound: 2e10 / 1e12 s


def test_summarize_min_median_max():
    assert common.summarize([3.0, 1.0, 2.0]) == {"min": 1.0, "median": 2.0, "max": 3.0, "n": 3}
    assert common.summarize([4.0, 1.0, 2.0, 3.0])["median"] == 2.5
    with pytest.raises(ValueError):
        common.summarize([])


def test_cpu_timing_floor_and_memory_tracking():
    times = common.time_ms(lambda: torch.ones(100).sum(), "cpu", reps=3, warmup=1)
    assert len(times) == 3 and all(t >= 0 for t in times)
    rate = common.matmul_rate("cpu", torch.float32, n=64, reps=3)
    assert rate["shape"] == [64, 64, 64] and rate["tflops"] > 0
    assert common.copy_bandwidth("cpu", nbytes=2**20, reps=2)["gbps"] > 0
    kept = torch.ones(10)
    with common.PeakStorageBytes([kept]) as tracker:
        a = torch.empty(1000)  # 4000 bytes
        del a
        b = torch.empty(500)  # 2000 bytes, after a was freed
    assert tracker.peak == 4000 and tracker.live == 2000
    del b
    assert common.current_rss_bytes() > 0 and common.peak_rss_bytes() >= common.current_rss_bytes() // 2


def test_record_schema_and_append(tmp_path):
    record = common.new_record("demo_bench", "cpu", shapes=[1, 2])
    assert common.check_record(record) == []
    assert record["device"].startswith("CPU") and record["loadavg"]["end"] is None and record["results"] == []
    path = common.results_path("demo_bench", record["device"], tmp_path)
    assert path.name == "demo_bench-cpu.json"
    record["results"].append({"provider": "x", "time_ms": common.summarize([1.0, 2.0])})
    common.append_record(record, path)
    common.append_record(common.new_record("demo_bench", "cpu"), path)
    runs = json.loads(path.read_text())
    assert len(runs) == 2 and len(runs[0]["loadavg"]["end"]) == 3
    assert common.check_record({"benchmark": "x", "results": [{"t": {"median": 1}}]}) != []
    assert common.device_slug("NVIDIA H200") == "nvidia-h200"


def test_committed_results_are_well_formed():
    """Every record written through bench/common.py (those with a load average) has the full schema."""
    for path in common.RESULTS.glob("*.json"):
        for record in common.load_records(path):
            if "loadavg" in record:
                assert common.check_record(record) == [], path.name


def test_random_rows_fill_the_budget_exactly():
    rows = e2e.random_rows(20000, vocab=50, steps=3)
    for row in rows:
        lengths = [len(ids) for ids, mask in row]
        assert sum(lengths) == 20000 and max(lengths) <= 16384 and min(lengths) >= 1
        assert all(all(mask) for _, mask in row) and all(0 <= t < 50 for ids, _ in row for t in ids)


def test_readme_performance_section_is_the_generators_output():
    text = (REPO / "docs/performance.md").read_text()
    assert readme_performance.current_section(text) == readme_performance.render(), (
        "docs/performance.md's Performance section is stale: run `python bench/readme_performance.py --write`")


def test_readme_says_plainly_what_no_gpu_has_measured(tmp_path):
    for path in common.RESULTS.glob("*-cpu.json"):
        shutil.copy(path, tmp_path)
    assert "**Not yet measured on a GPU.**" in readme_performance.render(tmp_path)
    # A GPU record (made up here, in a temporary folder) gets its own table, and what it lacks is listed.
    record = common.new_record("sft_e2e", "cpu", precision="bf16 autocast, fp32 master weights")
    record["device"] = "NVIDIA H200"
    steps = [{"seconds": 1.0, "tokens": 4096, "flops": 1e14}]
    record["results"] = [dict(provider="fastmath", config="qwen2.5-0.5b@4096", loss_first=12.0, peak_memory_gib=10.0,
                              flops_per_step=1e14, **e2e.derive(steps, 5e14, None)),
                         dict(provider="trl", config="qwen2.5-0.5b@4096", error="not installed: trl")]
    common.append_record(record, tmp_path / "sft_e2e-nvidia-h200.json")
    section = readme_performance.render(tmp_path)
    assert "Measured on **NVIDIA H200**" in section
    assert "| qwen2.5-0.5b@4096 | fastmath | 4,096 (4,096-4,096) | 20.0%" in section  # MFU: 1e14 / 1 s / 5e14
    assert "Not yet measured on a GPU: the measured matmul rate" in section and "qwen2.5-7b@32768" in section


def test_cross_entropy_chunk_budgets_are_measured_and_shown(tmp_path):
    """--chunk-mib adds fastmath@<M>MiB providers to the run (each measured with its own chunk budget), and the
    docs/performance.md rows show them beside the baselines."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_cross_entropy.py"), "--sizes", "600x16x1000",
                           "--providers", "torch,fastmath", "--chunk-mib", "1,2", "--reps", "1", "--no-plot",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    record = json.loads((tmp_path / "cross_entropy-cpu.json").read_text())[-1]
    rows = {r["provider"]: r for r in record["results"]}
    assert set(rows) == {"torch", "fastmath", "fastmath@1MiB", "fastmath@2MiB"}
    assert all("time_ms" in row for row in rows.values())
    # 1 MiB of fp32 logits at V = 1000 is 262 rows: 3 chunks of the 600, each holding a [262, V] buffer; the
    # default 64 MiB takes all 600 rows in one chunk, so its extra memory is larger.
    assert rows["fastmath@1MiB"]["extra_mib"] < rows["fastmath"]["extra_mib"]
    cells = " ".join(" ".join(row) for row in readme_performance.cross_entropy_rows(record))
    assert "fastmath with 1MiB chunks" in cells and "fastmath with 2MiB chunks" in cells
    with pytest.raises(SystemExit, match="--chunk-mib"):
        bench_cross_entropy.parse_chunk_mib("512,big")
    with pytest.raises(SystemExit, match=">= 1 MiB"):
        bench_cross_entropy.parse_chunk_mib("0")


def test_a_stopped_benchmark_appends_what_it_measured(tmp_path):
    """The per-shape loop every kernel benchmark uses: a run stopped midway (here: an error in the third shape)
    still appends its first two shapes' rows, and says it stopped after 2 of 3."""
    def measure(shape):
        if shape == 3:
            raise KeyboardInterrupt
        return [{"shape": shape, "provider": p} for p in ("a", "b")]

    record, path = {"results": [], "loadavg": {"start": None}}, tmp_path / "x-cpu.json"
    with pytest.raises(KeyboardInterrupt):
        common.measure_and_append(record, path, [1, 2, 3], measure, lambda row: row["shape"])
    (saved,) = json.loads(path.read_text())
    assert [r["shape"] for r in saved["results"]] == [1, 1, 2, 2]
    assert saved["interrupted"] == "stopped after 2 of 3 shapes"
    assert common.measure_and_append({"results": []}, tmp_path / "y.json", [], measure, len) is None
    assert not (tmp_path / "y.json").exists()  # nothing measured, nothing written


def test_plot_writes_pngs(tmp_path):
    import plot

    for name in ("sft_e2e-cpu.json", "cross_entropy-cpu.json"):
        shutil.copy(common.RESULTS / name, tmp_path)
        written = plot.plot_file(tmp_path / name)
        assert written and all(p.stat().st_size > 0 for p in written)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is what a machine without CUDA does")
def test_gpu_suite_dry_run_skips_every_gpu_stage(tmp_path):
    floor_file = common.RESULTS / "floor-cpu.json"
    before = (set(common.RESULTS.iterdir()), floor_file.exists() and floor_file.stat().st_mtime)
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_suite.sh")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = (tmp_path / "summary.txt").read_text()
    for stage in ("tests", "cross_entropy", "attention", "sft_e2e"):
        assert f"| {stage} | skipped: no CUDA device" in summary
    assert "| floor-cpu | ok |" in summary
    # A dry run saves nothing (others may write bench/results meanwhile: look only at what the suite could write)
    assert set(common.RESULTS.iterdir()) <= before[0] | {p for p in common.RESULTS.iterdir() if "floor" not in p.name}
    assert (floor_file.exists() and floor_file.stat().st_mtime) == before[1]
