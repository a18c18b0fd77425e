"""fastmath/library_logs.py: vLLM's log lines go to a file in the output folder, not to the terminal; the rotary-cache
reload warning (not a lost weight: see the module docstring) is dropped; run.verbose or FASTMATH_VERBOSE=1 changes
nothing, and the variable overrides the config both ways."""

import logging
import os
import subprocess
import sys

import pytest

from fastmath.library_logs import LIBRARY_LOGGERS, VERBOSE_ENV, route_library_logs
from tests.conftest import subprocess_env

# A process that routes the library logs, prints its last line, and then writes to file descriptor 2 from a
# finaliser that runs while the interpreter shuts down (after every exit handler), as nanobind's leak report does.
_TEARDOWN_CHILD = """
import os, sys
from fastmath.library_logs import route_library_logs

class WritesAtTeardown:
    def __del__(self):
        os.write(2, b"written during shutdown\\n")

keep = WritesAtTeardown()
route_library_logs(sys.argv[1], 0, announce=False)
print("last line of the run", file=sys.stderr, flush=True)
"""


@pytest.fixture
def library_loggers(monkeypatch):
    """Restore the library loggers as they were, whatever the test did to them."""
    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    monkeypatch.setenv("VLLM_CONFIGURE_LOGGING", "1")
    saved = {name: (logging.getLogger(name), list(logging.getLogger(name).handlers), logging.getLogger(name).level,
                    logging.getLogger(name).propagate) for name in LIBRARY_LOGGERS}
    yield
    for logger, handlers, level, propagate in saved.values():
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            if handler not in handlers:
                handler.close()
        for handler in handlers:
            logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def test_vllm_lines_go_to_the_file_and_the_path_is_printed_once(library_loggers, tmp_path, capsys):
    path = route_library_logs(str(tmp_path / "run"), rank=1, announce=True)
    assert path == tmp_path / "run" / "logs" / "libraries-rank1.log"
    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    logger.warning("%s: Failed to load weights", "RotaryEmbedding")
    logger.warning("%s: Failed to load weights", "QKVParallelLinear")
    logging.getLogger("vllm.engine").info("engine started")
    for handler in logging.getLogger("vllm").handlers:
        handler.flush()
    captured = capsys.readouterr()
    assert captured.out.count(str(path)) == 1 and "engine started" not in captured.out + captured.err
    text = path.read_text()
    assert "engine started" in text and "QKVParallelLinear: Failed to load weights" in text
    assert "RotaryEmbedding" not in text  # the cos/sin cache is not a weight: nothing was lost
    route_library_logs(str(tmp_path / "again"), rank=0, announce=False)  # a second run replaces the handler
    assert len(logging.getLogger("vllm").handlers) == 1


@pytest.mark.parametrize("configured, env", [(False, "1"), (True, None), (True, "")])
def test_verbose_leaves_the_libraries_alone(library_loggers, tmp_path, monkeypatch, configured, env):
    if env is not None:
        monkeypatch.setenv(VERBOSE_ENV, env)
    before = list(logging.getLogger("vllm").handlers)
    assert route_library_logs(str(tmp_path), rank=0, announce=True, configured_verbose=configured) is None
    assert logging.getLogger("vllm").handlers == before and not (tmp_path / "logs").exists()


def test_the_variable_at_0_keeps_a_verbose_config_quiet(library_loggers, tmp_path, monkeypatch):
    monkeypatch.setenv(VERBOSE_ENV, "0")
    path = route_library_logs(str(tmp_path), rank=0, announce=False, configured_verbose=True)
    assert path == tmp_path / "logs" / "libraries-rank0.log"
    assert [h.name for h in logging.getLogger("vllm").handlers] == ["fastmath-library-log"]


def test_run_verbose_is_a_config_key():
    from fastmath.config import load_config

    assert load_config(None).run.verbose is False
    assert load_config(None, ["run.verbose=true"]).run.verbose is True


@pytest.mark.parametrize("verbose_env, to_terminal", [("", False), ("1", True)])
def test_what_libraries_write_at_shutdown_goes_to_the_log_unless_verbose(tmp_path, verbose_env, to_terminal):
    """The shutdown line (nanobind's leak report after a vLLM run, in the demo) reaches the log file, not the
    terminal; the run's own last line stays in the terminal; FASTMATH_VERBOSE=1 leaves standard error alone."""
    env = subprocess_env()
    env[VERBOSE_ENV] = verbose_env
    result = subprocess.run([sys.executable, "-c", _TEARDOWN_CHILD, str(tmp_path)], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "last line of the run" in result.stderr
    assert ("written during shutdown" in result.stderr) == to_terminal, result.stderr
    log = tmp_path / "logs" / "libraries-rank0.log"
    if to_terminal:
        assert not log.exists() or "written during shutdown" not in log.read_text()
    else:
        assert "written during shutdown" in log.read_text()


def test_warnings_raised_in_vllm_files_go_to_the_log_and_others_to_the_terminal(library_loggers, tmp_path):
    """vLLM's FutureWarnings (its kernel-override scan touching a deprecated torch attribute) land in the file; a
    warning from anywhere else goes to the display Python had; verbose puts that display back."""
    import warnings

    shown_before, displayed = warnings.showwarning, []
    warnings.showwarning = lambda message, category, *rest: displayed.append(f"{category.__name__}: {message}")
    python_display = warnings.showwarning
    try:
        path = route_library_logs(str(tmp_path), 0, announce=False)
        warnings.showwarning(FutureWarning("reduce_op is deprecated"), FutureWarning,
                             os.path.join("site-packages", "vllm", "triton_utils", "dispatcher.py"), 138)
        warnings.showwarning(UserWarning("ours"), UserWarning, os.path.join("fastmath", "sft.py"), 1)
        for handler in logging.getLogger("vllm").handlers:
            handler.flush()
        assert "dispatcher.py:138: FutureWarning: reduce_op is deprecated" in path.read_text()
        assert displayed == ["UserWarning: ours"]
        os.environ[VERBOSE_ENV] = "1"
        route_library_logs(str(tmp_path), 0, announce=False)
        assert warnings.showwarning is python_display
    finally:
        os.environ.pop(VERBOSE_ENV, None)
        warnings.showwarning = shown_before
