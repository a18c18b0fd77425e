"""Fuzz every public kernel function: random shapes, options and values, the Triton path against the reference.

    nice -n 10 OMP_NUM_THREADS=1 .venv/bin/python bench/fuzz_kernels.py --cases-per-function 1000
    .venv/bin/python bench/fuzz_kernels.py --functions varlen_attention --cases-per-function 50 --seed 3
    .venv/bin/python bench/fuzz_kernels.py --replay bench/results/fuzz_kernels-cpu.json   # the last run's failures
    .venv/bin/python bench/fuzz_kernels.py --replay '{"function": "grpo_loss", "params": {...}}'

The generator is a seeded numpy RNG (no hypothesis): case i of function f under --seed s draws its parameters
from `numpy.random.default_rng([s, index of f, i])`, and its tensors from a torch generator seeded by the
parameter `seed`. A case is therefore its parameters alone (JSON); a failure is recorded with them and
`--replay` runs it again. On CPU the script turns Triton's interpreter on before triton is imported.

Each case runs in fp32 or fp16 (drawn) three times:
    triton     the public function, backend="triton", inputs in the case's dtype;
    same       the public function, backend="reference" (the PyTorch path), the same inputs;
    truth      the definition (`*_reference`, or the reference path) on those inputs converted to float64.
Every output and every gradient (of a fixed random fp64 weighting of the outputs) of `triton` must lie within
    2 * max|same - truth| + floor
of the truth (the project's tolerance rule, tests/tolerances.py: the kernel errs at most about twice as much as PyTorch in the same dtype),
where the floor comes from tests/tolerances.py: two evaluation orders of `chain` chained fp32 reductions of the
case's longest length, plus, in fp16, `chain` roundings to fp16 (the Triton path stores logits and attention
probabilities in the input dtype, as HF eager does, where the reference keeps fp32), all at the magnitude of
the compared tensor times the case's logit scale (max |logit| / T: a rounding of a logit moves a log-softmax by
that much). Counts (clipped tokens, zero-variance groups, +inf log-sum-exps) must match exactly; GRPO cases keep
every log-ratio a safe distance from the clip edges, where an O(u) difference legitimately flips a clip.
bf16 is not fuzzed: the interpreter's bf16 tl.dot is wrong (docs/design.md); bf16 needs a GPU run of this script.
"""
import os
import sys

if __name__ == "__main__":  # the interpreter must be on before triton is first imported (kernels/dispatch.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import common  # noqa: E402
from kernels.attention import varlen_attention, varlen_attention_reference  # noqa: E402
from kernels.cross_entropy import (  # noqa: E402
    cross_entropy,
    cross_entropy_reference,
    fused_linear_cross_entropy,
    linear_cross_entropy_reference,
)
from kernels.grpo import (  # noqa: E402
    fused_linear_grpo_loss,
    fused_linear_logprobs,
    group_advantages,
    group_advantages_reference,
    grpo_loss,
    grpo_loss_reference,
    linear_grpo_loss_reference,
    linear_logprobs_reference,
)
from tests.tolerances import reduction_atol, tiny_atol, unit_roundoff  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
MODES = ("triton", "same", "truth")
ROWS = (1, 2, 3, 5, 7, 8, 13, 17, 31)
VOCAB = (1, 2, 3, 5, 11, 16, 17, 31, 64, 97, 131)
WIDTH = (1, 2, 3, 5, 8, 13, 16, 33)
# The row kernels take the vocabulary in tiles of at most 8,192 columns (kernels' _MAX_BLOCK_V): one case in ten
# has a vocabulary of two tiles, so the online max / sum rescaling between tiles runs too (with few rows).
WIDE_VOCAB = (8193, 9001)
EXACT = {"tokens", "low_clipped", "high_clipped", "zero_variance", "lse_is_inf"}


# ----------------------------------------------------------------------------------------------------
# The comparison
# ----------------------------------------------------------------------------------------------------


@dataclass
class Bound:
    """What the floor of a case's comparison depends on: its longest reduction, how many reductions are chained,
    the logit scale, and whether every tensor counts as at least magnitude 1 (attention: outputs are convex
    combinations of values of size ~1, so an absolute floor at that size is the natural one)."""

    length: int
    chain: int
    scale: float = 1.0
    unit_magnitude: bool = False
    magnitudes: dict = field(default_factory=dict)  # name -> the sum of |terms| where a result may cancel to 0


def floor_for(dtype: torch.dtype, magnitude: float, bound: Bound) -> float:
    """tests/tolerances.py's reordering bound in fp32, plus `chain` roundings to a 16-bit input dtype."""
    floor = reduction_atol(torch.float32, bound.length, magnitude, bound.chain) + tiny_atol(torch.float32)
    if dtype != torch.float32:
        floor += bound.chain * unit_roundoff(dtype) * magnitude
    return floor


def compare(name: str, ours, same, truth, dtype: torch.dtype, bound: Bound) -> str | None:
    """None when `ours` is within 2 * (same's error) + floor of `truth`; else one line saying where it is not."""
    if ours.shape != truth.shape:
        return f"{name}: shape {tuple(ours.shape)} != {tuple(truth.shape)}"
    if ours.dtype != same.dtype:
        return f"{name}: dtype {ours.dtype}, the reference path gives {same.dtype}"
    if name in EXACT or not truth.dtype.is_floating_point:
        if torch.equal(ours.double(), truth.double()):
            return None
        return f"{name}: {ours.tolist()} != {truth.tolist()} (exact)"
    ours, same, truth = ours.double(), same.double(), truth.double()
    inf = torch.isinf(truth)
    if not torch.equal(torch.isinf(ours), inf) or not torch.equal(ours[inf], truth[inf]):
        return f"{name}: infinities at other places than the truth's"
    ours, same, truth = (t.masked_fill(inf, 0.0) for t in (ours, same, truth))
    if not torch.isfinite(ours).all():
        return f"{name}: non-finite values where the truth is finite"
    if truth.numel() == 0:
        return None
    magnitude = max(truth.abs().max().item(), bound.magnitudes.get(name, 0.0))
    if truth.dim() == 0 or bound.unit_magnitude:
        magnitude = max(magnitude, 1.0)
    allowed = 2 * (same - truth).abs().max().item() + floor_for(dtype, magnitude * bound.scale, bound)
    err = (ours - truth).abs()
    if err.max().item() <= allowed:
        return None
    worst = int(err.reshape(-1).argmax())
    return (f"{name}: max error vs fp64 {err.max().item():.3g} > allowed {allowed:.3g} (reference path "
            f"{(same - truth).abs().max().item():.3g}); worst flat index {worst}: {ours.reshape(-1)[worst].item():.6g}"
            f" vs {truth.reshape(-1)[worst].item():.6g}")


def upstream(seed: int, name: str, shape) -> torch.Tensor:
    """The fixed random fp64 weights g of output `name` in `with_grads` (the same in all three runs)."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float64)


def with_grads(outputs: dict, inputs: dict, seed: int) -> dict:
    """outputs plus `grad <name>` for every input that requires grad, of sum_k <outputs[k], g_k> in fp64 with
    g_k = upstream(seed, k, ...) (finite entries only)."""
    loss = 0.0
    for name, out in outputs.items():
        if out.requires_grad:
            g = upstream(seed, name, out.shape)
            loss = loss + torch.where(torch.isinf(out), 0.0, out.double() * g).sum()
    if isinstance(loss, torch.Tensor):
        loss.backward()
    grads = {f"grad {k}": (torch.zeros_like(t) if t.grad is None else t.grad) for k, t in inputs.items()
             if isinstance(t, torch.Tensor) and t.requires_grad}
    return {**{k: v.detach() for k, v in outputs.items()}, **grads}


# ----------------------------------------------------------------------------------------------------
# Shared drawing and building helpers
# ----------------------------------------------------------------------------------------------------


def pick(rng, options):
    return options[int(rng.integers(len(options)))]


def base_params(rng) -> dict:
    return {"dtype": pick(rng, list(DTYPES)), "seed": int(rng.integers(2**31))}


def leaf(t: torch.Tensor, mode: str, dtype: torch.dtype, grad: bool = True) -> torch.Tensor:
    """t rounded to the case's dtype; as float64 for the truth (the same values, exactly)."""
    t = t.to(dtype)
    if mode == "truth":
        t = t.double()
    return t.requires_grad_(grad)


def backend(mode: str) -> str:
    return "triton" if mode == "triton" else "reference"


def draw_sizes(rng) -> dict:
    """n rows, vocabulary v, width d: small odd sizes, or (one case in ten) a two-tile vocabulary."""
    if rng.random() < 0.1:
        return {"n": pick(rng, [1, 2, 5]), "v": pick(rng, WIDE_VOCAB), "d": pick(rng, [1, 3, 8])}
    return {"n": pick(rng, ROWS), "v": pick(rng, VOCAB), "d": pick(rng, WIDTH)}


def chunk_choice(rng, n: int):
    return pick(rng, [None, None, 1, 2, 3, 5, max(n - 1, 1)])


def logit_scale(logits: torch.Tensor, temperature: float, softcap=None) -> float:
    """max |logit| / T, at least 1. With a softcap c the Triton path's tanh, 2 / (1 + e^(-2u)) - 1, is accurate
    to about u absolutely, not relatively: a capped logit c tanh(x / c) errs by up to ~c u however small x is,
    so the scale is c / T there."""
    top = logits.abs().max().item() if logits.numel() else 0.0
    if softcap is not None:
        top = softcap
    return max(1.0, top / temperature)


# ----------------------------------------------------------------------------------------------------
# Cross-entropy: fused_linear_cross_entropy and cross_entropy
# ----------------------------------------------------------------------------------------------------


def draw_ce_options(rng) -> dict:
    return {
        "ignore_index": pick(rng, [-100, -100, 0, 3]),
        "ignore_frac": pick(rng, [0.0, 0.0, 0.3, 0.7, 1.0]),
        "reduction": pick(rng, ["mean", "sum", "none"]),
        "label_smoothing": pick(rng, [0.0, 0.0, 0.1, round(float(rng.uniform(0, 1)), 3), 1.0]),
        "z_loss_scale": pick(rng, [0.0, 0.0, 1e-4, round(float(rng.uniform(0, 0.1)), 4)]),
        "softcap": pick(rng, [None, None, 2.0, round(float(rng.uniform(0.5, 30)), 2)]),
        "temperature": pick(rng, [1.0, 1.0, 0.7, round(float(rng.uniform(0.3, 2.5)), 2)]),
        "return_z_loss": bool(rng.integers(2)),
        "scale": pick(rng, [0.1, 1.0, 3.0]),
    }


def draw_fused_ce(rng) -> dict:
    p = {**base_params(rng), **draw_sizes(rng)}
    return {**p, **draw_ce_options(rng), "bias": bool(rng.integers(2)), "chunk_size": chunk_choice(rng, p["n"])}


def ce_labels(p: dict, gen) -> torch.Tensor:
    labels = torch.randint(0, p["v"], (p["n"],), generator=gen)
    ignored = torch.rand(p["n"], generator=gen) < p["ignore_frac"]
    return labels.masked_fill(ignored, p["ignore_index"])


def ce_kwargs(p: dict) -> dict:
    keys = ("ignore_index", "reduction", "label_smoothing", "z_loss_scale", "softcap", "temperature", "return_z_loss")
    return {k: p[k] for k in keys}


def ce_dlogit_bound(p: dict, labels: torch.Tensor, scale: float, v: int) -> float:
    """A bound on sum of |terms| of one d output / d logit: C * (p + onehot + smoothing + z-loss p) / T <=
    C (2 + 2 z_scale |lse|) / T, with C the largest weight of a row's loss in the upstream gradient. Where the
    terms cancel (V = 1: softmax - onehot = 0) the result is 0 but a rounding of p still shows at this size."""
    g = upstream(p["seed"], "loss", labels.shape if p["reduction"] == "none" else ())
    c = g.abs().max().item() if g.numel() else 0.0
    if p["reduction"] == "mean":
        c /= max(int((labels != p["ignore_index"]).sum()), 1)
    lse = scale + math.log(v)
    return c * (2 + 2 * p["z_loss_scale"] * lse) / p["temperature"]


def linear_grad_magnitudes(hidden: torch.Tensor, weight: torch.Tensor, dlogit: float) -> dict:
    """Sums of |terms| of the matmul gradients given a per-logit bound `dlogit` (rows' softmax sums to 1):
    d hidden = dlogits @ W: dlogit max|W|; d weight = dlogits^T @ h: dlogit * sum_i |h_i|; d bias: dlogit N."""
    h, w = hidden.detach().double().abs(), weight.detach().double().abs()
    return {"grad hidden": dlogit * (w.max().item() if w.numel() else 0.0),
            "grad weight": dlogit * (h.sum(0).max().item() if h.numel() else 0.0),
            "grad bias": dlogit * h.shape[0]}


def ce_outputs(result, p: dict) -> dict:
    """The z-loss is compared by value only: it has no gradient of its own on the Triton path (docstring),
    while the autograd reference would give it one."""
    return {"loss": result[0], "z_loss": result[1].detach()} if p["return_z_loss"] else {"loss": result}


def run_fused_ce(p: dict, mode: str) -> tuple[dict, Bound]:
    gen, dtype = torch.Generator().manual_seed(p["seed"]), DTYPES[p["dtype"]]
    hidden = torch.randn(p["n"], p["d"], generator=gen) * p["scale"]
    weight = torch.randn(p["v"], p["d"], generator=gen) / math.sqrt(p["d"])
    bias = torch.randn(p["v"], generator=gen) * 0.5
    inputs = {"hidden": leaf(hidden, mode, dtype), "weight": leaf(weight, mode, dtype),
              "bias": leaf(bias, mode, dtype) if p["bias"] else None}
    labels = ce_labels(p, gen)
    if mode == "truth":
        result = linear_cross_entropy_reference(inputs["hidden"], inputs["weight"], labels, bias=inputs["bias"],
                                                **ce_kwargs(p))
    else:
        result = fused_linear_cross_entropy(inputs["hidden"], inputs["weight"], labels, bias=inputs["bias"],
                                            chunk_size=p["chunk_size"], backend=backend(mode), **ce_kwargs(p))
    logits = inputs["hidden"].detach().double() @ inputs["weight"].detach().double().T
    if inputs["bias"] is not None:
        logits = logits + inputs["bias"].detach().double()
    scale = logit_scale(logits, p["temperature"], p["softcap"])
    dlogit = ce_dlogit_bound(p, labels, scale, p["v"])
    bound = Bound(max(p["n"], p["v"], p["d"]), 4, scale,
                  magnitudes=linear_grad_magnitudes(inputs["hidden"], inputs["weight"], dlogit))
    return with_grads(ce_outputs(result, p), inputs, p["seed"]), bound


def draw_ce(rng) -> dict:
    sizes = draw_sizes(rng)
    return {**base_params(rng), "n": sizes["n"], "v": sizes["v"], **draw_ce_options(rng)}


def run_ce(p: dict, mode: str) -> tuple[dict, Bound]:
    gen, dtype = torch.Generator().manual_seed(p["seed"]), DTYPES[p["dtype"]]
    raw = torch.randn(p["n"], p["v"], generator=gen) * p["scale"] * 3
    labels = ce_labels(p, gen)
    # The Triton path overwrites the logits with their gradient: give it a leaf of its own, read nothing after.
    inputs = {"logits": leaf(raw, mode, dtype)}
    if mode == "truth":
        result = cross_entropy_reference(inputs["logits"], labels, **ce_kwargs(p))
    else:
        result = cross_entropy(inputs["logits"], labels, backend=backend(mode), **ce_kwargs(p))
    scale = logit_scale(raw.to(dtype).double(), p["temperature"], p["softcap"])
    bound = Bound(max(p["n"], p["v"]), 3, scale, magnitudes={"grad logits": ce_dlogit_bound(p, labels, scale, p["v"])})
    return with_grads(ce_outputs(result, p), inputs, p["seed"]), bound


# ----------------------------------------------------------------------------------------------------
# Varlen attention
# ----------------------------------------------------------------------------------------------------


def draw_lengths(rng, n_docs: int) -> list[int]:
    """Document lengths: empty documents (allowed, skipped), 1-token documents, short ones, and in one case in
    four one document of 17-70 tokens: several of the interpreter's 16 / 32-token blocks, full and partial."""
    lengths = [int(pick(rng, [0, 1, 1, 2, 3, rng.integers(2, 14), rng.integers(2, 14)])) for _ in range(n_docs)]
    if rng.random() < 0.25:
        lengths[int(rng.integers(n_docs))] = int(rng.integers(17, 71))
    return lengths


def draw_attention(rng) -> dict:
    n_docs = int(rng.integers(1, 5))
    lens_q = draw_lengths(rng, n_docs)
    lens_k = lens_q if rng.random() < 0.6 else draw_lengths(rng, n_docs)
    # (kv heads, query heads per kv head): MHA, GQA ratios 2-4, MQA; at most 6 query heads (interpreter time)
    heads_kv, group = pick(rng, [(1, 1), (2, 1), (3, 1), (1, 2), (2, 2), (1, 3), (2, 3), (1, 4)])
    window = [-1, -1] if rng.random() < 0.4 else [int(rng.integers(-1, 12)), int(rng.integers(-1, 12))]
    return {
        **base_params(rng), "lens_q": lens_q, "lens_k": lens_k, "heads_kv": heads_kv,
        "heads_q": heads_kv * group, "head_dim": int(pick(rng, [1, 2, 5, 8, 16, 19])),
        "causal": bool(rng.integers(2)), "window_size": window,
        "softcap": pick(rng, [0.0, 0.0, 0.0, 1.0, round(float(rng.uniform(0.5, 20)), 2)]),
        "softmax_scale": pick(rng, [None, None, round(float(rng.uniform(0.05, 1.5)), 3)]),
        "return_lse": bool(rng.integers(2)), "extra_max_seqlen": int(pick(rng, [0, 0, 0, 1, 7])),
    }


def run_attention(p: dict, mode: str) -> tuple[dict, Bound]:
    gen, dtype = torch.Generator().manual_seed(p["seed"]), DTYPES[p["dtype"]]
    total_q, total_k, d = sum(p["lens_q"]), sum(p["lens_k"]), p["head_dim"]
    inputs = {"q": leaf(torch.randn(total_q, p["heads_q"], d, generator=gen), mode, dtype),
              "k": leaf(torch.randn(total_k, p["heads_kv"], d, generator=gen), mode, dtype),
              "v": leaf(torch.randn(total_k, p["heads_kv"], d, generator=gen), mode, dtype)}
    cu_q, cu_k = (torch.tensor([0, *np.cumsum(lens).tolist()], dtype=torch.int32)
                  for lens in (p["lens_q"], p["lens_k"]))
    max_q = max(p["lens_q"]) + p["extra_max_seqlen"]
    max_k = max(p["lens_k"]) + p["extra_max_seqlen"]
    options = dict(softmax_scale=p["softmax_scale"], causal=p["causal"], window_size=tuple(p["window_size"]),
                   softcap=p["softcap"], return_lse=p["return_lse"])
    args = (inputs["q"], inputs["k"], inputs["v"], cu_q, cu_k, max_q, max_k)
    if mode == "truth":
        result = varlen_attention_reference(*args, **options)
    else:
        result = varlen_attention(*args, backend=backend(mode), **options)
    outputs = {"out": result[0], "lse": result[1]} if p["return_lse"] else {"out": result}
    bound = Bound(max(max_k, d, 1), 4, 1.0, unit_magnitude=True)
    return with_grads(outputs, inputs, p["seed"]), bound


# ----------------------------------------------------------------------------------------------------
# GRPO: group_advantages, fused_linear_logprobs, grpo_loss, fused_linear_grpo_loss
# ----------------------------------------------------------------------------------------------------


def draw_advantages(rng) -> dict:
    # The kernel walks the batch in tiles of 4,096 rewards (_ADVANTAGE_TILE): one case in ten is a batch of
    # several tiles, or one group larger than a tile.
    groups, group_size = int(pick(rng, [1, 2, 3, 5, 8, 13])), int(pick(rng, [1, 2, 3, 4, 5, 7, 8, 16, 17]))
    if rng.random() < 0.1:
        groups, group_size = pick(rng, [(300, 16), (257, 17), (1, 4097), (3, 5000)])
    return {
        **base_params(rng), "groups": groups, "group_size": group_size, "scale": pick(rng, ["group", "batch", "none"]),
        "eps": pick(rng, [1e-4, 1e-4, 1e-6, 0.1]), "rewards": pick(rng, ["binary", "binary", "graded", "normal"]),
        "nan_frac": pick(rng, [0.0, 0.0, 0.2, 1.0]),
    }


def run_advantages(p: dict, mode: str) -> tuple[dict, Bound]:
    gen, dtype = torch.Generator().manual_seed(p["seed"]), DTYPES[p["dtype"]]
    n = p["groups"] * p["group_size"]
    if p["rewards"] == "binary":  # correctness rewards: whole groups alike happen often
        rewards = (torch.rand(n, generator=gen) < 0.5).float()
    elif p["rewards"] == "graded":
        rewards = torch.randint(0, 5, (n,), generator=gen).float() / 4
    else:
        rewards = torch.randn(n, generator=gen) * 2
    rewards = rewards.masked_fill(torch.rand(n, generator=gen) < p["nan_frac"], float("nan"))
    rewards = leaf(rewards, mode, dtype, grad=False)
    if mode == "truth":
        result = group_advantages_reference(rewards, p["group_size"], scale=p["scale"], eps=p["eps"])
    else:
        result = group_advantages(rewards, p["group_size"], scale=p["scale"], eps=p["eps"], backend=backend(mode))
    outputs = {"advantages": result.advantages, "mean": result.mean, "std": result.std,
               "zero_variance": result.zero_variance}
    return outputs, Bound(n, 4)


def draw_logprobs(rng) -> dict:
    p = {**base_params(rng), **draw_sizes(rng)}
    return {**p, "temperature": pick(rng, [1.0, 1.0, 0.6, round(float(rng.uniform(0.3, 2.0)), 2)]),
            "return_entropy": bool(rng.integers(2)), "chunk_size": chunk_choice(rng, p["n"]),
            "scale": pick(rng, [0.1, 1.0, 2.0])}


def linear_inputs(p: dict, gen, mode: str) -> dict:
    dtype = DTYPES[p["dtype"]]
    hidden = torch.randn(p["n"], p["d"], generator=gen) * p["scale"]
    weight = torch.randn(p["v"], p["d"], generator=gen) / math.sqrt(p["d"])
    return {"hidden": leaf(hidden, mode, dtype), "weight": leaf(weight, mode, dtype)}


def linear_scale(inputs: dict, temperature: float) -> float:
    return logit_scale(inputs["hidden"].detach().double() @ inputs["weight"].detach().double().T, temperature)


def run_logprobs(p: dict, mode: str) -> tuple[dict, Bound]:
    gen = torch.Generator().manual_seed(p["seed"])
    inputs = linear_inputs(p, gen, mode)
    targets = torch.randint(0, p["v"], (p["n"],), generator=gen)
    kw = dict(temperature=p["temperature"], return_entropy=p["return_entropy"])
    if mode == "truth":
        result = linear_logprobs_reference(inputs["hidden"], inputs["weight"], targets, **kw)
    else:
        result = fused_linear_logprobs(inputs["hidden"], inputs["weight"], targets, chunk_size=p["chunk_size"],
                                       backend=backend(mode), **kw)
    # The fused entropy carries no gradient (docstring); compare its value only.
    outputs = {"logprobs": result[0], "entropy": result[1].detach()} if p["return_entropy"] else {"logprobs": result}
    g = upstream(p["seed"], "logprobs", (p["n"],))
    dlogit = 2 * (g.abs().max().item() if g.numel() else 0.0) / p["temperature"]  # |onehot - softmax| / T
    bound = Bound(max(p["n"], p["v"], p["d"]), 4, linear_scale(inputs, p["temperature"]),
                  magnitudes=linear_grad_magnitudes(inputs["hidden"], inputs["weight"], dlogit))
    return with_grads(outputs, inputs, p["seed"]), bound


def draw_loss_options(rng) -> dict:
    loss_type = pick(rng, ["grpo", "bnpo", "dr_grpo", "dapo"])
    has_ref = bool(rng.integers(2))
    return {
        "s": int(pick(rng, [1, 2, 3, 4, 6])), "contiguous": bool(rng.integers(2)), "loss_type": loss_type,
        "level": pick(rng, ["token", "sequence"]), "has_old": rng.random() < 0.8, "has_ref": has_ref,
        "beta": pick(rng, [0.0, 0.04, round(float(rng.uniform(0, 0.5)), 3)]) if has_ref else 0.0,
        "epsilon_low": pick(rng, [0.2, round(float(rng.uniform(0.1, 0.9)), 3)]),
        "epsilon_high": pick(rng, [0.2, 0.28, round(float(rng.uniform(0.1, 2.0)), 3)]),
        "mask": pick(rng, [None, "bool", "float"]), "keep_frac": pick(rng, [1.0, 0.7, 0.3, 0.0]),
        "has_iw": bool(rng.integers(2)), "max_completion_length": int(pick(rng, [1, 7, 32])),
        "extra_items": pick(rng, [None, None, 0, 5]), "extra_sequences": pick(rng, [None, None, 0, 3]),
        "counts_as_tensors": bool(rng.integers(2)),
    }


def keep_off_clip_edges(delta, logp, seq, mask, p: dict, margin: float):
    """Shift the log-ratios logp - old (old = logp - delta) that lie within `margin` of a clip edge to 0."""
    edges = torch.tensor([math.log(1 - p["epsilon_low"]), math.log(1 + p["epsilon_high"])], dtype=torch.float64)
    if p["level"] == "token":
        near = ((delta[:, None] - edges).abs() < margin).any(1)
        return torch.where(near, 0.0, delta)
    count = torch.zeros(p["s"], dtype=torch.float64).index_add(0, seq, mask)
    seq_lr = torch.zeros(p["s"], dtype=torch.float64).index_add(0, seq, delta * mask) / count.clamp(min=1)
    near = ((seq_lr[:, None] - edges).abs() < margin).any(1)
    return delta - torch.where(near, seq_lr, 0.0)[seq]


def loss_inputs(p: dict, logp_truth: torch.Tensor, gen, margin: float) -> dict:
    """The per-token and per-sequence tensors of a GRPO loss case (fp32), built around the true log-probs."""
    n, s = logp_truth.shape[0], p["s"]
    seq = torch.randint(0, s, (n,), generator=gen)
    seq = seq.sort().values if p["contiguous"] else seq
    keep = (torch.rand(n, generator=gen) < p["keep_frac"]).double()
    delta = keep_off_clip_edges(torch.randn(n, generator=gen, dtype=torch.float64) * 0.3, logp_truth, seq,
                                keep if p["mask"] else torch.ones(n, dtype=torch.float64), p, margin)
    count = int(keep.sum().item()) if p["mask"] else n
    as_count = (lambda x: torch.tensor(float(x))) if p["counts_as_tensors"] else (lambda x: x)
    kw = {
        "old_logprobs": (logp_truth - delta).float() if p["has_old"] else None,
        "advantages": torch.randn(s, generator=gen), "seq_ids": seq,
        "mask": None if p["mask"] is None else (keep.bool() if p["mask"] == "bool" else keep.float()),
        "ref_logprobs": (logp_truth + torch.randn(n, generator=gen, dtype=torch.float64) * 0.3).float()
        if p["has_ref"] else None,
        "beta": p["beta"], "epsilon_low": p["epsilon_low"], "epsilon_high": p["epsilon_high"],
        "loss_type": p["loss_type"], "importance_sampling_level": p["level"],
        "max_completion_length": p["max_completion_length"],
        "importance_weights": torch.rand(n, generator=gen) * 2 if p["has_iw"] else None,
        "num_items_in_batch": None if p["extra_items"] is None else as_count(max(count + p["extra_items"], 1)),
        "num_sequences": None if p["extra_sequences"] is None else as_count(s + p["extra_sequences"]),
    }
    return kw


def truth_kwargs(kw: dict) -> dict:
    """The loss arguments in float64 for the truth run (the same values)."""
    return {k: (v.double() if isinstance(v, torch.Tensor) and v.dtype.is_floating_point else v)
            for k, v in kw.items()}


def loss_outputs(loss, stats) -> dict:
    outputs = {"loss": loss}
    outputs.update({k: getattr(stats, k) for k in ("tokens", "low_clipped", "high_clipped", "kl_sum", "ratio_sum",
                                                    "entropy_sum")})
    return outputs


def draw_grpo_loss(rng) -> dict:
    return {**base_params(rng), "n": pick(rng, ROWS), **draw_loss_options(rng)}


def run_grpo_loss(p: dict, mode: str) -> tuple[dict, Bound]:
    gen, dtype = torch.Generator().manual_seed(p["seed"]), DTYPES[p["dtype"]]
    logp = leaf(-torch.rand(p["n"], generator=gen) * 6, mode, dtype)
    kw = loss_inputs(p, logp.detach().double(), gen, margin=0.01)
    if mode == "truth":
        loss, stats = grpo_loss_reference(logp, **truth_kwargs(kw))
    else:
        loss, stats = grpo_loss(logp, backend=backend(mode), **kw)
    return with_grads(loss_outputs(loss, stats), {"logprobs": logp}, p["seed"]), Bound(p["n"], 4, 1.0)


def draw_fused_grpo(rng) -> dict:
    return {**draw_logprobs(rng), **draw_loss_options(rng)}


def run_fused_grpo(p: dict, mode: str) -> tuple[dict, Bound]:
    gen, dtype = torch.Generator().manual_seed(p["seed"]), DTYPES[p["dtype"]]
    inputs = linear_inputs(p, gen, mode)
    targets = torch.randint(0, p["v"], (p["n"],), generator=gen)
    h64, w64 = (inputs[k].detach().double() for k in ("hidden", "weight"))
    logp_truth = linear_logprobs_reference(h64, w64, targets, temperature=p["temperature"])
    scale = linear_scale(inputs, p["temperature"])
    # A 16-bit logit moves a log-prob by up to ~2 u * scale: keep the log-ratios farther from the clip edges.
    margin = 0.01 + 8 * unit_roundoff(dtype) * scale
    kw = loss_inputs(p, logp_truth, gen, margin)
    if mode == "truth":
        loss, stats = linear_grpo_loss_reference(inputs["hidden"], inputs["weight"], targets,
                                                 temperature=p["temperature"], **truth_kwargs(kw))
    else:
        loss, stats = fused_linear_grpo_loss(inputs["hidden"], inputs["weight"], targets, temperature=p["temperature"],
                                             chunk_size=p["chunk_size"], backend=backend(mode), **kw)
    bound = Bound(max(p["n"], p["v"], p["d"]), 5, scale,
                  magnitudes=linear_grad_magnitudes(inputs["hidden"], inputs["weight"],
                                                    2 * loss_slope(logp_truth, kw, p) / p["temperature"]))
    return with_grads(loss_outputs(loss, stats), inputs, p["seed"]), bound


def loss_slope(logp_truth: torch.Tensor, kw: dict, p: dict) -> float:
    """max_t |d (g loss) / d logp_t| in fp64: the row weight C of the fused gradient (onehot - softmax) C / T."""
    logp = logp_truth.clone().requires_grad_()
    loss, _ = grpo_loss_reference(logp, **truth_kwargs(kw))
    (grad,) = torch.autograd.grad(loss * upstream(p["seed"], "loss", ()), logp, allow_unused=True)
    return 0.0 if grad is None or grad.numel() == 0 else grad.abs().max().item()


# ----------------------------------------------------------------------------------------------------
# Cases, runs and the record
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fuzzer:
    draw: Callable  # numpy Generator -> JSON parameters
    run: Callable  # (parameters, mode) -> ({name: tensor}, Bound)


FUZZERS = {
    "fused_linear_cross_entropy": Fuzzer(draw_fused_ce, run_fused_ce),
    "cross_entropy": Fuzzer(draw_ce, run_ce),
    "varlen_attention": Fuzzer(draw_attention, run_attention),
    "group_advantages": Fuzzer(draw_advantages, run_advantages),
    "fused_linear_logprobs": Fuzzer(draw_logprobs, run_logprobs),
    "grpo_loss": Fuzzer(draw_grpo_loss, run_grpo_loss),
    "fused_linear_grpo_loss": Fuzzer(draw_fused_grpo, run_fused_grpo),
}


def draw_case(function: str, seed: int, index: int) -> dict:
    rng = np.random.default_rng([seed, list(FUZZERS).index(function), index])
    return FUZZERS[function].draw(rng)


def check_case(function: str, params: dict) -> list[str]:
    """Every disagreement of the Triton path with the truth beyond the bound, one line each ([] = pass)."""
    runs = {}
    for mode in MODES:
        try:
            runs[mode] = FUZZERS[function].run(params, mode)
        except Exception as error:  # a crash on a valid input is a finding, recorded like a wrong number
            return [f"{mode} run raised {type(error).__name__}: {error}"]
    (ours, _), (same, _), (truth, bound) = runs["triton"], runs["same"], runs["truth"]
    if ours.keys() != truth.keys() or same.keys() != truth.keys():
        return [f"outputs differ: triton {sorted(ours)}, reference {sorted(same)}, truth {sorted(truth)}"]
    dtype = DTYPES[params["dtype"]]
    problems = [compare(name, ours[name], same[name], truth[name], dtype, bound) for name in truth]
    return [p for p in problems if p]


def fuzz(functions, cases: int, seed: int, counts: dict, failures: list, max_seconds=None, log=print) -> None:
    """Run `cases` cases of each function into `counts` (per function: cases, failures, per dtype, seconds) and
    `failures` (each failed case with its parameters), filled as it goes so that an interrupted run keeps what
    it did; past `max_seconds` no further case starts (the remaining counts say how far it got)."""
    start = time.perf_counter()
    for function in functions:
        row = counts.setdefault(function, {"cases": 0, "failures": 0, "fp32": 0, "fp16": 0, "seconds": 0.0})
        function_start = time.perf_counter()
        for index in range(cases):
            if max_seconds is not None and time.perf_counter() - start > max_seconds:
                break
            params = draw_case(function, seed, index)
            problems = check_case(function, params)
            row["cases"] += 1
            row[params["dtype"]] += 1
            row["seconds"] = round(time.perf_counter() - function_start, 1)
            if problems:
                row["failures"] += 1
                failures.append({"function": function, "seed": seed, "index": index, "params": params,
                                 "problems": problems})
                log(f"FAIL {function} #{index}: {json.dumps(params)}\n    " + "\n    ".join(problems))
        log(f"{function}: {row['cases']} cases ({row['fp32']} fp32, {row['fp16']} fp16), {row['failures']} "
            f"failures, {row['seconds']} s")


def source_state() -> dict:
    """The commit the kernels came from, and whether kernels/ had uncommitted changes (then say which)."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return None
    commit = git("rev-parse", "HEAD")
    changed = git("status", "--porcelain", "--", "kernels")
    return {"git_commit": common.git_commit() or (commit.strip() if commit else None),
            "uncommitted_kernel_changes": None if changed is None else changed.split("\n")[:-1]}


def replay(source: str) -> int:
    """Re-run recorded failures: a JSON case {"function", "params"}, or a results file (its last record's)."""
    path = Path(source)
    if path.exists():
        cases = common.load_records(path)[-1]["failures"]
    else:
        cases = [json.loads(source)]
    failed = 0
    for case in cases:
        problems = check_case(case["function"], case["params"])
        failed += bool(problems)
        print(f"{'FAIL' if problems else 'pass'} {case['function']}: {json.dumps(case['params'])}")
        for problem in problems:
            print(f"    {problem}")
    print(f"{len(cases)} cases replayed, {failed} failing")
    return 1 if failed else 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases-per-function", type=int, default=100)
    parser.add_argument("--functions", default=",".join(FUZZERS),
                        help=f"comma-separated subset of: {', '.join(FUZZERS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="results file to append the record to (default: "
                                                 "bench/results/fuzz_kernels-<device>.json); 'none' to skip")
    parser.add_argument("--max-seconds", type=float, help="start no case after this many seconds (the record says "
                                                               "how many ran)")
    parser.add_argument("--replay", help="a failed case as JSON, or a results file whose last record's failures "
                                         "to re-run")
    args = parser.parse_args(argv)
    args.functions = [f.strip() for f in args.functions.split(",") if f.strip()]
    unknown = [f for f in args.functions if f not in FUZZERS]
    if unknown:
        parser.error(f"unknown function(s) {unknown}; choose from {list(FUZZERS)}")
    if args.cases_per_function < 1:
        parser.error("--cases-per-function must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.replay:
        return replay(args.replay)
    common.exit_on_sigterm()
    record = common.new_record(
        "fuzz_kernels", "cpu", cpu_capability=torch.backends.cpu.get_cpu_capability(),
        triton_interpret=os.environ.get("TRITON_INTERPRET"), seed=args.seed,
        cases_per_function=args.cases_per_function, max_seconds=args.max_seconds, dtypes=list(DTYPES),
        **source_state(), failures=[],
    )
    counts = {}
    start = time.perf_counter()
    try:
        fuzz(args.functions, args.cases_per_function, args.seed, counts, record["failures"],
             args.max_seconds)
    except (KeyboardInterrupt, SystemExit):
        record["interrupted"] = True
    finally:
        record["wall_seconds"] = round(time.perf_counter() - start, 1)
        record["results"] = [{"function": f, **row} for f, row in counts.items()]
        record["cases"] = sum(r["cases"] for r in counts.values())
        record["failed_cases"] = sum(r["failures"] for r in counts.values())
        record["complete"] = all(counts.get(f, {}).get("cases") == args.cases_per_function for f in args.functions)
        if str(args.out).lower() != "none":
            path = common.append_record(record, args.out or common.results_path("fuzz_kernels", record["device"]))
            print(f"appended to {path}")
    print(f"{record['cases']} cases, {record['failed_cases']} failing, {record['wall_seconds']} s"
          + ("" if record["complete"] else " (incomplete: fewer cases than asked)"))
    return 1 if record["failed_cases"] else 0


if __name__ == "__main__":
    sys.exit(main())
