"""Strict test environment: float64 available for physics checks, NaN traps on, highest matmul precision.

The suite runs in two pytest-xdist worker processes, one test file per worker at a time (pyproject's
addopts). Session fixtures that train a model build it once for both workers (:func:`built_once`), and the
files that take longest start first (:func:`pytest_collection_modifyitems`), so that no long file is left
running alone at the end.

Compiled programs go to a persistent compilation cache that lives for the test session (JAX's own, keyed on
the program, the compile options and the jax version), so a program that several tests build again (the
same tiny model's training step, the same MD chunk) is compiled once. The environment variables carry it
to the subprocesses the tests start. It changes no result, only how often XLA compiles (the suite runs
about a third faster on 2 cores).
"""

import atexit
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import pytest
from filelock import FileLock

_CACHE = tempfile.mkdtemp(prefix="equiforce-test-jax-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
for _name, _value in (
    ("JAX_COMPILATION_CACHE_DIR", _CACHE),
    ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0"),
    ("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0"),
):
    os.environ.setdefault(_name, _value)
# the open-ended fuzz target's seed (tests/test_fuzz_open.py): drawn here, before any xdist worker starts, so that
# the workers inherit it and the header below shows it
os.environ.setdefault("EQUIFORCE_FUZZ_SEED", str(secrets.randbelow(2**32)))
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_debug_nans", True)
jax.config.update("jax_default_matmul_precision", "highest")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DATA = SHARED / "data"

#: test files (or folders) that take a minute or more, started first; the rest follow in pytest's order
LONG_FIRST = (
    "tests/uncertainty/",
    "tests/training/test_parallel.py",
    "tests/training/test_distributed.py",
    "tests/test_x64_off.py",
    "tests/md/test_sharded.py",
    "tests/md/test_engine.py",
    "tests/md/test_replicas.py",
    "tests/training/test_finetune.py",
    "tests/training/test_trainer.py",
)


def pytest_report_header(config: pytest.Config) -> str:
    seed = os.environ["EQUIFORCE_FUZZ_SEED"]
    return f"fuzz seed {seed} (tests/test_fuzz_open.py, -m slow; reproduce with EQUIFORCE_FUZZ_SEED={seed})"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Long files first (:data:`LONG_FIRST`), each file's tests in their order: with one file per worker at a
    time, a long file started last would run alone at the end."""

    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::")[0]
        return next((k for k, prefix in enumerate(LONG_FIRST) if path.startswith(prefix)), len(LONG_FIRST))

    items.sort(key=rank)  # stable: the order within a rank is pytest's


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], str]) -> str:
    """``build(folder)`` once per test session, shared by the xdist workers: the first worker to ask builds
    (into a folder of the session's shared temporary directory) while the others wait on a file lock, and every
    worker gets its result (a string, e.g. a model path). A failed build is tried again by the next asker."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = root / f"built-once-{name}"
    done = root / f"built-once-{name}.result"
    with FileLock(str(root / f"built-once-{name}.lock")):
        if not done.exists():
            folder.mkdir(exist_ok=True)
            result = build(folder)
            done.write_text(result)
        return done.read_text()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def key() -> jax.Array:
    return jax.random.PRNGKey(0)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present beside the repository")
    return SHARED_DATA
