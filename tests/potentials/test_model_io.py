"""The model file: round trips for every registered model, and every way a file can be bad."""

import json
import os
import stat

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from equiforce.potentials import MODELS
from equiforce.potentials.model_io import (
    FORMAT,
    FORMAT_VERSION,
    ModelFileError,
    atomic_write_bytes,
    load_model,
    read_header,
    save_model,
)
from tests.potentials.property_suite import crystal, get_harness, molecule


def _tree_equal_bitwise(a, b) -> None:
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_round_trip_is_bit_exact(name, tmp_path):
    harness = get_harness(name)
    metadata = {"rmse": np.float64(0.125), "epochs": np.int64(3), "curve": np.arange(3.0), "note": "ok"}
    path = save_model(tmp_path / "sub" / "model.eqf", harness.potential, harness.params, metadata)
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["model.eqf"]  # no temporary file left behind
    potential, params, header = load_model(path)
    assert potential == harness.potential
    _tree_equal_bitwise(params, harness.params)
    assert header["format"] == FORMAT and header["format_version"] == FORMAT_VERSION
    assert header["metadata"] == {"rmse": 0.125, "epochs": 3, "curve": [0.0, 1.0, 2.0], "note": "ok"}
    assert header["units"]["energy"] == "eV"
    assert read_header(path) == header
    for s in (molecule(0), crystal(0)):
        a, b = harness.evaluate(s), harness.evaluate(s, params=params)
        np.testing.assert_array_equal(a.energy, b.energy)
        np.testing.assert_array_equal(a.forces, b.forces)
        np.testing.assert_array_equal(a.stress, b.stress)


def test_float32_round_trip_and_overwrite(tmp_path):
    harness = get_harness("nequip")
    p32 = harness.potential.replace(dtype="float32")
    params32 = jax.tree.map(lambda x: x.astype(jnp.float32), harness.params)
    path = tmp_path / "m.eqf"
    save_model(path, harness.potential, harness.params)
    save_model(path, p32, params32)  # atomic replace of an existing file
    potential, params, _ = load_model(path)
    assert potential.dtype == "float32"
    assert {np.asarray(x).dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
    _tree_equal_bitwise(params, params32)


# ------------------------------------------------------------------------------- bad files
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(path, raw bytes, decoded document) of a valid model file."""
    harness = get_harness("nequip")
    path = save_model(tmp_path_factory.mktemp("model") / "good.eqf", harness.potential, harness.params)
    raw = path.read_bytes()
    return path, raw, flax.serialization.msgpack_restore(raw)


def _write_doc(path, header, params) -> None:
    path.write_bytes(flax.serialization.msgpack_serialize({"header": json.dumps(header), "params": params}))


def _edit_header(doc, **changes):
    header = json.loads(doc["header"])
    header.update(changes)
    return header


def _load_fails(path, match: str | None = None) -> None:
    with pytest.raises(ModelFileError, match=match):
        load_model(path)


def test_missing_file(tmp_path):
    _load_fails(tmp_path / "nope.eqf", "cannot read")


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.99])
def test_truncated_file(saved, tmp_path, fraction):
    _, raw, _ = saved
    path = tmp_path / "truncated.eqf"
    path.write_bytes(raw[: int(len(raw) * fraction)])
    _load_fails(path)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bytes(tmp_path, seed):
    path = tmp_path / "random.eqf"
    path.write_bytes(np.random.default_rng(seed).bytes(4096))
    _load_fails(path)


def test_json_file(saved, tmp_path):
    _, _, doc = saved
    path = tmp_path / "model.json"
    path.write_text(json.dumps({"header": doc["header"], "params": {}}))
    _load_fails(path)


def test_msgpack_of_wrong_shape(tmp_path):
    path = tmp_path / "list.eqf"
    path.write_bytes(flax.serialization.msgpack_serialize([1, 2, 3]))
    _load_fails(path, "not an equiforce model file")
    path.write_bytes(flax.serialization.msgpack_serialize({"header": "{not json", "params": {}}))
    _load_fails(path, "header")


def test_other_format(saved, tmp_path):
    _, _, doc = saved
    path = tmp_path / "other.eqf"
    _write_doc(path, _edit_header(doc, format="someone-elses-model"), doc["params"])
    _load_fails(path, "format")


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 0, "1", None])
def test_unsupported_format_version(saved, tmp_path, version):
    _, _, doc = saved
    path = tmp_path / "version.eqf"
    _write_doc(path, _edit_header(doc, format_version=version), doc["params"])
    _load_fails(path, "version")


def test_newer_version_message_asks_to_upgrade(saved, tmp_path):
    _, _, doc = saved
    path = tmp_path / "newer.eqf"
    _write_doc(path, _edit_header(doc, format_version=FORMAT_VERSION + 1), doc["params"])
    _load_fails(path, "upgrade")


def _params_with(doc, edit):
    params = jax.tree.map(np.array, doc["params"])
    edit(params["params"])
    return params


def test_wrong_parameter_shape(saved, tmp_path):
    _, _, doc = saved

    def edit(p):
        w = p["embedding"]
        (k,) = list(w)
        w[k] = np.zeros((w[k].shape[0] + 1, *w[k].shape[1:]), w[k].dtype)

    path = tmp_path / "shape.eqf"
    _write_doc(path, json.loads(doc["header"]), _params_with(doc, edit))
    _load_fails(path, "shape")


def test_wrong_parameter_dtype(saved, tmp_path):
    _, _, doc = saved

    def edit(p):
        w = p["output"]
        (k,) = list(w)
        w[k] = w[k].astype(np.float32)

    path = tmp_path / "dtype.eqf"
    _write_doc(path, json.loads(doc["header"]), _params_with(doc, edit))
    _load_fails(path, "dtype")


def test_missing_and_extra_parameters(saved, tmp_path):
    _, _, doc = saved
    path = tmp_path / "keys.eqf"
    _write_doc(path, json.loads(doc["header"]), _params_with(doc, lambda p: p.pop("output")))
    _load_fails(path, "missing")
    _write_doc(path, json.loads(doc["header"]), _params_with(doc, lambda p: p.update(extra={"w": np.ones(3)})))
    _load_fails(path, "unexpected")


def test_config_does_not_match_weights(saved, tmp_path):
    """A header whose hyperparameters describe another network than the saved weights."""
    _, _, doc = saved
    header = json.loads(doc["header"])
    header["potential"]["model"]["num_features"] += 1
    path = tmp_path / "mismatch.eqf"
    _write_doc(path, header, doc["params"])
    _load_fails(path)


@pytest.mark.parametrize(
    "edit",
    [
        lambda pot: pot["model"].update(name="no-such-model"),
        lambda pot: pot["model"].update(bogus_hyperparameter=3),
        lambda pot: pot["model"].update(num_interactions=0),  # rejected by the config itself
        lambda pot: pot.pop("species"),
        lambda pot: pot.update(atomic_energies=[1.0]),
        lambda pot: pot.update(dtype="float16"),
        lambda pot: pot.update(unknown_field=1),
    ],
    ids=[
        "unknown-model",
        "unknown-hyperparameter",
        "invalid-hyperparameter",
        "no-species",
        "e0-count",
        "dtype",
        "unknown-field",
    ],
)
def test_invalid_potential_description(saved, tmp_path, edit):
    _, _, doc = saved
    header = json.loads(doc["header"])
    edit(header["potential"])
    path = tmp_path / "bad.eqf"
    _write_doc(path, header, doc["params"])
    _load_fails(path, "invalid potential description")


def test_load_executes_no_code(saved, tmp_path):
    """A pickle payload is just bytes to the loader: it fails to parse and runs nothing."""
    import pickle

    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(str(marker)))
    path = tmp_path / "pickle.eqf"
    path.write_bytes(payload)
    _load_fails(path)
    assert not marker.exists()


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


# ------------------------------------------------------------------------------- file permissions
@pytest.fixture
def umask():
    """Set a known umask for the test and restore the previous one afterwards."""
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_write_gives_the_usual_permissions(tmp_path, umask, mask, mode):
    """Like ``open(path, "w")``: 0o666 less the umask for a new file (not mkstemp's 0600)."""
    umask(mask)
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"abc")
    assert path.read_bytes() == b"abc"
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_atomic_write_keeps_the_mode_of_a_replaced_file(tmp_path, umask):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")
    path.chmod(0o640)
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and stat.S_IMODE(path.stat().st_mode) == 0o640


def test_saved_model_file_mode(tmp_path, umask):
    harness = get_harness("schnet")
    path = save_model(tmp_path / "m.eqf", harness.potential, harness.params)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


# ------------------------------------------------------------------------------- integrity
def test_checksum_detects_a_flipped_weight_bit(saved, tmp_path):
    """A bit flip inside a weight leaves a parsable file with another number: the checksum refuses it."""
    _, raw, doc = saved
    leaf = np.asarray(jax.tree.leaves(doc["params"])[0])
    at = raw.find(leaf.tobytes())
    assert at > 0 and "checksum" in doc
    damaged = bytearray(raw)
    damaged[at] ^= 0x01  # lowest mantissa bit of the first weight
    path = tmp_path / "flipped.eqf"
    path.write_bytes(bytes(damaged))
    _load_fails(path, "checksum")


def test_a_damaged_checksum_key_does_not_pass_as_a_file_without_checksum(saved, tmp_path):
    """Two bit flips, one in the key ``checksum`` and one in a weight (found by the open-ended fuzzing,
    tests/test_fuzz_open.py): without the check for unknown top-level entries the file read as one written
    before checksums existed, with another weight."""
    _, raw, doc = saved
    leaf = np.asarray(jax.tree.leaves(doc["params"])[0])
    damaged = bytearray(raw)
    damaged[raw.find(leaf.tobytes())] ^= 0x01
    key = raw.find(b"checksum")
    damaged[key + 7] ^= 0x01  # "checksum" -> "checksul"
    path = tmp_path / "flipped.eqf"
    path.write_bytes(bytes(damaged))
    _load_fails(path, "unexpected top-level entries")


@pytest.mark.parametrize("where", ["weight", "e0", "scale", "shift", "r_max"])
def test_non_finite_values_are_refused_at_load(saved, tmp_path, where):
    """NaN weights (a diverged run) or a NaN/inf E0, scale, shift or r_max never load as a model."""
    _, _, doc = saved
    header = json.loads(doc["header"])
    params = jax.tree.map(np.array, doc["params"])
    if where == "weight":
        jax.tree.leaves(params)[0].reshape(-1)[0] = np.nan
    elif where == "e0":
        header["potential"]["atomic_energies"][0] = float("nan")
    else:
        header["potential"][where] = float("inf")
    path = tmp_path / "nonfinite.eqf"
    _write_doc(path, header, params)
    _load_fails(path, "NaN|inf|finite")
