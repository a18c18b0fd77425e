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

What libraries write to standard error while the interpreter shuts down goes to the same file. After a run that
started vLLM, triton's compiled extension (nanobind) reports at exit ~30 "nanobind: leaked instance / type /
function" lines: 4 `ir.attribute` objects, and the types and functions they keep, were still alive when it
unloaded. fastmath creates none of them: the same one-step GRPO run prints none with the Hugging Face generator,
none when it stops before the vLLM engine is built, and all of them when it stops right after (the engine
closed). No Python object refers to those attributes at exit (a scan of every object the garbage collector
tracks, and of the untracked containers they hold, finds none), so whatever holds them sits outside Python,
where fastmath cannot release it. The report is library output at teardown, so it goes where library output
goes: an exit handler, registered when this module is imported (before vLLM is: so it runs after vLLM's own), points the
process's standard error (file descriptor 2) at the log, after fastmath's last line and before the interpreter
unloads its extensions. A traceback of the run itself is
printed before that handler runs; verbose mode leaves standard error alone.

Python warnings raised from inside vLLM's own files (e.g. two FutureWarnings each run, when its kernel-override
scan touches torch's deprecated `torch.distributed.reduce_op`) are logged to the same file through the "vllm"
logger; every other warning is shown as Python shows it.
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import warnings
from pathlib import Path

VERBOSE_ENV = "FASTMATH_VERBOSE"
LIBRARY_LOGGERS = ("vllm", "torchao")  # torchao: a "Failed to load" line per CUDA-only extension on CPU
_HANDLER_NAME = "fastmath-library-log"
_VLLM_FILES = f"{os.sep}vllm{os.sep}"
_SHOWN_BY_PYTHON: list = []  # warnings.showwarning as it was before the quiet routing replaced it
_SHUTDOWN_LOG: list[Path] = []  # the file standard error goes to at exit (the newest route; empty = leave it)


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
        _SHUTDOWN_LOG.clear()
        if warnings.showwarning is _show_warning:
            warnings.showwarning = _SHOWN_BY_PYTHON[0]
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
    if warnings.showwarning is not _show_warning:
        _SHOWN_BY_PYTHON[:] = [warnings.showwarning]
        warnings.showwarning = _show_warning
    _SHUTDOWN_LOG[:] = [path]
    if announce:
        print(f"library logs (vLLM, torchao): {path} (run.verbose=true prints them here instead)", flush=True)
    return path


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning while quiet: a warning raised from a vLLM file goes to the "vllm" logger (the file)."""
    if _VLLM_FILES in str(filename):
        logging.getLogger("vllm").warning("%s:%s: %s: %s", filename, lineno, category.__name__, message)
    else:
        _SHOWN_BY_PYTHON[0](message, category, filename, lineno, file, line)


def _stderr_to_log_at_shutdown() -> None:
    """Exit handler: file descriptor 2 appends to the library log from here on (module docstring: teardown)."""
    if not _SHUTDOWN_LOG:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        fd = os.open(_SHUTDOWN_LOG[0], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError:
        return  # the output folder is gone: the terminal keeps it
    os.write(fd, b"--- standard error of the process from its exit handlers on ---\n")
    os.dup2(fd, 2)
    os.close(fd)


# Once per process, when this module is imported: train.py imports it to route the logs, before anything imports
# vLLM. Exit handlers run last-registered first, so this one runs after vLLM's own; it does nothing until a quiet
# route names a file, and nothing again after a verbose route clears it.
atexit.register(_stderr_to_log_at_shutdown)
