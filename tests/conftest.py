"""Shared fixtures: the embedded tokenizer/model/data, built once per test session in a temp cache."""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("fastmath_cache")
    from fastmath.embedded import ensure_embedded_assets

    ensure_embedded_assets(cache)
    return cache


@pytest.fixture(scope="session")
def assets(embedded_cache):
    from fastmath.embedded import ensure_embedded_assets

    return ensure_embedded_assets(embedded_cache)


@pytest.fixture(scope="session")
def tokenizer(assets):
    from fastmath.model import load_tokenizer

    return load_tokenizer(str(assets.model_dir))


@pytest.fixture(scope="session")
def dist_info():
    """A one-process gloo group for in-process trainer tests."""
    from fastmath.distributed import init_distributed

    return init_distributed()


def subprocess_env() -> dict:
    """The environment for a child torchrun/python: no inherited rank variables from in-process tests."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = str(REPO)
    env["OMP_NUM_THREADS"] = "1"
    return env
