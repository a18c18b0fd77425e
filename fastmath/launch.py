"""torchrun, with a user mistake ending the output: `python -m fastmath.launch <torchrun arguments> fastmath/train.py ...`.

Under plain torchrun, a rank that exits with status 2 after printing `fastmath: error: ...` is followed by
torchrun's own report: a Python traceback of `ChildFailedError` and a failure table, which then ends the output.
This module runs torchrun itself (`torch.distributed.run`, the same argument parser and rendezvous; nothing is
reimplemented) and, when every failed rank ended with a fastmath error line, prints those lines (each distinct
line once) as the last thing the user sees and exits with status 2, without torchrun's traceback. Any other
failure (a crash, a signal) keeps torchrun's full report.

How the line reaches it: torchrun gives each worker an error file (TORCHELASTIC_ERROR_FILE); `train.py` writes its
line there in the format torchrun reads (`record_for_torchrun`), which also makes plain torchrun's failure table
quote the fastmath line instead of "<N/A>". Under this launcher the workers leave printing to it
(QUIET_CHILDREN), so N ranks that hit the same mistake print it once.
"""
from __future__ import annotations

import json
import os
import sys
import time

QUIET_CHILDREN = "FASTMATH_LAUNCH_PRINTS_ERRORS"
LINE_PREFIX = "fastmath: error: "


def record_for_torchrun(line: str) -> None:
    """Write `line` to this worker's torchrun error file, if torchrun gave it one (nothing otherwise)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    record = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(record, handle)
    except OSError:  # the report is a courtesy; the exit status and the printed line carry the error
        pass


def fastmath_lines(failures: dict) -> list[str] | None:
    """The distinct fastmath error lines of torchrun's failures (rank -> ProcessFailure), ranks in order; None when
    a rank failed otherwise. Ranks that torchrun stopped with SIGTERM after another's failure are not failures of
    their own."""
    lines = []
    for rank in sorted(failures):
        failure = failures[rank]
        message = failure.message
        text = message.get("message", "") if isinstance(message, dict) else ""
        if isinstance(text, str) and text.startswith(LINE_PREFIX):
            lines.append(text)
        elif getattr(failure, "signal_name", lambda: "")() != "SIGTERM":
            return None
    return list(dict.fromkeys(lines)) or None


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ[QUIET_CHILDREN] = "1"  # inherited by the workers
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as err:
        lines = fastmath_lines(err.failures)
        if lines is None:
            raise
        sys.stderr.flush()
        for line in lines:
            print(line, file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
