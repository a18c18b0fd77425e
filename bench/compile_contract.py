"""The compile-time contract of the Triton kernels: what each launch needs on a GPU, measured without one.

Every config a kernel may launch is compiled here for an NVIDIA target (sm_90 = H100/H200, sm_80 = A100) by
Triton's own compiler, down to a cubin, on a CPU-only machine. Two numbers decide whether a config can run
well there, and both are known before any GPU time is spent:

    shared memory  `metadata.shared` of the compiled kernel (bytes of dynamic shared memory per block). A
                   config above the target's per-block limit fails to launch; the kernels prune such configs
                   before autotuning, per head dim (kernels/attention.py: `configs_for`).
    registers      `ptxas -v` on the kernel's PTX (Triton runs it with -v; `TRITON_DUMP_PTXAS_LOG` makes it
                   print the log): registers per thread, and the bytes spilled to local memory when 255
                   registers per thread are not enough. A spill turns register traffic into memory traffic
                   inside the inner loop, the usual reason a flash-attention kernel runs at half speed.

The contract (tests/test_compile_contract.py): every kept config fits shared memory on sm_90 and sm_80, and
at head dims 64 and 128 (bf16, fp16) spills nothing. Compiling takes 1-4 s per case on one CPU core, so the
test covers a representative subset (`ci_cases`) and `python bench/compile_contract.py` the full matrix,
printing docs/kernels.md's table (`--markdown`).

    python bench/compile_contract.py              # the full matrix, one line per case
    python bench/compile_contract.py --markdown   # docs/kernels.md's table (kernel x head dim: shared, registers, spills)
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("compile_contract: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the launch default; silences Triton 3.9's notice
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import kernels.attention as attention  # noqa: E402
import kernels.cross_entropy as cross_entropy  # noqa: E402
import kernels.grpo_logprobs as grpo_logprobs  # noqa: E402
from kernels.chunking import row_tile  # noqa: E402

# Dynamic shared memory one block may use (CUDA programming guide, "Technical Specifications per Compute
# Capability"): 227 KiB on compute capability 9.0, 163 KiB on 8.0.
SHARED_LIMIT = {90: 232_448, 80: 166_912}
HEAD_DIMS = (64, 128, 256)
NO_SPILL_HEAD_DIMS = (64, 128)
# Mask kinds of the attention kernels: (MASK_LOWER, MASK_UPPER, SOFTCAP).
VARIANTS = {
    "full": (False, False, False),
    "causal": (False, True, False),
    "window": (True, True, False),
    "softcap": (False, True, True),
}
ATTENTION_KERNELS = {"forward": "_varlen_fwd_kernel", "dkdv": "_varlen_bwd_dkdv_kernel", "dq": "_varlen_bwd_dq_kernel"}


@dataclass(frozen=True)
class Case:
    """One compilation: a kernel, its argument types, compile-time values and launch options, for one target."""

    module: str  # "attention" | "cross_entropy" | "grpo_logprobs"
    kernel: str  # the jit function's name in that module
    label: str  # what docs/kernels.md's table calls the row
    head_dim: int | None
    variant: str
    dtype: str  # Triton's name: bf16, fp16, fp32
    types: tuple  # ((argument, Triton type), ...) for the runtime arguments
    constexprs: tuple  # ((argument, value), ...)
    num_warps: int
    num_stages: int
    capability: int = 90
    # Integer arguments every launch passes as a multiple of 16 (Triton specialises them so): the row kernels'
    # logits row stride (kernels.chunking.padded_row_stride).
    multiples_of_16: tuple = ()

    def config_name(self) -> str:
        blocks = ",".join(f"{k}={v}" for k, v in self.constexprs if k.startswith("BLOCK") and k != "BLOCK_D")
        return f"{blocks} w{self.num_warps} s{self.num_stages}"


@dataclass(frozen=True)
class Resources:
    shared: int  # bytes of dynamic shared memory per block
    registers: int  # per thread
    spill_stores: int  # bytes per thread
    spill_loads: int
    seconds: float  # compile time on this machine

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


_PTXAS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")


@functools.lru_cache(maxsize=None)
def compile_case(case: Case) -> Resources:
    """Compile `case` for its target (no GPU needed) and read shared memory and the ptxas register report."""
    module = {"attention": attention, "cross_entropy": cross_entropy, "grpo_logprobs": grpo_logprobs}[case.module]
    jit = getattr(module, case.kernel)
    while not isinstance(jit, triton.runtime.JITFunction):  # an autotuned kernel wraps the jit function
        jit = jit.fn
    types, constexprs = dict(case.types), dict(case.constexprs)
    missing = set(jit.arg_names) - set(types) - set(constexprs)
    assert not missing, f"{case.kernel}: no type for {sorted(missing)}"
    signature = {name: "constexpr" if name in constexprs else types[name] for name in jit.arg_names}
    # Pointers from torch's allocator are 16-byte aligned; the launcher tells Triton so at run time too.
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(jit.arg_names)
             if signature[name][0] == "*" or name in case.multiples_of_16}
    source = ASTSource(jit, signature, {(jit.arg_names.index(k),): v for k, v in constexprs.items()}, attrs)
    log = io.StringIO()
    start = time.perf_counter()
    with _ptxas_log(), contextlib.redirect_stdout(log):
        compiled = triton.compile(
            source, target=GPUTarget("cuda", case.capability, 32),
            options={"num_warps": case.num_warps, "num_stages": case.num_stages},
        )  # fmt: skip
    seconds = time.perf_counter() - start
    report = log.getvalue()
    spills = _PTXAS.search(report)
    registers = _REGISTERS.search(report)
    assert spills and registers, f"{case.kernel}: no ptxas -v report in the compile log:\n{report[-2000:]}"
    return Resources(compiled.metadata.shared, int(registers[1]), int(spills[1]), int(spills[2]), seconds)


@contextlib.contextmanager
def _ptxas_log():
    """Make Triton run ptxas (no cache hit: a cached cubin comes without a log) and print its -v report (it runs
    ptxas with -v and keeps the log unless asked)."""
    nvidia, compilation = triton.knobs.nvidia, triton.knobs.compilation
    before = nvidia.dump_ptxas_log, compilation.always_compile
    nvidia.dump_ptxas_log, compilation.always_compile = True, True
    try:
        yield
    finally:
        nvidia.dump_ptxas_log, compilation.always_compile = before


# ----------------------------------------------------------------------------------------------------
# The cases
# ----------------------------------------------------------------------------------------------------


def _attention_types(kernel: str, dtype: str) -> tuple:
    """Argument types as a launch sees them: tensors of `dtype`, fp32 lse/delta, int32 offsets, sizes and
    strides as int32, scales fp32."""
    jit = getattr(attention, kernel).fn
    types = {}
    for name in jit.arg_names:
        if name in ("LSE", "DELTA"):
            types[name] = "*fp32"
        elif name.startswith("CU_"):
            types[name] = "*i32"
        elif name.isupper() and len(name) <= 2:
            types[name] = f"*{dtype}"
        elif name.endswith("scale"):
            types[name] = "fp32"
        elif not name.isupper():
            types[name] = "i32"
    return tuple(types.items())


def attention_cases(head_dims=HEAD_DIMS, dtypes=("bf16", "fp16"), variants=tuple(VARIANTS), capability=90):
    """Every config the attention kernels keep for each head dim, mask kind and dtype."""
    cases = []
    for label, kernel in ATTENTION_KERNELS.items():
        for head_dim in head_dims:
            for config in attention.configs_for(label, head_dim):
                for variant in variants:
                    lower, upper, softcap = VARIANTS[variant]
                    for dtype in dtypes:
                        constexprs = dict(
                            HEAD_DIM=head_dim, BLOCK_D=attention.block_d(head_dim), MASK_LOWER=lower,
                            MASK_UPPER=upper, SOFTCAP=softcap, DOT_PRECISION=attention.DOT_PRECISION,
                            **config.kwargs,
                        )  # fmt: skip
                        cases.append(Case(
                            "attention", kernel, f"attention {label}", head_dim, variant, dtype,
                            _attention_types(kernel, dtype), tuple(constexprs.items()), config.num_warps,
                            config.num_stages, capability,
                        ))  # fmt: skip
    return cases


def cross_entropy_cases(vocab_sizes=(3000, 50257, 151936), dtypes=("bf16", "fp16", "fp32"), capability=90):
    """The cross-entropy row kernel with every switch on, at the tile and warps it picks for each V."""
    jit = cross_entropy._cross_entropy_kernel
    cases = []
    for v in vocab_sizes:
        block_v, num_warps = row_tile(v)
        for dtype in dtypes:
            types = [f"*{dtype}", f"*{dtype}", "*i64", "*fp32", "*fp32", "*fp32", "i32", "i32", "i32", "i32"]
            types += ["fp32"] * 4
            constexprs = dict(HAS_BIAS=True, HAS_SOFTCAP=True, HAS_SMOOTHING=True, WRITE_GRAD=True, BLOCK_V=block_v)
            cases.append(Case(
                "cross_entropy", "_cross_entropy_kernel", "cross-entropy rows", None, f"V={v}", dtype,
                tuple(zip(jit.arg_names, types)), tuple(constexprs.items()), num_warps, 1, capability,
                ("logits_row_stride",),
            ))  # fmt: skip
    return cases


GRPO_ROW_KERNELS = {"_logprob_rows_kernel": "GRPO log-prob rows", "_logprob_grad_rows_kernel": "GRPO dlogits rows"}


def grpo_row_cases(vocab_sizes=(3000, 50257, 151936), dtypes=("bf16", "fp16", "fp32"), capability=90):
    """The GRPO row kernels (kernels/grpo_logprobs.py: the fused log-probs and losses), entropy on, at the tile
    and warps kernels.chunking.row_tile picks for each V: logits of the input dtype, fp32 row vectors."""
    cases = []
    for kernel, label in GRPO_ROW_KERNELS.items():
        jit = getattr(grpo_logprobs, kernel)
        for v in vocab_sizes:
            block_v, num_warps = row_tile(v)
            for dtype in dtypes:
                types = {name: "*i64" if name == "targets_ptr" else f"*{dtype}" if name == "logits_ptr"
                         else "*fp32" if name.endswith("_ptr") else "i32" if name in ("n_cols", "logits_row_stride")
                         else "fp32" for name in jit.arg_names if not name.isupper()}  # fmt: skip
                constexprs = dict(BLOCK_V=block_v, **{flag: True for flag in ("ENTROPY", "ENTROPY_GRAD") if flag in jit.arg_names})
                cases.append(Case(
                    "grpo_logprobs", kernel, label, None, f"V={v}", dtype, tuple(types.items()),
                    tuple(constexprs.items()), num_warps, 1, capability, ("logits_row_stride",),
                ))  # fmt: skip
    return cases


def full_matrix():
    """Everything: both targets, every head dim, mask kind and 16-bit dtype, and fp32 (tf32) at sm_90."""
    cases = []
    for capability in SHARED_LIMIT:
        cases += attention_cases(capability=capability)
        cases += cross_entropy_cases(capability=capability)
        cases += grpo_row_cases(capability=capability)
    cases += attention_cases(dtypes=("fp32",), variants=("causal",))
    return cases


def ci_cases():
    """The subset CI compiles (about 2 minutes of CPU time on one core): every kept attention config in bf16, in
    the heaviest mask kind (softcap: a causal mask plus the live tanh tile in both backward kernels), at every
    head dim on sm_90 and at 64 and 128 on sm_80; the row kernels at three vocabularies. The full matrix adds the
    other mask kinds, fp16, fp32 and head dim 256 on sm_80."""
    cases = attention_cases(dtypes=("bf16",), variants=("softcap",))
    cases += attention_cases(head_dims=NO_SPILL_HEAD_DIMS, dtypes=("bf16",), variants=("softcap",), capability=80)
    cases += cross_entropy_cases(dtypes=("bf16",))
    cases += grpo_row_cases(dtypes=("bf16",))
    return cases


def violations(case: Case, res: Resources) -> list[str]:
    """What breaks the contract in one compiled case (empty when it holds)."""
    problems = []
    limit = SHARED_LIMIT[case.capability]
    if res.shared > limit:
        problems.append(f"needs {res.shared} B of shared memory, sm_{case.capability} allows {limit}")
    spill_checked = case.head_dim is None or case.head_dim in NO_SPILL_HEAD_DIMS
    if spill_checked and case.dtype != "fp32" and res.spills:
        problems.append(f"spills {res.spill_stores} B stored / {res.spill_loads} B loaded per thread")
    return problems


# ----------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------


def markdown_table(cases) -> str:
    """Per kernel and head dim at sm_90 (bf16, every mask kind): the range over the kept configs of shared
    memory, registers and spilled bytes, and how many configs are kept."""
    rows = {}
    for case in cases:
        if case.capability != 90 or case.dtype != "bf16":
            continue
        res = compile_case(case)
        key = (case.label, case.head_dim if case.head_dim is not None else case.variant)
        rows.setdefault(key, {"configs": set(), "shared": [], "registers": [], "spills": []})
        row = rows[key]
        row["configs"].add(case.config_name())
        row["shared"].append(res.shared)
        row["registers"].append(res.registers)
        row["spills"].append(res.spills)

    def span(values, unit=""):
        lo, hi = min(values), max(values)
        return f"{lo}{unit}" if lo == hi else f"{lo}-{hi}{unit}"

    lines = [
        f"Compiled by Triton {triton.__version__} for sm_90, bf16 (ranges over the kept configs):",
        "",
        "| kernel | head dim / V | configs | shared memory (KiB) | registers / thread | spilled bytes / thread |",
        "|---|---|---|---|---|---|",
    ]
    for (label, size), row in rows.items():
        shared_kib = [round(s / 1024, 1) for s in row["shared"]]
        lines.append(f"| {label} | {size} | {len(row['configs'])} | {span(shared_kib)} | {span(row['registers'])} "
                     f"| {span(row['spills'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print docs/kernels.md's table instead of every case")
    parser.add_argument("--ci", action="store_true", help="only the subset the test compiles")
    args = parser.parse_args(argv)
    cases = ci_cases() if args.ci else full_matrix()
    if args.markdown:
        print(markdown_table(cases))
        return 0
    broken = 0
    for case in cases:
        res = compile_case(case)
        problems = violations(case, res)
        broken += bool(problems)
        head = f"D={case.head_dim}" if case.head_dim is not None else ""
        print(f"sm_{case.capability} {case.label:20s} {head:6s} {case.variant:8s} {case.dtype:5s} "
              f"{case.config_name():28s} shared {res.shared:7d} regs {res.registers:3d} spills {res.spills:5d} "
              f"{res.seconds:5.1f}s {'; '.join(problems)}", flush=True)
    print(f"{len(cases)} cases, {broken} break the contract")
    return 1 if broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
