"""Tolerances as claims about floating-point arithmetic, not numbers one machine printed.

Two correct evaluations of the same real-valued reduction may differ only by rounding. For a sum of n terms
evaluated in any order in a format with unit roundoff u = eps / 2 (Higham, "Accuracy and Stability of Numerical
Algorithms", eq. 4.4):

    |fl(sum x_i) - sum x_i| <= gamma_{n-1} * sum |x_i|,     gamma_k = k u / (1 - k u)

so two evaluations (say PyTorch's AVX-512 kernel and its AVX2 kernel, or a Triton tile loop and a reference
matmul) differ by at most 2 gamma_{n-1} sum |x_i|. A dot product of length n has the same bound with
|x_i| = |a_i b_i| (one more rounding per product: gamma_n). These bounds are worst cases; they still sit many
orders of magnitude below what a wrong index, a dropped term or a wrong scale produces, which is the error a
test exists to catch (an element off by one changes a result by about the size of a term, not by n u of it).

Chains of operations (matmul -> log-softmax -> loss -> backward) add the bounds of their steps; `chain` counts
those steps. A test states the longest reduction it checks and the magnitude of its terms, and asks for the
tolerance here, so that a different CPU kernel (`ATEN_CPU_CAPABILITY=avx2` / `default`) or a different tile
order cannot fail it, while an indexing error still does.
"""
import torch


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2: the largest relative error of one rounding to nearest in `dtype`."""
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of n successive roundings."""
    nu = max(int(n), 1) * unit_roundoff(dtype)
    if nu >= 1:
        raise ValueError(f"{n} roundings in {dtype} give no useful bound (n u = {nu:.3g} >= 1)")
    return nu / (1 - nu)


def reduction_atol(dtype: torch.dtype, length: int, magnitude: float, chain: int = 1) -> float:
    """Largest difference between two evaluation orders of `chain` chained reductions of `length` terms whose
    absolute values sum to at most `magnitude` (per reduction): 2 * chain * gamma_length * magnitude."""
    return 2 * chain * gamma(length, dtype) * float(magnitude)


def reduction_rtol(dtype: torch.dtype, length: int, chain: int = 1) -> float:
    """The relative form of `reduction_atol` for results whose terms share one sign (sum |x| = |sum x|)."""
    return 2 * chain * gamma(length, dtype)


def storage_rtol(dtype: torch.dtype) -> float:
    """One rounding to `dtype` when a result computed in fp32 is stored in a 16-bit format: u of that format."""
    return unit_roundoff(dtype)


def tiny_atol(dtype: torch.dtype) -> float:
    """A floor for results near zero: the smallest normal number of `dtype` times 2^10, so values that cancel
    to almost nothing are not compared relatively."""
    return torch.finfo(dtype).tiny * 1024


def dot_magnitude(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a| @ |b| in float64: per output element, the sum of the absolute values of the products a matmul adds,
    which is what `reduction_atol` needs as its magnitude for a matmul a @ b."""
    return a.detach().double().abs() @ b.detach().double().abs()



def linear_grad_magnitudes(hidden: torch.Tensor, weight: torch.Tensor, dlogits: torch.Tensor):
    """Per-element sums of |terms| of the two gradient matmuls behind an LM head, logits = hidden @ weight^T:
    d hidden = dlogits @ weight (V terms each) and d weight = dlogits^T @ hidden (N terms each). dlogits sums to
    about zero over a row (softmax minus one-hot), so these sums are far larger than the gradients themselves,
    and they, not the gradients, set how far two summation orders can drift apart."""
    return dot_magnitude(dlogits, weight), dot_magnitude(dlogits.T, hidden)


def decoder_rtol(dtype: torch.dtype, width: int, n_layers: int) -> float:
    """Two evaluations of one transformer decoder that sum in different orders (packed rows vs documents alone,
    another CPU's kernels, FSDP's sharded reductions) differ, relative to the largest output, by at most the
    reduction bound over the widest reduction (`width`: hidden, MLP, vocabulary or row length) through the chain
    of reductions: per layer RMSNorm, q/k/v, scores, softmax, P @ V, o_proj, RMSNorm, gate/up, down (9), then
    the final norm and the LM head (2). Backward passes run the chain again: callers double it."""
    return reduction_rtol(dtype, width, chain=9 * n_layers + 2)


def decoder_width(config, row_length: int) -> int:
    """The widest reduction of an HF decoder config on rows of `row_length` tokens."""
    return max(config.hidden_size, getattr(config, "intermediate_size", 0), config.vocab_size, row_length)


def adam_divergence(lr: float, steps: int, beta1: float = 0.9, beta2: float = 0.95) -> float:
    """Largest distance two AdamW trajectories from the same weights can drift apart per element in `steps`
    steps when their gradients differ only by rounding: a near-zero gradient's sign can flip, and Adam turns
    any gradient into a step of at most lr * max(1, (1 - beta1) / sqrt(1 - beta2)) (Kingma & Ba 2015, section
    2.1), so each trajectory moves at most that far per step whatever the rounding (no weight decay)."""
    per_step = max(1.0, (1 - beta1) / (1 - beta2) ** 0.5)
    return 2 * lr * per_step * steps
