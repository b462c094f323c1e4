"""Strict test environment: float64 available for physics checks, NaN traps on, highest matmul precision.

Compiled programs go to a persistent compilation cache that lives for the test session (JAX's own, keyed on
the program, the compile options and the jax version), so a program that several tests build again (the
same tiny model's training step, the same MD chunk) is compiled once. The environment variables carry it
to the subprocesses the tests start. It changes no result, only how often XLA compiles (the suite runs
about a third faster on 2 cores).
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest

_CACHE = tempfile.mkdtemp(prefix="equiforce-test-jax-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
for _name, _value in (
    ("JAX_COMPILATION_CACHE_DIR", _CACHE),
    ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0"),
    ("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0"),
):
    os.environ.setdefault(_name, _value)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_debug_nans", True)
jax.config.update("jax_default_matmul_precision", "highest")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DATA = SHARED / "data"


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
