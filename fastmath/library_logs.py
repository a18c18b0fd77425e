"""Libraries' log lines go to a file in the output folder, so the terminal shows fastmath's own progress and tables.

vLLM logs about 150 INFO / WARNING lines per demo run (engine start, every weight sync, compile notes) through its
logger "vllm"; in the terminal they break the progress bars and read like failures. `route_library_logs` gives
that logger (and torchao's, which names each CUDA-only extension it cannot load on a CPU) one handler, a file
`<output_dir>/logs/libraries-rank<R>.log`, and says so once on rank 0.
`run.verbose: true` leaves every library's logging as the library set it up (everything in the terminal). The
environment variable FASTMATH_VERBOSE overrides the config when set: 1 (or any value but 0) = verbose, 0 = quiet,
so one run can be made verbose without editing its config.

One line is dropped even from the file, with its reason: after each in-place weight reload vLLM warns
"RotaryEmbedding: Failed to load weights". The rotary layer's only tensor is its cos/sin cache, a non-persistent buffer vLLM
computes from the model config (rope theta, head size, max positions); a Hugging Face state dict carries no such
tensor (HF's `inv_freq` is a non-persistent buffer), so the reload finds nothing to load for that layer and vLLM
puts its own cache back, unchanged (vllm/model_executor/model_loader/reload/layerwise.py,
`finalize_layerwise_processing`). Training never changes the cache, so nothing is lost: the test suite's
"greedy output after an in-place sync equals HF generate on the updated weights" holds with it. Any other layer
failing to load is still logged.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

VERBOSE_ENV = "FASTMATH_VERBOSE"
LIBRARY_LOGGERS = ("vllm", "torchao")  # torchao: a "Failed to load" line per CUDA-only extension on CPU
_HANDLER_NAME = "fastmath-library-log"


class _DropRotaryReloadWarning(logging.Filter):
    """Drops vLLM's per-sync rotary-cache warning (module docstring: the cache is not a weight)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.getMessage() == "RotaryEmbedding: Failed to load weights")


def verbose(configured: bool) -> bool:
    """run.verbose (`configured`), unless FASTMATH_VERBOSE is set: then it decides ('0' = quiet, else verbose)."""
    override = os.environ.get(VERBOSE_ENV, "").strip()
    return configured if not override else override != "0"


def route_library_logs(output_dir: str, rank: int, announce: bool, configured_verbose: bool = False) -> Path | None:
    """Send the libraries' loggers to `<output_dir>/logs/libraries-rank<rank>.log` (None when verbose: run.verbose
    or FASTMATH_VERBOSE)."""
    if verbose(configured_verbose):
        return None
    path = Path(output_dir).expanduser() / "logs" / f"libraries-rank{rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    # vLLM sets up its own terminal handler when imported, unless told not to; either way ours replaces it below.
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    handler = logging.FileHandler(path, encoding="utf-8", delay=True)
    handler.name = _HANDLER_NAME
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_DropRotaryReloadWarning())
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
            if old.name == _HANDLER_NAME:
                old.close()
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    if announce:
        print(f"library logs (vLLM, torchao): {path} (run.verbose=true prints them here instead)", flush=True)
    return path
