"""The launcher's environment, checked before a process group is formed: a mistake there is a silent hang.

torch.distributed reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. A set that cannot describe
a job (RANK=1 with WORLD_SIZE=1) or that describes a job nobody else joins (WORLD_SIZE=2 in a process that
torchrun did not start) makes `init_process_group` wait for peers that never come, silently, until its
timeout. Each such case is named here, in one line, before anything waits.

torchrun marks the processes it starts with TORCHELASTIC_RUN_ID. Another launcher that sets the variables itself
(for example a cluster's own) is accepted with FASTMATH_LAUNCHER=external.
"""
from __future__ import annotations

import socket
from typing import Mapping

from fastmath.errors import ConfigError

RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT")


def _integers(env: Mapping[str, str]) -> dict[str, int]:
    values = {}
    for name in RANK_VARIABLES:
        if name in env:
            text = env[name].strip()
            if not (text.isdigit() and len(text) <= 9):
                raise ConfigError(f"environment variable {name}={env[name][:40]!r} is not a non-negative integer "
                                  f"(torchrun sets it; unset it for a one-process run)")
            values[name] = int(text)
    return values


def launch_problem(env: Mapping[str, str]) -> str | None:
    """The first inconsistency in the launcher's variables, as one line; None when they describe a job."""
    try:
        values = _integers(env)
    except ConfigError as err:
        return str(err)
    rank, world = values.get("RANK"), values.get("WORLD_SIZE")
    if (rank is None) != (world is None):
        have, lack = ("RANK", "WORLD_SIZE") if world is None else ("WORLD_SIZE", "RANK")
        return (f"environment variable {have} is set but {lack} is not; launch with torchrun, or unset {have} for "
                f"a one-process run")
    if rank is None:
        if "LOCAL_RANK" in values:
            return "environment variable LOCAL_RANK is set without RANK and WORLD_SIZE; launch with torchrun, or unset it"
        return None
    if world == 0:
        return "environment variable WORLD_SIZE=0: a job has at least one process"
    if rank >= world:
        return (f"environment variables RANK={rank} and WORLD_SIZE={world}: a rank must be below the world size "
                f"(ranks 0..{world - 1}); launch with torchrun, or unset them for a one-process run")
    local_rank, local_world = values.get("LOCAL_RANK"), values.get("LOCAL_WORLD_SIZE")
    if local_rank is not None and local_rank > rank:
        return f"environment variables LOCAL_RANK={local_rank} and RANK={rank}: a local rank is never above the rank"
    if local_rank is not None and local_world is not None and local_rank >= local_world:
        return (f"environment variables LOCAL_RANK={local_rank} and LOCAL_WORLD_SIZE={local_world}: a local rank must "
                f"be below the local world size")
    if "MASTER_PORT" in values and not 0 < values["MASTER_PORT"] < 65536:
        return f"environment variable MASTER_PORT={values['MASTER_PORT']} is not a port (1-65535)"
    torchrun = bool(env.get("TORCHELASTIC_RUN_ID")) or env.get("FASTMATH_LAUNCHER") == "external"
    if world > 1 and not torchrun:
        return (f"environment variables WORLD_SIZE={world} and RANK={rank} are set, but torchrun did not start this "
                f"process: it would wait for {world - 1} other process(es) that nothing starts; launch with "
                f"torchrun --nproc_per_node={world}, unset RANK and WORLD_SIZE, or set FASTMATH_LAUNCHER=external "
                f"if another launcher starts them")
    if world > 1 and not env.get("MASTER_ADDR"):
        return f"environment variable WORLD_SIZE={world} is set but MASTER_ADDR is not; the processes cannot meet"
    address = env.get("MASTER_ADDR", "").strip()
    if address and not _resolves(address):
        return (f"environment variable MASTER_ADDR={address[:80]!r} does not resolve to an address (the process "
                f"group would retry it until its timeout); fix it, or unset it for a one-process run")
    return None


def _resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):  # socket.gaierror is an OSError; an over-long label is a UnicodeError
        return False
    return True


def check_launch_env(env: Mapping[str, str]) -> None:
    problem = launch_problem(env)
    if problem:
        raise ConfigError(problem)
