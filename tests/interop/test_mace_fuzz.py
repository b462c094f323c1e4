"""Fuzzed inputs of ``equiforce import mace``: truncated, bit-flipped, overwritten or emptied model files, and files
that are not a mace-torch model at all. Every one must end in a clear error (exit status 2, ``equiforce import:
error: <message>`` naming what is wrong, no traceback, no output file), either way:

* without torch (the default test environment): the message says that torch and mace-torch are needed and how
  to install them -- except for a TorchScript archive, which is told from the file itself and refused as such;
* with torch and mace-torch (``.ci/run``'s second target, ``-m torch``): an error naming the file (not a
  mace-torch model, a dictionary instead of a model, TorchScript, ...), or, when the damage left a loadable
  model (torch's zip records carry no checksum that torch checks), an equiforce model file that loads.

The default run fuzzes a fixed, derandomised set (cheap); the open-ended target (tests/test_fuzz_open.py, slow)
reuses :func:`mace_inputs` and :func:`import_outcome` with many seeded cases.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from equiforce.cli import main
from tests.test_fuzz_inputs import CASES, damaged, fresh, fuzz, record

TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("mace") is not None
FIXTURE = Path(__file__).parent / "fixtures" / "mace_mp0b3.npz"


def _zip(records: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in records.items():
            z.writestr(name, data)
    return buf.getvalue()


def mace_inputs() -> dict[str, bytes]:
    """Files an ``equiforce import mace`` user might give, none of them a model the importer can read:
    a ``torch.save``-style archive of a dictionary (a checkpoint, not a model object), a TorchScript-style
    archive (``constants.pkl`` + ``code/``, as ``torch.jit.save`` writes), the committed npz fixture (the
    state dict of a mace-torch model, not the model file), an equiforce-like msgpack, text and random bytes.
    Built without torch; harmless pickles only (plain dicts)."""
    meta = {"archive/version": b"3\n", "archive/byteorder": b"little"}
    checkpoint = pickle.dumps({"model": {"weight": [0.0, 1.0]}, "epoch": 3}, protocol=2)
    return {
        "torch.save dict": _zip({"archive/data.pkl": checkpoint, **meta}),
        "torchscript": _zip(
            {
                "archive/data.pkl": pickle.dumps({}, protocol=2),
                "archive/constants.pkl": pickle.dumps((), protocol=2),
                "archive/code/__torch__/mace.py": b"class ScaleShiftMACE(Module):\n  pass\n",
                **meta,
            }
        ),
        "state-dict npz": FIXTURE.read_bytes(),
        "text": b"MACE model\nr_max: 5.0\n",
        "random": np.random.default_rng(0).bytes(512),
    }


def import_outcome(path: Path, work: Path) -> Exception | Path:
    """Run ``equiforce import mace PATH OUT`` in this process. Returns a ValueError/ImportError standing for the
    refusal (its message is the CLI's), or the output path when the import succeeded (torch only). Asserts a
    clear refusal as the module docstring says."""
    out = fresh(work, ".eqf")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["import", "mace", str(path), str(out)])
    text = err.getvalue()
    if rc == 0:
        assert TORCH, "an import succeeded without torch"
        from equiforce.potentials.model_io import load_model

        load_model(out)  # a loadable model file (its own checks: finite values, checksum)
        out.unlink()
        return out
    assert rc == 2, (rc, text)
    assert "Traceback" not in text, text
    prefix = "equiforce import: error: "
    assert text.startswith(prefix) and len(text.strip()) > len(prefix) + 10, text
    assert not out.exists(), "an output file was written despite the error"
    message = text[len(prefix) :].strip()
    if "TorchScript-compiled model" in message:
        assert str(path) in message
        return ValueError(message)
    if not TORCH:
        assert "needs torch and mace-torch" in message and "pip install" in message, message
        return ImportError(message)
    assert str(path) in message, f"the message does not name the file: {message}"
    return ValueError(message)


def _report(targets: tuple[str, ...]) -> None:
    lines = [
        f"  {t:34s} {CASES[t, 'refused'] + CASES[t, 'read']:5d}  refused {CASES[t, 'refused']:4d}  "
        f"read {CASES[t, 'read']:4d}"
        for t in targets
    ]
    print("\nfuzz cases generated (mace import):\n" + "\n".join(lines))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mace-fuzz")


@pytest.fixture(scope="module", autouse=True)
def _report_case_counts():
    before = collections.Counter(CASES)
    yield
    _report(tuple(sorted({t for t, _ in CASES - before})))


TORCH_PARAMS = [pytest.param(False, id="as-installed"), pytest.param(True, id="torch", marks=pytest.mark.torch)]


@pytest.mark.parametrize("torch_run", TORCH_PARAMS)
@pytest.mark.parametrize("name", sorted(mace_inputs()))
def test_not_a_model_is_refused_clearly(name, torch_run, work):
    if torch_run and not TORCH:
        pytest.skip("needs torch and mace-torch")
    path = fresh(work, ".model")
    path.write_bytes(mace_inputs()[name])
    record("mace import: not a model", import_outcome(path, work))


@pytest.mark.parametrize("torch_run", TORCH_PARAMS)
@fuzz(40)
@given(data=st.data())
def test_damaged_mace_file_is_refused_clearly(torch_run, data, work):
    if torch_run and not TORCH:
        pytest.skip("needs torch and mace-torch")
    inputs = mace_inputs()
    raw = inputs[data.draw(st.sampled_from(sorted(inputs)), label="input")]
    path = fresh(work, ".model")
    path.write_bytes(data.draw(damaged(raw), label="bytes"))
    record("mace import: damaged file", import_outcome(path, work))
