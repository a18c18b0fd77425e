"""One run per output folder, and nothing of an earlier run replaced without a word.

The lock: `<run.output_dir>/.fastmath.lock`, held by rank 0 for the whole run with `fcntl.flock` (an exclusive
lock the kernel drops when the process ends, however it ends: a lock of a killed run is never stale). The file
holds the holder's PID, host and start time, so a second run is told who holds it. Where the file system does
not support flock (some network file systems answer ENOLCK / EOPNOTSUPP), the file itself is the lock, created
with O_EXCL: a lock of a process that no longer runs on this host is recognised as stale and taken over; one
from another host cannot be checked from here and is reported with its host, for the user to judge.

Every rank learns rank 0's answer (one broadcast), so a refused run ends on every rank with the same line instead
of leaving the other ranks waiting for rank 0.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
from pathlib import Path

import torch.distributed as dist

from fastmath.errors import ConfigError

LOCK_NAME = ".fastmath.lock"
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class OutputLock:
    """The held lock; `release()` drops it (the kernel drops it anyway when the process ends)."""

    def __init__(self, path: Path, fd: int | None, owns_file: bool):
        self.path, self._fd, self._owns_file = path, fd, owns_file

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
        if self._owns_file:
            self.path.unlink(missing_ok=True)
            self._owns_file = False


def _holder_text(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text(encoding="utf-8")[:4096])
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _in_use(output_dir: str | Path, holder: dict) -> ConfigError:
    pid, host = holder.get("pid", "?"), holder.get("host", "?")
    since = f", since {holder['started']}" if holder.get("started") else ""
    return ConfigError(f"run.output_dir {output_dir} is in use by another fastmath run (PID {pid} on {host}{since}); "
                       f"wait for it to end, or use another run.output_dir")


def _me() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")})


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def acquire_output_lock(output_dir: str | Path) -> OutputLock:
    """Lock `output_dir` for this process; ConfigError naming the holder's PID and host when another run has it."""
    folder = Path(output_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    try:  # O_NOFOLLOW: a link planted at the lock's name must not make us truncate the file it points to
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        raise ConfigError(f"run.output_dir {output_dir}: its lock file {path} cannot be opened "
                          f"({err.strerror}); it must be a plain file or absent") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _in_use(output_dir, _holder_text(path)) from None
    except OSError as err:
        os.close(fd)
        if err.errno in _NO_FLOCK:
            return _acquire_lock_file(output_dir, path)
        raise
    os.ftruncate(fd, 0)
    os.write(fd, _me().encode())
    os.fsync(fd)
    return OutputLock(path, fd, owns_file=False)


def _acquire_lock_file(output_dir: str | Path, path: Path) -> OutputLock:
    """The fallback without flock: the file is the lock (O_EXCL); a dead process's lock on this host is stale."""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except FileExistsError:
            holder = _holder_text(path)
            same_host = holder.get("host") == socket.gethostname()
            if same_host and isinstance(holder.get("pid"), int) and not _process_alive(holder["pid"]):
                path.unlink(missing_ok=True)  # stale: its process ended without removing it
                continue
            raise _in_use(output_dir, holder) from None
        os.write(fd, _me().encode())
        os.fsync(fd)
        os.close(fd)
        return OutputLock(path, None, owns_file=True)
    raise _in_use(output_dir, _holder_text(path))


def rank0_decides(message: str | None) -> str | None:
    """Rank 0's `message` on every rank (one broadcast; no collective in a one-process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [message]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return message


def lock_output_dir(output_dir: str | Path, is_main: bool) -> OutputLock | None:
    """Every rank calls this; rank 0 takes the lock, and a refusal ends every rank with the same ConfigError."""
    lock, problem = None, None
    if is_main:
        try:
            lock = acquire_output_lock(output_dir)
        except ConfigError as err:
            problem = str(err)
    problem = rank0_decides(problem)
    if problem:
        raise ConfigError(problem)
    return lock


# Files of a finished (or started) stage that a fresh start would replace.
EXPORT_NAMES = ("hf", "summary.json")


def earlier_outputs(out_dir: str | Path, mode: str) -> list[str]:
    """What a fresh start of a stage in `out_dir` would replace: its export and summary under any resume mode (a
    stage that starts fresh with no checkpoint but with an export is a finished run whose checkpoints are gone),
    and under run.resume=never its metrics.jsonl too (under auto, a metrics file without a checkpoint is a run
    killed before its first checkpoint, which a restart continues)."""
    out = Path(out_dir)
    names = EXPORT_NAMES + (("metrics.jsonl",) if mode == "never" else ())
    return [name for name in names if (out / name).exists()]


def refuse_overwrite(out_dir: str | Path, mode: str, is_main: bool) -> None:
    """ConfigError on every rank when a fresh start would replace an earlier run's files (rank 0 looks)."""
    found = earlier_outputs(out_dir, mode) if is_main else []
    problem = None
    if found:
        where = ", ".join(str(Path(out_dir) / name) for name in found)
        problem = (f"run.resume={mode} starts fresh, but {where} from an earlier run would be replaced; move "
                   f"{'it' if len(found) == 1 else 'them'} away, or use another run.output_dir")
    problem = rank0_decides(problem)
    if problem:
        raise ConfigError(problem)
