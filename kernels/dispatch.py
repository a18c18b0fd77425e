"""The backend rule, shared by every kernel module: CUDA tensors take the Triton path; CPU tensors take the
PyTorch reference, except while TRITON_INTERPRET=1 is set, where they take the (interpreted) Triton path, which is
how the tests hold the Triton code to the reference on machines without a GPU (docs/design.md).

Triton decides between compiling and interpreting a function when `triton.jit` decorates it: Triton's own jit
helpers (tl.max, tl.sum) when triton is first imported, a module's kernels when that module is. CPU tensors can
take the Triton path only if all of them were interpreted, i.e. TRITON_INTERPRET=1 was set before both imports.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import triton.language as tl

BACKENDS = ("auto", "triton", "reference")

# Set by `simulation()` (the memory planner): None, or the device type the fake tensors stand for.
_SIMULATED: str | None = None


@contextmanager
def simulation(device_type: str = "cuda"):
    """Within this block tensors are fake (shapes, no data) and stand for tensors on `device_type`: Triton launches
    are skipped (`launching()` is False), input checks that read values are skipped (`values_readable()`), and
    with device_type "cuda" backend="auto" takes the Triton path whatever the tensors' device.

    Made for fastmath's memory planner, which runs a training step on fake CPU tensors (no GPU, no bytes): every
    buffer a kernel writes (logits chunks, accumulators, outputs) is allocated by PyTorch code around its launch,
    so skipping the launch leaves exactly that path's allocations for the planner to count. A module-level
    switch: one simulation at a time per process."""
    global _SIMULATED
    previous, _SIMULATED = _SIMULATED, device_type
    try:
        yield
    finally:
        _SIMULATED = previous


def simulated_device() -> str | None:
    return _SIMULATED


def launching() -> bool:
    """Whether Triton kernels are launched (False inside `simulation()`: fake tensors have no memory)."""
    return _SIMULATED is None


def values_readable() -> bool:
    """Whether input checks may read tensor values (not inside `simulation()`: fake tensors hold none)."""
    return _SIMULATED is None


def interpret_env() -> bool:
    """TRITON_INTERPRET is set now (what `backend="auto"` follows for CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def all_interpreted(*kernels) -> bool:
    """These jit functions, and Triton's own tl.max / tl.sum, run in the interpreter."""
    return all(type(f).__name__ == "InterpretedFunction" for f in (*kernels, tl.max, tl.sum))


def use_triton(backend: str, device: torch.device, interpreted: bool, module: str,
               dtype: torch.dtype | None = None, beyond: str = "") -> bool:
    """The backend rule, whether this call takes the Triton path:
    - "reference": never.
    - "auto": for CUDA tensors, and for CPU tensors while TRITON_INTERPRET=1 is set; not for other devices, not for
      float64 (`dtype`, the call's main input: the reference is the one path that computes in float64, the
      package's dtype policy) and not for inputs beyond the kernel's Triton path (`beyond`).
    - "triton": always, or an error: ValueError for inputs `beyond` the kernel or tensors on a device other than
      CUDA or CPU. (A float64 input is refused by `check_float_dtype`, which the caller runs with its names.)
    Either way the Triton path on CPU tensors raises RuntimeError where the module's kernels are not interpreted.

    `beyond`: "" when the calling kernel's Triton path takes these inputs, else why not, worded to follow
    "backend='triton' " (e.g. "takes head_dim <= 256, got 512"). `interpreted`: the calling module's
    `all_interpreted(...)` flag; `module`: its import name (for the errors).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if _SIMULATED == "cuda":
        return backend != "reference"
    if backend == "reference":
        return False
    if backend == "auto":
        runnable = device.type == "cuda" or (device.type == "cpu" and interpret_env())
        if not runnable or dtype == torch.float64 or beyond:
            return False
    elif beyond:
        raise ValueError(f"{module}: backend='triton' {beyond}")
    elif device.type not in ("cuda", "cpu"):
        raise ValueError(f"{module}: backend='triton' runs on CUDA tensors (or CPU ones, interpreted), got {device}")
    if device.type != "cuda" and not interpreted:
        raise RuntimeError(
            f"the Triton path on {device.type} tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            f"before triton and {module} are imported (or use backend='reference')"
        )
    return True


# The dtype policy of every public kernel function (said in full in the `kernels` package docstring).
TRITON_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REFERENCE_FLOAT_DTYPES = TRITON_FLOAT_DTYPES + (torch.float64,)


def check_float_dtype(function: str, name: str, tensor: torch.Tensor, triton: bool) -> None:
    """Raise one ValueError naming the function, the argument and the way out when `tensor`'s dtype is outside
    the dtype policy of the chosen path."""
    allowed = TRITON_FLOAT_DTYPES if triton else REFERENCE_FLOAT_DTYPES
    if tensor.dtype in allowed:
        return
    names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
    hint = " (float64 runs on backend='reference')" if triton and tensor.dtype == torch.float64 else ""
    path = "Triton" if triton else "reference"
    raise ValueError(f"{function}: {name} has dtype {str(tensor.dtype).removeprefix('torch.')}; the {path} path "
                     f"accepts {names}{hint}")
