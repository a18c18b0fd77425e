#!/usr/bin/env bash
# The GPU suite: everything a lent GPU should measure for fastmath, in one script that ends inside 8 minutes.
#
#   bash bench/gpu_suite.sh                 # on a GPU machine (or a dry run on CPU: every GPU stage skipped)
#   SUITE_SECONDS=400 bash bench/gpu_suite.sh
#   bash bench/gpu_suite.sh --check         # any machine, ~1 min: every stage's script imports, its command line
#                                           # parses and the presets it names exist (bench/suite_check.py), and
#                                           # the test files collect; exits 1 on the first stage that would fail
#
# Stages, in order, each under its own time cap cut to what is left of the budget (SUITE_SECONDS, default 470):
#   1. device    nvidia-smi, torch / triton / transformers versions, which optional packages are importable
#   2. floor     bench/common.py: bf16 8192^3 matmul TFLOP/s and 2 GiB copy GB/s  -> bench/results/floor-<gpu>.json
#   3. tests     the CUDA correctness tests of every kernel, bf16 included (pytest: test_cross_entropy,
#                test_attention, test_hf_packed, and the GRPO kernels' test_grpo_*.py files)
#   4. kernels   bench_cross_entropy.py --sizes gpu-quick --chunk-mib 2048,4096 (the default 512 MiB chunk
#                against larger ones); bench_attention.py --quick --plot
#   5. e2e       bench_sft_e2e.py --preset gpu-quick: one SFT step of Qwen2.5-style 0.5B and 1.5B at 4k and 16k
#                tokens, fastmath vs HF vs Liger vs TRL (each present package), with its own time budget
#   6. grpo      bench_grpo.py --quick, when that file exists and has a --quick option
#   then bench/plot.py, the docs/performance.md Performance section rendered from the new results (not written to
#   docs/performance.md here), and a short table.
# A stage that fails or runs out of time is reported and the next one runs; benchmarks keep what they
# measured before a timeout (they save on SIGTERM).
#
# Output: results are appended to bench/results/ (JSON + PNG) as usual. When $OUT is set (the device tool),
# the suite also leaves there, within the tool's 8-file limit: suite.log (everything printed),
# results.tar.gz (bench/results/ and the stage logs), performance.md (the regenerated docs/performance.md section) and
# summary.txt (the final table). Without $OUT they go to a fresh folder under ${TMPDIR:-/tmp}.
#
# The GPU image (torch 2.11, Triton 3.6, transformers 5.17) has no vLLM, flash-attn, Liger-Kernel, TRL or
# datasets: those baselines are skipped with a note unless their wheels are carried in .whl/ (installed
# here with pip --no-index into /tmp/site). To carry them (on this machine, once; .whl/ must be git-ignored):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl liger-kernel==0.8.5 trl==1.16.0 datasets==5.2.0 dill multiprocess
#   (then run with carry [".whl"]; the image already has accelerate, pyarrow, pandas, xxhash, fsspec)
# On a machine without CUDA the suite is a dry run: it prints the device, runs the floor measurement at small
# sizes (printed, not saved) and the plan, and skips every GPU stage with the reason, writing nothing to
# bench/results/.

set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CHECK=0
if [ "${1:-}" = "--check" ]; then CHECK=1
elif [ $# -gt 0 ]; then echo "usage: bash bench/gpu_suite.sh [--check]" >&2; exit 2; fi
BUDGET="${SUITE_SECONDS:-470}"
RESERVE=15  # seconds kept for plots, docs/performance.md render and packing the results

if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# The stages' command lines (script and arguments), shared by the run and by --check.
FLOOR=(bench/common.py)
CROSS_ENTROPY=(bench/bench_cross_entropy.py --sizes gpu-quick --chunk-mib 2048,4096)
ATTENTION=(bench/bench_attention.py --quick --plot)
SFT_E2E=(bench/bench_sft_e2e.py --preset gpu-quick)  # the run adds --time-budget, cut to what is left
TESTS=(tests/test_cross_entropy.py tests/test_attention.py tests/test_hf_packed.py)
TESTS+=(tests/test_grpo_advantages.py tests/test_grpo_logprobs.py tests/test_grpo_policy_loss.py
       tests/test_grpo_fused_loss.py tests/test_grpo_inputs.py)

if (( CHECK )); then
  echo "=== gpu_suite --check (python $PY): scripts import, command lines parse, presets exist, tests collect"
  checks=("${FLOOR[*]}" "${CROSS_ENTROPY[*]}" "${ATTENTION[*]}" "${SFT_E2E[*]} --time-budget 140"
          "bench/plot.py" "bench/readme_performance.py")
  [ -f bench/bench_grpo.py ] && checks+=("bench/bench_grpo.py --quick")
  for stage in "${checks[@]}"; do
    # shellcheck disable=SC2086  # each entry is a script and its words
    "$PY" bench/suite_check.py $stage || { echo "gpu_suite --check: FAILED: $stage"; exit 1; }
  done
  "$PY" -m pytest --collect-only -q -p no:cacheprovider "${TESTS[@]}" >/dev/null \
    || { echo "gpu_suite --check: FAILED: collecting ${TESTS[*]}"; exit 1; }
  echo "ok: tests collect: ${TESTS[*]}"
  echo "gpu_suite --check: every stage would start"
  exit 0
fi

if [ -n "${OUT:-}" ]; then WORK="$OUT"; else WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")"; fi
LOGS="$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite_logs.XXXXXX")"
exec > >(tee "$WORK/suite.log") 2>&1
TEE_PID=$!

if ls .whl/*.whl >/dev/null 2>&1; then
  echo "installing carried wheels: $(ls .whl | tr '\n' ' ')"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  then export PYTHONPATH="/tmp/site:$PYTHONPATH"
  else echo "NOTE: carried wheels failed to install; their baselines will be skipped"; fi
fi

NAMES=(); STATUS=(); TIMES=()
record() { NAMES+=("$1"); STATUS+=("$2"); TIMES+=("$3"); }

# run_stage NAME CAP_SECONDS COMMAND...: run under `timeout` with min(CAP, what is left), log to $LOGS/NAME.log
run_stage() {
  local name="$1" cap="$2"; shift 2
  local left=$(( BUDGET - SECONDS - RESERVE ))
  (( cap > left )) && cap=$left
  if (( cap < 20 )); then
    echo "=== $name: SKIPPED (only ${left}s of the ${BUDGET}s budget left)"
    record "$name" "skipped: out of time" 0
    return
  fi
  echo "=== $name (at most ${cap}s): $*"
  local start=$SECONDS rc
  timeout -k 10 "$cap" "$@" 2>&1 | tee "$LOGS/$name.log"
  rc=${PIPESTATUS[0]}
  local took=$(( SECONDS - start ))
  if (( rc == 0 )); then record "$name" "ok" "$took"
  elif (( rc == 124 || rc == 137 )); then record "$name" "TIMED OUT after ${cap}s" "$took"
  else record "$name" "FAILED (exit $rc)" "$took"; fi
}

# 1. Device ----------------------------------------------------------------------------------------------
echo "=== device  ($(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET}s, python $PY)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>/dev/null \
  || echo "nvidia-smi: not available"
"$PY" - <<'EOF'
import importlib.metadata, torch
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
          f"capability {p.major}.{p.minor}")
for name in ("triton", "transformers", "liger-kernel", "trl", "datasets", "accelerate", "flash-attn", "vllm"):
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        version = "not installed (what needs it is skipped)"
    print(f"  {name:13s} {version}")
raise SystemExit(0 if torch.cuda.is_available() else 3)
EOF
probe=$?
CUDA=$(( probe == 0 ))
if (( probe != 0 && probe != 3 )); then
  echo "NOTE: the device probe failed (exit $probe): treating this machine as having no GPU"
fi

GRPO=()
if [ -f bench/bench_grpo.py ]; then
  if "$PY" bench/bench_grpo.py --help 2>/dev/null | grep -q -- "--quick"; then GRPO=("$PY" bench/bench_grpo.py --quick)
  else echo "NOTE: bench/bench_grpo.py has no --quick option; the GRPO benchmark is left out of the suite"; fi
else
  echo "NOTE: bench/bench_grpo.py does not exist yet; no GRPO benchmark"
fi

if (( CUDA == 0 )); then
  # Dry run: the floor measurement at small sizes (nothing saved) and the plan, every GPU stage skipped.
  echo "=== no CUDA device: dry run; every GPU stage below is skipped"
  run_stage floor-cpu 60 "$PY" "${FLOOR[@]}" --quick
  reason="skipped: no CUDA device"
  record tests "$reason (would run: pytest -q ${TESTS[*]})" 0
  record cross_entropy "$reason (would run: ${CROSS_ENTROPY[*]})" 0
  record attention "$reason (would run: ${ATTENTION[*]})" 0
  record sft_e2e "$reason (would run: ${SFT_E2E[*]})" 0
  if (( ${#GRPO[@]} )); then record grpo "$reason (would run: ${GRPO[*]:1})" 0; fi
else
  # 2-6. The GPU stages ------------------------------------------------------------------------------------
  run_stage floor 60 "$PY" "${FLOOR[@]}"
  run_stage tests 150 "$PY" -m pytest -q -rfEs --durations=10 -p no:cacheprovider "${TESTS[@]}"
  run_stage cross_entropy 75 "$PY" "${CROSS_ENTROPY[@]}"
  run_stage attention 60 "$PY" "${ATTENTION[@]}"
  grpo_share=$(( ${#GRPO[@]} ? 45 : 0 ))
  e2e_cap=$(( BUDGET - SECONDS - RESERVE - grpo_share ))
  (( e2e_cap > 180 )) && e2e_cap=180
  run_stage sft_e2e "$e2e_cap" "$PY" "${SFT_E2E[@]}" --time-budget $(( e2e_cap - 40 ))
  if (( ${#GRPO[@]} )); then run_stage grpo 45 "${GRPO[@]}"; fi
  "$PY" bench/plot.py >"$LOGS/plot.log" 2>&1 || echo "NOTE: plotting failed (see plot.log)"
  "$PY" bench/readme_performance.py >"$WORK/performance.md" 2>"$LOGS/readme.log" \
    && echo "docs/performance.md Performance section rendered from these results: performance.md (docs/performance.md not touched)"
  tar czf "$WORK/results.tar.gz" bench/results -C "$LOGS" . 2>/dev/null || echo "NOTE: packing the results failed"
fi

# Summary --------------------------------------------------------------------------------------------------
{
  echo
  echo "| stage | status | seconds |"
  echo "|---|---|---|"
  for i in "${!NAMES[@]}"; do echo "| ${NAMES[$i]} | ${STATUS[$i]} | ${TIMES[$i]} |"; done
  echo "suite: ${SECONDS}s of ${BUDGET}s; output in $WORK"
} | tee "$WORK/summary.txt"
if (( CUDA == 1 )); then
  for f in bench/results/sft_e2e-*.json; do
    [ -f "$f" ] && [[ "$f" != *-cpu.json ]] && "$PY" - "$f" <<'EOF'
import json, sys
sys.path.insert(0, "bench")
from bench_sft_e2e import summary_table
print(summary_table(json.load(open(sys.argv[1]))[-1]))
EOF
  done
fi
rm -rf "$LOGS"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null  # suite.log complete before the script returns
exit 0
