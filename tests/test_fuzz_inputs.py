"""Property-based bad-input fuzzing (hypothesis) of the readers, the config loader and the model-file loader.

Every generated input -- truncated, bit-flipped, overwritten, wrong-typed, wrong-shaped, NaN-laden or empty --
must end in one of the package's documented errors whose message names the file (and, for a bad value, the
structure (frame) and atom, or the config key, or the parameter), or in a successful read whose result
holds no NaN or inf. A raw traceback of any other exception type fails the test. Where the format carries
a checksum (npz: zip CRC-32; native HDF5: HDF5 metadata checksums and Fletcher-32; model file: SHA-256),
a successful read of a damaged file must also return exactly the original content.

The number of generated cases per target is printed at the end of the module (run with ``-s``) and kept in
:data:`CASES`. Everything is derandomised and bounded: the module runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

import ase.io
import flax.serialization
import h5py
import jax
import numpy as np
import pytest
import yaml
from flax.traverse_util import flatten_dict, unflatten_dict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from equiforce.data import DataError, StructureSet
from equiforce.data.hdf5 import write_hdf5
from equiforce.data.readers import read_structures
from equiforce.potentials import Potential
from equiforce.potentials.model_io import ModelFileError, _checksum, load_model, read_header, save_model
from equiforce.potentials.schnet import SchNetConfig
from equiforce.training.config import ConfigError, TrainConfig, apply_overrides, field_range, load_config

#: generated cases per target and their outcome ("refused": the documented error; "read": a valid result),
#: filled while the module runs and printed at the end
CASES: collections.Counter[tuple[str, str]] = collections.Counter()


def record(target: str, outcome: object) -> None:
    CASES[target, "refused" if isinstance(outcome, Exception) else "read"] += 1


FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


def fuzz(n: int) -> settings:
    return settings(FUZZ, max_examples=n)


REPO = Path(__file__).resolve().parents[1]
EXAMPLE_CONFIG = REPO / "examples" / "aspirin_cpu.yaml"
_names = itertools.count()


@pytest.fixture(scope="module", autouse=True)
def _report_case_counts():
    yield
    targets = sorted({target for target, _ in CASES})
    lines = []
    for t in targets:
        refused, read = CASES[t, "refused"], CASES[t, "read"]
        lines.append(f"  {t:34s} {refused + read:5d}  refused {refused:4d}  read {read:4d}")
    print(f"\nfuzz cases generated: {sum(CASES.values())}\n" + "\n".join(lines))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def fresh(work: Path, suffix: str) -> Path:
    """A new file name in ``work`` (hypothesis reuses function-scoped fixtures across examples)."""
    return work / f"case{next(_names):05d}{suffix}"


def message_names_file(err: Exception, path: Path) -> None:
    assert str(path) in str(err), f"message does not name the file {path}: {err}"


# ============================================================================================ byte damage
@st.composite
def damaged(draw: st.DrawFn, raw: bytes) -> bytes:
    """``raw`` truncated, bit-flipped, partly overwritten, with bytes inserted, or emptied."""
    kind = draw(st.sampled_from(["truncate", "flip", "flip", "overwrite", "insert", "empty"]))
    head = min(len(raw), 4096)  # headers and metadata live mostly near the start: bias offsets there
    offset = st.one_of(st.integers(0, head - 1), st.integers(0, len(raw) - 1))
    if kind == "truncate":
        return raw[: draw(offset)]
    if kind == "empty":
        return b""
    if kind == "insert":
        at = draw(offset)
        return raw[:at] + draw(st.binary(min_size=1, max_size=16)) + raw[at:]
    out = bytearray(raw)
    if kind == "flip":
        for at, bit in draw(st.lists(st.tuples(offset, st.integers(0, 7)), min_size=1, max_size=4)):
            out[at] ^= 1 << bit
    else:
        at = draw(offset)
        junk = draw(st.binary(min_size=1, max_size=32))
        out[at : at + len(junk)] = junk
    return bytes(out)


# ============================================================================================ readers
N_FRAMES = 4
Z = np.array([8, 1, 1])
_rng = np.random.default_rng(7)
MOLECULE = {
    "z": Z,
    "pos": np.array([[0.0, 0.0, 0.1], [0.76, 0.0, -0.5], [-0.76, 0.0, -0.5]]) + _rng.normal(0, 0.05, (N_FRAMES, 3, 3)),
    "energy": -47000.0 + _rng.normal(0, 1.0, N_FRAMES),
    "forces": _rng.normal(0, 5.0, (N_FRAMES, 3, 3)),
    "cell": np.tile(np.eye(3) * 6.0, (N_FRAMES, 1, 1)),
}

#: npz layouts: key -> (role, array); roles say which value a key holds for the located-NaN checks
NPZ_LAYOUTS: dict[str, dict[str, tuple[str, np.ndarray]]] = {
    "rmd17": {
        "nuclear_charges": ("z", Z.astype(np.uint8)),
        "coords": ("pos", MOLECULE["pos"]),
        "energies": ("energy", MOLECULE["energy"]),
        "forces": ("forces", MOLECULE["forces"]),
        "old_indices": ("ignored", np.arange(N_FRAMES)),
    },
    "md17": {
        "z": ("z", Z),
        "R": ("pos", MOLECULE["pos"]),
        "E": ("energy", MOLECULE["energy"][:, None]),
        "F": ("forces", MOLECULE["forces"]),
    },
    "nequip": {
        "atomic_numbers": ("z2d", np.tile(Z, (N_FRAMES, 1))),
        "pos": ("pos", MOLECULE["pos"]),
        "energy": ("energy", MOLECULE["energy"]),
        "forces": ("forces", MOLECULE["forces"]),
        "cell": ("cell", MOLECULE["cell"]),
        "pbc": ("pbc", np.array([True, True, True])),
    },
}
REQUIRED = {"rmd17": {"nuclear_charges", "coords", "energies", "forces"}, "md17": {"z", "R", "E", "F"}}
REQUIRED["nequip"] = {"atomic_numbers", "pos"}


def mixed_set() -> StructureSet:
    """Molecules and crystals of different sizes, periodic and not, with a stress label on some."""
    rng = np.random.default_rng(3)
    sizes = np.array([3, 1, 4, 2])
    total = int(sizes.sum())
    cell = np.stack([np.zeros((3, 3)), np.eye(3) * 3.0, np.eye(3) * 4.0 + 0.3 * np.eye(3)[::-1], np.zeros((3, 3))])
    pbc = np.array([[False] * 3, [True] * 3, [True, True, False], [False] * 3])
    stress = rng.normal(0, 0.01, (4, 6))
    stress[[0, 3]] = np.nan  # molecules: no stress label
    return StructureSet(
        atomic_numbers=rng.integers(1, 30, total),
        positions=rng.uniform(0, 3, (total, 3)),
        n_atoms=sizes,
        cell=cell,
        pbc=pbc,
        energy=rng.normal(-10, 1, 4),
        forces=rng.normal(0, 1, (total, 3)),
        stress=stress,
    )


@pytest.fixture(scope="module")
def base_files(work: Path) -> dict[str, Path]:
    """One valid small file of every supported kind."""
    files = {}
    for layout, arrays in NPZ_LAYOUTS.items():
        plain = {k: a for k, (_, a) in arrays.items()}
        np.savez(work / f"{layout}.npz", **plain)
        np.savez_compressed(work / f"{layout}_compressed.npz", **plain)
        files[layout] = work / f"{layout}.npz"
        files[f"{layout}_compressed"] = work / f"{layout}_compressed.npz"
    s = mixed_set()
    files["hdf5"] = write_hdf5(work / "mixed.h5", s)
    files["extxyz"] = work / "mixed.extxyz"
    ase.io.write(files["extxyz"], [s.to_atoms(k) for k in range(len(s))], format="extxyz")
    files["db"] = work / "mixed.db"
    ase.io.write(files["db"], [s.to_atoms(k) for k in range(len(s))], format="db")
    return files


@pytest.fixture(scope="module")
def reference(base_files: dict[str, Path]) -> dict[str, StructureSet]:
    """What the undamaged files read as (each is also checked once to be valid)."""
    out = {name: read_structures(path) for name, path in base_files.items()}
    for s in out.values():
        assert_valid_set(s)
    return out


def assert_valid_set(s: StructureSet) -> None:
    """A successful read: at least one structure, atomic numbers in range, nothing NaN or inf."""
    assert len(s) > 0 and np.all(s.n_atoms > 0)
    assert s.atomic_numbers.min() >= 1 and s.atomic_numbers.max() <= 118
    assert np.all(np.isfinite(s.positions)) and np.all(np.isfinite(s.cell))
    for label in (s.energy, s.forces):
        assert label is None or np.all(np.isfinite(label))
    if s.stress is not None:  # a row is either a finite label or all NaN (no label)
        assert np.all(np.all(np.isfinite(s.stress), axis=1) | np.all(np.isnan(s.stress), axis=1))


def assert_same_set(a: StructureSet, b: StructureSet) -> None:
    for name in ("atomic_numbers", "positions", "n_atoms", "cell", "pbc", "energy", "forces", "stress"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            np.testing.assert_array_equal(x, y, err_msg=name)


def read_outcome(path: Path) -> StructureSet | DataError:
    """``read_structures(path)``: a valid set, or a DataError naming the file. Anything else propagates."""
    try:
        s = read_structures(path)
    except DataError as err:
        message_names_file(err, path)
        return err
    assert_valid_set(s)
    return s


# formats whose damage is detected by a checksum: a successful read must return the original content
CHECKSUMMED = {"rmd17", "md17", "nequip", "rmd17_compressed", "md17_compressed", "nequip_compressed", "hdf5"}


@pytest.mark.parametrize(
    "kind",
    ["rmd17", "md17", "nequip", "rmd17_compressed", "md17_compressed", "nequip_compressed", "hdf5", "extxyz", "db"],
)
@fuzz(45)
@given(data=st.data())
def test_damaged_structure_file(kind, data, work, base_files, reference):
    base = base_files[kind]
    raw = data.draw(damaged(base.read_bytes()), label="bytes")
    path = fresh(work, base.suffix)
    path.write_bytes(raw)
    out = read_outcome(path)
    record(f"readers: damaged {base.suffix}", out)
    if isinstance(out, StructureSet) and kind in CHECKSUMMED:
        assert_same_set(out, reference[kind])
    path.unlink()


@pytest.mark.parametrize("suffix", [".npz", ".h5", ".extxyz", ".xyz", ".db"])
@fuzz(15)
@given(raw=st.binary(max_size=300))
def test_random_bytes(suffix, raw, work):
    path = fresh(work, suffix)
    path.write_bytes(raw)
    record("readers: random bytes", read_outcome(path))
    path.unlink()


# ------------------------------------------------------------------------------------ npz array mutations
BAD_VALUES = st.sampled_from([np.nan, np.inf, -np.inf])
BAD_Z = st.sampled_from([0, -1, 119, 255, 2**32 + 6, 1.5, np.nan])


@st.composite
def npz_mutation(draw: st.DrawFn, layout: str) -> tuple[dict[str, np.ndarray], str, str | None]:
    """(arrays, what was done, regex the error must match or None if success is allowed)."""
    arrays = {k: a.copy() for k, (_, a) in NPZ_LAYOUTS[layout].items()}
    roles = {k: r for k, (r, _) in NPZ_LAYOUTS[layout].items()}
    key = draw(st.sampled_from(sorted(arrays)))
    role = roles[key]
    a = arrays[key]
    kind = draw(st.sampled_from(["value", "value", "dtype", "shape", "empty", "drop", "scalar"]))
    must: str | None = None
    if kind == "value" and role in ("pos", "forces", "energy", "cell"):
        a = a.astype(np.float64)
        f = draw(st.integers(0, N_FRAMES - 1))
        if role == "energy":
            a.reshape(N_FRAMES, -1)[f, 0] = draw(BAD_VALUES)
            must = rf"structure {f}\b"
        elif role == "cell":
            a[f, draw(st.integers(0, 2)), draw(st.integers(0, 2))] = draw(BAD_VALUES)
            must = rf"cell.*structure {f}\b"
        else:
            atom = draw(st.integers(0, len(Z) - 1))
            a[f, atom, draw(st.integers(0, 2))] = draw(BAD_VALUES)
            must = rf"{'positions' if role == 'pos' else 'forces'}.*structure {f}, atom {atom}\b"
    elif kind == "value" and role in ("z", "z2d"):
        bad = draw(BAD_Z)
        a = a.astype(np.float64 if isinstance(bad, float) else np.int64)
        atom = draw(st.integers(0, len(Z) - 1))
        a[..., atom] = bad  # every frame of a per-frame array: the molecule stays the same
        must = rf"atomic numbers.*structure 0, atom {atom}\b"
    elif kind == "dtype":
        new = draw(st.sampled_from(["complex", "bool", "str", "bytes", "record", "int", "float16", "uint8"]))
        if new == "complex":
            a = a.astype(np.complex128) + 1j
        elif new == "bool":
            a = a != 0
        elif new in ("str", "bytes"):
            a = a.astype(str if new == "str" else bytes)
        elif new == "record":
            a = np.zeros(a.shape, dtype=[("x", "f8"), ("y", "i4")])
        else:
            a = a.astype({"int": np.int64, "float16": np.float16, "uint8": np.uint8}[new])
        # integer atomic numbers, pbc and cell of another width may be acceptable; positions and labels must be
        # floats of at least 32 bits (integers wrap or truncate, float16 keeps 3 digits); anything else is refused
        if role in ("pos", "forces", "energy"):
            must = rf"npz key '{key}' \(\w+\) has dtype {re.escape(str(a.dtype))}, expected float32 or float64"
        else:
            refusable = role != "ignored" and (
                new in ("complex", "str", "bytes", "record") or (new == "bool" and role != "pbc")
            )
            must = rf"{key}|dtype|atomic numbers|positions|energies|forces|cell|pbc" if refusable else None
    elif kind == "shape":
        a = draw(
            st.sampled_from(
                [a.reshape(-1), a[..., :1], a[:1], a[None], np.swapaxes(a, 0, -1) if a.ndim > 1 else a[:-1]]
            )
        )
    elif kind == "empty":
        a = np.zeros((0, *a.shape[1:]), a.dtype)
        if role != "ignored":
            must = "."
    elif kind == "drop":
        del arrays[key]
        a = None
        if key in REQUIRED[layout]:
            must = "missing npz key|unknown npz layout"
    else:  # scalar
        a = np.asarray(a.reshape(-1)[0])
        if role not in ("ignored", "pbc"):
            must = "."
    if a is not None:
        arrays[key] = a
    return arrays, f"{kind} {key}", must


@pytest.mark.parametrize("layout", sorted(NPZ_LAYOUTS))
@fuzz(60)
@given(data=st.data())
def test_npz_array_mutations(layout, data, work):
    arrays, what, must = data.draw(npz_mutation(layout), label="mutation")
    path = fresh(work, ".npz")
    np.savez(path, **arrays)
    out = read_outcome(path)
    record(f"readers: npz arrays ({layout})", out)
    if must is not None:
        assert isinstance(out, DataError), f"{what}: read without error"
        assert re.search(must, str(out)), f"{what}: {out}"
    path.unlink()


# ------------------------------------------------------------------------------------ extended XYZ text
def xyz_frames(text: str) -> list[list[str]]:
    lines = text.splitlines()
    frames, i = [], 0
    while i < len(lines):
        n = int(lines[i])
        frames.append(lines[i : i + n + 2])
        i += n + 2
    return frames


@fuzz(60)
@given(data=st.data())
def test_extxyz_bad_numbers_are_located(data, work, base_files):
    """A NaN/inf position, force or energy in an extended XYZ file is reported with its frame and atom."""
    frames = xyz_frames(base_files["extxyz"].read_text())
    f = data.draw(st.integers(0, len(frames) - 1))
    bad = data.draw(st.sampled_from(["nan", "NaN", "inf", "-inf", "1e999"]))
    where = data.draw(st.sampled_from(["pos", "forces", "energy"]))
    if where == "energy":
        frames[f][1] = re.sub(r"energy=\S+", f"energy={bad}", frames[f][1])
        must = rf"energy.*structure {f}\b"
    else:
        atom = data.draw(st.integers(0, len(frames[f]) - 3))
        col = data.draw(st.integers(1, 3)) + (3 if where == "forces" else 0)
        tokens = frames[f][2 + atom].split()
        tokens[col] = bad
        frames[f][2 + atom] = " ".join(tokens)
        must = rf"{'positions' if where == 'pos' else 'forces'}.*structure {f}, atom {atom}\b"
    path = fresh(work, ".extxyz")
    path.write_text("\n".join(line for fr in frames for line in fr) + "\n")
    out = read_outcome(path)
    record("readers: extxyz located NaN", out)
    assert isinstance(out, DataError) and re.search(must, str(out)), out
    path.unlink()


XYZ_TOKENS = ["nan", "inf", "-inf", "1e999", "abc", "", "X", "Xx", "0", "-1", "1e308", "T", "3.5.1", "'", '"', "="]


@fuzz(80)
@given(data=st.data())
def test_extxyz_token_mutations(data, work, base_files):
    lines = base_files["extxyz"].read_text().splitlines()
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(lines) - 1))
        tokens = lines[i].split() or [""]
        op = data.draw(st.sampled_from(["replace", "delete-token", "delete-line", "duplicate-line"]))
        if op == "replace":
            tokens[data.draw(st.integers(0, len(tokens) - 1))] = data.draw(st.sampled_from(XYZ_TOKENS))
            lines[i] = " ".join(tokens)
        elif op == "delete-token":
            del tokens[data.draw(st.integers(0, len(tokens) - 1))]
            lines[i] = " ".join(tokens)
        elif op == "delete-line":
            del lines[i]
        else:
            lines.insert(i, lines[i])
        if not lines:
            break
    path = fresh(work, ".extxyz")
    path.write_text("\n".join(lines) + "\n")
    record("readers: extxyz tokens", read_outcome(path))
    path.unlink()


# ------------------------------------------------------------------------------------ native HDF5 content
@st.composite
def hdf5_edit(draw: st.DrawFn) -> tuple[str, Any, str | None]:
    """(dataset or attribute, what to do, regex the error must match or None)."""
    s = mixed_set()
    offsets = np.concatenate([[0], np.cumsum(s.n_atoms)])
    kind = draw(
        st.sampled_from(["value", "value", "z", "n_atoms", "dtype", "shape", "delete", "attr", "units", "empty"])
    )
    if kind == "value":
        name = draw(st.sampled_from(["positions", "forces", "energy", "cell", "stress"]))
        bad = draw(BAD_VALUES)
        if name in ("positions", "forces"):
            row = draw(st.integers(0, s.n_total_atoms - 1))
            k = int(np.searchsorted(offsets, row, side="right") - 1)
            col = draw(st.integers(0, 2))
            return name, ("set", (row, col), bad), rf"{name}.*structure {k}, atom {row - offsets[k]}\b"
        k = draw(st.integers(0, len(s) - 1))
        if name == "energy":
            return name, ("set", (k,), bad), rf"energy.*structure {k}\b"
        if name == "cell":
            return name, ("set", (k, draw(st.integers(0, 2)), draw(st.integers(0, 2))), bad), rf"cell.*structure {k}\b"
        if np.isnan(bad) and not s.has_stress[k]:  # NaN in a row of NaN: still "no stress label"
            return name, ("set", (k, draw(st.integers(0, 5))), bad), None
        return name, ("set", (k, draw(st.integers(0, 5))), bad), rf"stress.*structure {k}\b"
    if kind == "z":
        row = draw(st.integers(0, s.n_total_atoms - 1))
        k = int(np.searchsorted(offsets, row, side="right") - 1)
        bad = draw(st.sampled_from([0, -1, 119, 2**32 + 6, -(2**31)]))
        return "atomic_numbers", ("z", row, bad), rf"atomic numbers.*structure {k}, atom {row - offsets[k]}\b"
    if kind == "n_atoms":
        values = draw(st.sampled_from([[3, 1, 4, 0], [3, 1, 5, 1], [-1, 5, 4, 2], [3, 1, 4, 2.5], [10, 0, 0, 0]]))
        # [3, 1, 5, 1] re-partitions the same 10 atoms: a consistent file, so reading it is allowed
        return "n_atoms", ("replace", np.asarray(values)), None if values == [3, 1, 5, 1] else "."
    if kind == "dtype":
        name = draw(st.sampled_from(["positions", "energy", "atomic_numbers", "n_atoms", "pbc", "cell", "forces"]))
        new = draw(st.sampled_from(["complex", "str", "float-for-int", "int", "float16"]))
        if new in ("int", "float16"):
            if name in ("positions", "energy", "forces"):  # wrapped or rounded numbers: refused, naming the dataset
                want = {"int": "int64", "float16": "float16"}[new]
                return name, ("dtype", new), rf"dataset '{name}' has dtype {want}, expected float32 or float64"
            # integer atomic numbers, sizes, pbc and cell are fine, and so is a float16 cell
            return name, ("dtype", new), "." if new == "float16" and name != "cell" else None
        return name, ("dtype", new), "." if new != "float-for-int" or name in ("atomic_numbers", "n_atoms") else None
    if kind == "shape":
        name = draw(st.sampled_from(["positions", "energy", "cell", "pbc", "stress", "forces", "atomic_numbers"]))
        return name, ("shape", draw(st.sampled_from(["short", "scalar", "group"]))), "."
    if kind == "delete":
        name = draw(st.sampled_from(["positions", "n_atoms", "cell", "pbc", "atomic_numbers", "energy", "stress"]))
        required = name in ("positions", "n_atoms", "cell", "pbc", "atomic_numbers")
        return name, ("delete",), "missing dataset" if required else None
    if kind == "empty":
        return "n_structures", ("no structures",), "no structures"
    if kind == "units":
        return "units", ("attr", draw(st.sampled_from(["", "[]", "null", '{"length": "nm"}', "{", "42"]))), "."
    name = draw(st.sampled_from(["n_structures", "n_total_atoms", "format_version", "format"]))
    value = draw(st.sampled_from(["3", 2.5, -1, 10**6, True, np.array([1, 2]), b"\xff", 0]))
    return name, ("attr", value), None


@fuzz(120)
@given(edit=hdf5_edit())
def test_hdf5_content_edits(edit, work, base_files):
    name, action, must = edit
    path = fresh(work, ".h5")
    path.write_bytes(base_files["hdf5"].read_bytes())
    with h5py.File(path, "r+") as f:
        op = action[0]
        if op == "set":
            f[name][action[1]] = action[2]
        elif op == "z":
            z = f[name][:].astype(np.int64)
            z[action[1]] = action[2]
            del f[name]
            f[name] = z
        elif op == "replace":
            del f[name]
            f[name] = action[1]
        elif op == "dtype":
            data = f[name][:]
            del f[name]
            if action[1] == "complex":
                f[name] = data.astype(np.complex128)
            elif action[1] == "str":
                f.create_dataset(name, data=data.astype(str).astype(object), dtype=h5py.string_dtype())
            elif action[1] in ("int", "float16"):
                f[name] = data.astype(np.int64 if action[1] == "int" else np.float16)
            else:
                f[name] = data.astype(np.float64) + (0.5 if name in ("atomic_numbers", "n_atoms") else 0.0)
        elif op == "shape":
            data = f[name][:]
            del f[name]
            if action[1] == "short":
                f[name] = data.reshape(-1)[:-1] if data.ndim == 1 else data[..., :-1]
            elif action[1] == "scalar":
                f[name] = data.reshape(-1)[0]
            else:
                f.create_group(name)
        elif op == "delete":
            del f[name]
        elif op == "no structures":
            f.attrs["n_structures"] = 0
            f.attrs["n_total_atoms"] = 0
        else:
            f.attrs[name] = action[1]
    out = read_outcome(path)
    record("readers: hdf5 content", out)
    if must is not None:
        assert isinstance(out, DataError), f"{name} {action}: read without error"
        assert re.search(must, str(out)), f"{name} {action}: {out}"
    path.unlink()


# ============================================================================================ config loader
def config_keys(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, Any]]:
    """Every leaf key of the config dataclasses (dotted) with its type hint; new fields are picked up."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += config_keys(hint, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", hint))
    return out


CONFIG_KEYS = config_keys()
FLOAT_KEYS = [k for k, hint in CONFIG_KEYS if float in (typing.get_args(hint) or (hint,))]
KEY_NAMES = sorted({part for k, _ in CONFIG_KEYS for part in k.split(".")})

INF = math.inf
SEED_MAX = 2**63 - 1  # NumPy seeds must be >= 0; JAX's PRNGKey takes a signed 64-bit integer
#: the allowed values of every numeric config key, written down here from the documented meaning of each key
#: (not read from the code): (low, high, low excluded, high excluded). A new numeric key fails
#: test_every_numeric_key_declares_its_documented_range until it gets an entry here and a declared range.
RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "seed": (0, SEED_MAX, False, False),
    "data.valid_fraction": (0, 1, True, True),  # enforced only when data.valid is not given
    "data.train_size": (1, INF, False, True),
    "data.test_size": (1, INF, False, True),
    "data.split_seed": (0, SEED_MAX, False, False),
    "data.prefetch_batches": (1, INF, False, True),
    "data.statistics_size": (1, INF, False, True),
    "model.r_max": (0, INF, True, True),
    "model.ensemble_size": (1, INF, False, True),
    "loss.energy_weight": (0, INF, False, True),
    "loss.forces_weight": (0, INF, False, True),
    "loss.stress_weight": (0, INF, False, True),
    "loss.huber_delta": (0, INF, True, True),
    "optim.learning_rate": (0, INF, True, True),
    "optim.weight_decay": (0, INF, False, True),
    "optim.clip_grad_norm": (0, INF, True, True),
    "optim.warmup_epochs": (0, INF, False, True),
    "optim.plateau_patience": (0, INF, False, True),
    "optim.plateau_factor": (0, 1, True, True),
    "optim.min_learning_rate": (0, INF, False, True),
    "optim.ema_decay": (0, 1, False, True),  # 1 would never move the average
    "optim.batch_size": (1, INF, False, True),
    "optim.max_epochs": (1, INF, False, True),
    "optim.time_budget_minutes": (0, INF, True, True),
    "optim.early_stopping_patience": (1, INF, False, True),  # 0 would stop after the first epoch
    "md_check.steps": (0, INF, False, True),  # 0: no check
    "md_check.timestep_fs": (0, INF, True, True),
    "md_check.temperature_K": (0, INF, False, True),
    "md_check.report_interval": (1, INF, False, True),
    "md_check.max_drift_meV_per_atom_per_ps": (0, INF, True, True),
    "md_check.supercell": (1, INF, False, True),  # every entry
    "md_check.max_minutes": (0, INF, True, True),  # None (the default): a quarter of the training budget
    "finetune.frozen_learning_rate": (0, INF, False, True),
    "finetune.frozen_warmup_epochs": (0, INF, False, True),
    "finetune.replay_fraction": (0, 10, False, False),
    "parallel.devices": (1, INF, False, True),  # when a count (not "all")
    "parallel.num_processes": (1, INF, False, True),
    "parallel.process_id": (0, INF, False, True),
    "parallel.initialization_timeout": (1, INF, False, True),
    "parallel.heartbeat_timeout": (1, INF, False, True),
    "parallel.shutdown_timeout": (1, INF, False, True),
}


def numeric_kind(hint: Any) -> type | None:
    """``int`` or ``float`` when a key's type admits a number (a tuple of them included), else None; the E0s
    of ``model.atomic_energies`` (a dict: any finite energy) and ``model.hyperparameters`` (checked by each
    model's own config) are not numeric keys of the training config."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for a in args:
        if typing.get_origin(a) is tuple:
            a = typing.get_args(a)[0]
        if a in (int, float):
            return a
    return None


NUMERIC_KEYS = {k: numeric_kind(hint) for k, hint in CONFIG_KEYS if numeric_kind(hint) is not None}


def in_range(key: str, value: Any) -> bool:
    lo, hi, lo_open, hi_open = RANGES[key]
    return (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)


def range_text(key: str) -> str:
    """The range as messages and the reference write it: ``>= 1``, ``> 0``, ``in (0, 1)``."""
    lo, hi, lo_open, hi_open = RANGES[key]
    show = {SEED_MAX: "2^63 - 1"}
    lo_s, hi_s = (show.get(x, f"{x:g}") for x in (lo, hi))
    if hi == INF:
        return f"{'>' if lo_open else '>='} {lo_s}"
    return f"in {'(' if lo_open else '['}{lo_s}, {hi_s}{')' if hi_open else ']'}"


def edge_values(key: str, inside: bool) -> list[Any]:
    """Values just outside (``inside=False``) or just inside a key's range, at each finite end: the next
    integer for an int key, the next float (``np.nextafter``) for a float key."""
    lo, hi, lo_open, hi_open = RANGES[key]
    out = []
    for bound, is_open, outward in ((lo, lo_open, -INF), (hi, hi_open, INF)):
        if bound == INF:
            continue
        if NUMERIC_KEYS[key] is int:
            step = 1 if outward > 0 else -1
            value = (bound if is_open else bound + step) if not inside else (bound - step if is_open else bound)
        elif inside:
            value = float(np.nextafter(bound, -outward)) if is_open else float(bound)
        else:
            value = float(bound) if is_open else float(np.nextafter(bound, outward))
        out.append(value)
    return out


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
YAML_VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(KEY_NAMES) | st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=12,
)
WRONG_VALUES = st.one_of(
    SCALARS,
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 10**400, -1, 0, "", "fit", [], {}, [1.0], {"1": "x"}]),
    st.lists(SCALARS, max_size=2),
    st.dictionaries(st.text(max_size=3), SCALARS, max_size=2),
)


def assert_valid_config(cfg: TrainConfig) -> None:
    def floats(obj: Any) -> list[float]:
        if dataclasses.is_dataclass(obj):
            return [x for f in dataclasses.fields(obj) for x in floats(getattr(obj, f.name))]
        if isinstance(obj, dict):
            return [x for v in obj.values() for x in floats(v)]
        if isinstance(obj, list | tuple):
            return [x for v in obj for x in floats(v)]
        return [obj] if isinstance(obj, float) else []

    assert isinstance(cfg, TrainConfig)
    assert all(math.isfinite(x) for x in floats(cfg))
    for key in NUMERIC_KEYS:  # every number accepted lies in its key's documented range
        section, _, leaf = key.rpartition(".")
        node = getattr(cfg, section) if section else cfg
        value = getattr(node, leaf)
        if key == "data.valid_fraction" and cfg.data.valid is not None:
            continue
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, int | float) and not isinstance(v, bool):
                assert in_range(key, v), f"{key} = {value!r} accepted, outside {range_text(key)}"


def config_outcome(path: Path | None, overrides: list[str] | None = None) -> TrainConfig | ConfigError:
    try:
        cfg = load_config(path, overrides)
    except ConfigError as err:
        if path is not None:
            message_names_file(err, path)
        return err
    assert_valid_config(cfg)
    return cfg


def _section_keys() -> dict[str, list[str]]:
    out: dict[str, list[str]] = collections.defaultdict(list)
    for key, _ in CONFIG_KEYS:
        section, _, leaf = key.rpartition(".")
        out[section].append(leaf)
    return out


SECTIONS = _section_keys()
#: documents shaped like a config (real sections and keys, random values), so most reach the type checks
CONFIG_LIKE = st.dictionaries(
    st.sampled_from(sorted(SECTIONS[""] + [s for s in SECTIONS if s])),
    st.none(),
    max_size=4,
).flatmap(
    lambda top: st.fixed_dictionaries(
        {
            k: st.dictionaries(st.sampled_from(SECTIONS[k]), YAML_VALUES, max_size=3) if k in SECTIONS else YAML_VALUES
            for k in top
        }
    )
)


@fuzz(150)
@given(doc=CONFIG_LIKE | st.dictionaries(st.sampled_from(KEY_NAMES) | st.text(max_size=6), YAML_VALUES, max_size=5))
def test_random_yaml_documents(doc, work):
    path = fresh(work, ".yaml")
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    record("config: random YAML", config_outcome(path))
    path.unlink()


@fuzz(120)
@given(data=st.data())
def test_damaged_config_file(data, work):
    raw = data.draw(damaged(EXAMPLE_CONFIG.read_bytes()), label="bytes")
    path = fresh(work, ".yaml")
    path.write_bytes(raw)
    record("config: damaged file", config_outcome(path))
    path.unlink()


@fuzz(200)
@given(key=st.sampled_from([k for k, _ in CONFIG_KEYS]), value=WRONG_VALUES)
def test_wrong_value_per_key(key, value, work):
    """Every key set to a value of a wrong type, NaN/inf, out of range or empty: refused naming the file and
    the key, or accepted with finite values, each number inside its key's range (:data:`RANGES`)."""
    doc = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    section, _, leaf = key.rpartition(".")
    node = doc.setdefault(section, {}) if section else doc
    node[leaf] = value
    path = fresh(work, ".yaml")
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    out = config_outcome(path)
    record("config: wrong value per key", out)
    if isinstance(out, ConfigError):
        assert key in str(out), f"{key}={value!r}: the message does not name the key: {out}"
    path.unlink()


def test_every_numeric_key_declares_its_documented_range():
    """Each numeric key of the config declares the range the docs give it (a key without one, or a declared
    range that differs from :data:`RANGES`, fails)."""
    missing, stale = sorted(set(NUMERIC_KEYS) - set(RANGES)), sorted(set(RANGES) - set(NUMERIC_KEYS))
    assert not missing, f"numeric config key(s) {missing}: write their documented range into RANGES (this file)"
    assert not stale, f"RANGES lists {stale}, which are no numeric config keys"
    for key in NUMERIC_KEYS:
        section, _, leaf = key.rpartition(".")
        cls = typing.get_type_hints(TrainConfig)[section] if section else TrainConfig
        declared = field_range(cls, leaf)
        assert declared is not None, f"{key} declares no range"
        r, unless = declared
        assert (r.lo, r.hi, r.lo_open, r.hi_open) == RANGES[key], key
        assert str(r) == range_text(key), key
        assert unless == ("valid" if key == "data.valid_fraction" else None), key


def _config_with(work: Path, key: str, value: Any) -> Path:
    doc = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    section, _, leaf = key.rpartition(".")
    node = doc.setdefault(section, {}) if section else doc
    node[leaf] = [value, 1, 1] if key == "md_check.supercell" else value
    path = fresh(work, ".yaml")
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    return path


#: values the issue that asked for the ranges (27) found accepted, far outside
FAR_OUTSIDE = [
    ("loss.energy_weight", -1.0),
    ("loss.forces_weight", -1.0),
    ("loss.stress_weight", -1.0),
    ("loss.huber_delta", -1.0),
    ("optim.plateau_factor", -1.0),
    ("optim.plateau_factor", 1.5),
    ("optim.ema_decay", -1.0),
    ("optim.ema_decay", 1.5),
    ("optim.weight_decay", -1.0),
    ("optim.warmup_epochs", -1.0),
    ("optim.min_learning_rate", -1.0),
    ("optim.time_budget_minutes", -1.0),
    ("md_check.temperature_K", -1.0),
    ("optim.plateau_patience", -1),
    ("optim.early_stopping_patience", -1),
    ("optim.max_epochs", 0),
]


@pytest.mark.parametrize(
    ("key", "value"),
    [(k, v) for k in sorted(RANGES) for v in edge_values(k, inside=False)] + FAR_OUTSIDE,
    ids=lambda x: x if isinstance(x, str) else repr(x),
)
def test_out_of_range_value_is_refused(key, value, work):
    """A number just outside (or far outside) its key's range: a ConfigError naming the file, the key, the
    value and the range."""
    assert not in_range(key, value)
    path = _config_with(work, key, value)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    message_names_file(info.value, path)
    assert key in message and range_text(key) in message, message
    assert repr(value) in message, message
    record("config: out of range per key", info.value)
    path.unlink()


#: keys whose in-range edge value needs another key set too (replay_fraction > 0 needs replay_data and a
#: model to fine-tune from); their edge values are tested without the other keys only where that is not needed
NEEDS_OTHER_KEYS = {("finetune.replay_fraction", 10.0)}


@pytest.mark.parametrize(
    ("key", "value"),
    [(k, v) for k in sorted(RANGES) for v in edge_values(k, inside=True) if (k, v) not in NEEDS_OTHER_KEYS],
    ids=lambda x: x if isinstance(x, str) else repr(x),
)
def test_value_just_inside_the_range_is_accepted(key, value, work):
    assert in_range(key, value)
    path = _config_with(work, key, value)
    cfg = load_config(path)
    section, _, leaf = key.rpartition(".")
    got = getattr(getattr(cfg, section) if section else cfg, leaf)
    assert got == ((value, 1, 1) if key == "md_check.supercell" else value)
    record("config: in range per key", cfg)
    path.unlink()


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("text", [".nan", "-.inf", "1e999"])
def test_non_finite_float_override_is_refused(key, text, work):
    with pytest.raises(ConfigError, match=re.escape(key)) as info:
        load_config(EXAMPLE_CONFIG, [f"{key}={text}"])
    message_names_file(info.value, EXAMPLE_CONFIG)
    record("config: NaN/inf overrides", info.value)


OVERRIDE_TEXT = st.lists(st.sampled_from(list("ab.=_ :[]{}-01.5e'\"\\\n\t#&*!%") + KEY_NAMES[:8]), max_size=12).map(
    "".join
)


@fuzz(150)
@given(
    overrides=st.lists(
        st.one_of(
            OVERRIDE_TEXT,
            st.builds(
                lambda k, v: f"{k}={v}",
                st.sampled_from([k for k, _ in CONFIG_KEYS] + ["optim", "a.b", ""]),
                OVERRIDE_TEXT,
            ),
            st.sampled_from(["a.b=", "=x", "optim=3", "optim.learning_rate=.nan", "seed.x=1", "..=1", "=", "model.="]),
        ),
        max_size=3,
    ),
    with_file=st.booleans(),
)
def test_random_overrides(overrides, with_file):
    record("config: random overrides", config_outcome(EXAMPLE_CONFIG if with_file else None, overrides))
    base = {"optim": {"batch_size": 2}, "model": {"hyperparameters": {"num_features": 4}}}
    try:
        out = apply_overrides(base, overrides)
    except ConfigError:
        return
    assert base == {"optim": {"batch_size": 2}, "model": {"hyperparameters": {"num_features": 4}}}  # not mutated
    assert isinstance(out, dict)


@fuzz(20)
@given(raw=st.binary(max_size=200))
def test_non_utf8_and_random_bytes_config(raw, work):
    path = fresh(work, ".yaml")
    path.write_bytes(b"seed: 1\n" + raw)
    record("config: random bytes", config_outcome(path))
    path.unlink()


# ============================================================================================ model files
@pytest.fixture(scope="module")
def model_file(work: Path) -> tuple[Path, bytes, dict, Potential, Any]:
    """A tiny float64 SchNet saved once: (path, bytes, decoded document, potential, params)."""
    potential = Potential(
        model=SchNetConfig(num_interactions=1, num_features=2, num_filters=2, num_rbf=2),
        species=(1, 8),
        r_max=3.0,
        atomic_energies=(-13.6, -2041.8),
        scale=0.7,
        shift=0.1,
        avg_num_neighbours=2.0,
        dtype="float64",
    )
    template = jax.eval_shape(lambda: potential.init(jax.random.PRNGKey(0)))
    rng = np.random.default_rng(5)
    params = jax.tree.map(lambda t: rng.normal(size=t.shape).astype(t.dtype), template)  # no compilation
    path = save_model(work / "tiny.eqf", potential, params, {"note": "fuzz"})
    raw = path.read_bytes()
    return path, raw, flax.serialization.msgpack_restore(raw), potential, params


def model_outcome(path: Path, reference: tuple | None = None) -> tuple | ModelFileError:
    """``load_model(path)``: a loaded model with finite values (equal to ``reference`` when given), or a
    ModelFileError naming the file. ``read_header`` must agree."""
    try:
        potential, params, header = load_model(path)
    except ModelFileError as err:
        message_names_file(err, path)
        try:
            read_header(path)
        except ModelFileError as err2:
            message_names_file(err2, path)
        return err
    numbers = [potential.r_max, potential.scale, potential.shift, potential.avg_num_neighbours]
    assert all(math.isfinite(x) for x in [*numbers, *potential.atomic_energies])
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(params))
    assert read_header(path) == header
    if reference is not None:
        ref_potential, ref_params = reference
        assert potential == ref_potential
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    return potential, params, header


def write_model_doc(path: Path, header: Any, params: Any, checksum: bool) -> None:
    body = {"header": header if isinstance(header, str) else json.dumps(header), "params": params}
    if checksum:
        body["checksum"] = _checksum(body)
    path.write_bytes(flax.serialization.msgpack_serialize(body))


@fuzz(120)
@given(data=st.data())
def test_damaged_model_file(data, work, model_file):
    """Truncated, bit-flipped, overwritten files: an error, or (undamaged content) exactly the saved model."""
    _, raw, _, potential, params = model_file
    path = fresh(work, ".eqf")
    path.write_bytes(data.draw(damaged(raw), label="bytes"))
    record("model: damaged file", model_outcome(path, reference=(potential, params)))
    path.unlink()


POTENTIAL_KEYS = ["species", "r_max", "atomic_energies", "scale", "shift", "avg_num_neighbours", "dtype", "model"]
HYPER_KEYS = ["name", *(f.name for f in dataclasses.fields(SchNetConfig))]
MODEL_WRONG = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 8),  # bounded: a huge layer count is a (slow) valid model, not a damaged file
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 1e308, "", "schnet", "float16"]),
    st.text(max_size=5),
    st.lists(st.one_of(st.integers(-2, 120), st.floats(allow_nan=True)), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(0, 3), max_size=2),
)


@fuzz(150)
@given(data=st.data())
def test_model_header_field_edits(data, work, model_file):
    """Header fields replaced by wrong types, NaN/inf, out-of-range or empty values (E0s, scale, shift,
    r_max, species, hyperparameters, format fields): refused at load, or a model with finite values."""
    _, _, doc, _, _ = model_file
    header = json.loads(doc["header"])
    where = data.draw(st.sampled_from(["potential", "potential", "model", "top", "whole"]))
    value = data.draw(MODEL_WRONG, label="value")
    if where == "potential":
        key = data.draw(st.sampled_from(POTENTIAL_KEYS))
        if data.draw(st.booleans()):
            header["potential"][key] = value
        else:
            del header["potential"][key]
    elif where == "model":
        key = data.draw(st.sampled_from(HYPER_KEYS))
        header["potential"]["model"][key] = value
    elif where == "top":
        key = data.draw(st.sampled_from(["format", "format_version", "potential", "units", "metadata"]))
        header[key] = value
    else:
        header = value
    path = fresh(work, ".eqf")
    write_model_doc(path, header, doc["params"], checksum=data.draw(st.booleans()))
    record("model: header fields", model_outcome(path))
    path.unlink()


@st.composite
def params_edit(draw: st.DrawFn, params: dict) -> tuple[dict, str, str | None]:
    flat = {k: np.array(v) for k, v in flatten_dict(params).items()}
    key = draw(st.sampled_from(sorted(flat)))
    leaf = flat[key]
    name = key[-1]
    kind = draw(st.sampled_from(["nan", "nan", "dtype", "reshape", "drop", "extra", "replace"]))
    must: str | None = "."
    if kind == "nan":
        bad = leaf.copy()
        bad.reshape(-1)[draw(st.integers(0, bad.size - 1))] = draw(BAD_VALUES)
        flat[key] = bad
        must = rf"{re.escape(name)}.*NaN or inf"
    elif kind == "dtype":
        new = draw(st.sampled_from([np.float32, np.int64, np.complex128, np.bool_, np.float16]))
        flat[key] = leaf.astype(new)
    elif kind == "reshape":
        new = draw(st.sampled_from([leaf.reshape(-1), leaf[None], leaf.T, leaf[..., :0], np.concatenate([leaf, leaf])]))
        if new.shape == leaf.shape:
            must = None  # e.g. the transpose of a square matrix: a valid, different model
        flat[key] = new
    elif kind == "drop":
        del flat[key]
    elif kind == "extra":
        flat[(*key[:-1], name + "_extra")] = leaf
    else:
        flat[key] = draw(st.sampled_from([np.float64(1.0), np.array("abc"), np.zeros(0), np.array([b"x"])]))
    return unflatten_dict(flat), f"{kind} {'/'.join(key)}", must


@fuzz(120)
@given(data=st.data())
def test_model_parameter_edits(data, work, model_file):
    """Parameters removed, added, reshaped, retyped or with NaN/inf (with or without a matching checksum,
    as a diverged training would write them): always refused at load, naming the file (and the parameter)."""
    _, _, doc, _, _ = model_file
    params, what, must = data.draw(params_edit(doc["params"]))
    path = fresh(work, ".eqf")
    write_model_doc(path, doc["header"], params, checksum=data.draw(st.booleans()))
    out = model_outcome(path)
    record("model: parameters", out)
    if must is not None:
        assert isinstance(out, ModelFileError), f"{what}: loaded without error"
        assert re.search(must, str(out)), f"{what}: {out}"
    path.unlink()
