"""The host-side labelled structure set: one representation for every reader and writer.

All arrays are NumPy, float64 for coordinates and labels. Units are ASE's: positions and cell in Å,
energy in eV, forces in eV/Å, stress in eV/Å³ with ASE's sign (positive = tensile) and Voigt order
(xx, yy, zz, yz, xz, xy). Readers convert to these units; nothing downstream converts again.

Structures of different sizes are stored concatenated ("ragged"): per-atom arrays have
``n_atoms.sum()`` rows and ``offsets[k]:offsets[k + 1]`` selects structure ``k``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from equiforce.data.errors import DataError

__all__ = ["StructureSet"]


def _numeric(name: str, value: Any, kinds: str = "iuf") -> np.ndarray:
    """``value`` as an array whose dtype kind is one of ``kinds`` (b bool, i/u int, f float).

    Strings, objects, complex numbers, dates and structured records are refused rather than coerced
    (NumPy would parse ``"1.5"`` or drop an imaginary part silently).
    """
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as err:  # ragged nested lists
        raise DataError(f"{name} is not a rectangular array of numbers ({err})") from None
    if arr.dtype.kind not in kinds:
        names = {"b": "bool", "i": "int", "u": "unsigned int", "f": "float"}
        want = " or ".join(names[k] for k in kinds)
        raise DataError(f"{name} has dtype {arr.dtype}, expected {want}")
    return arr


def _as_float64(name: str, value: Any, shape_tail: tuple[int, ...]) -> np.ndarray:
    arr = _numeric(name, value).astype(np.float64)
    if arr.ndim != 1 + len(shape_tail) or tuple(arr.shape[1:]) != shape_tail:
        raise DataError(f"{name} must have shape (n, {', '.join(map(str, shape_tail))}), got {arr.shape}")
    return arr


def _where_atoms(bad: np.ndarray, offsets: np.ndarray) -> str:
    """``"structure k, atom i"`` of the first True row of a per-atom mask (0-based, atom index within its
    structure), plus how many rows and structures are affected."""
    rows = np.flatnonzero(bad)
    structures = np.searchsorted(offsets, rows, side="right") - 1
    k, r = int(structures[0]), int(rows[0])
    more = f" ({rows.size} atoms in {np.unique(structures).size} structures)" if rows.size > 1 else ""
    return f"structure {k}, atom {r - int(offsets[k])}{more}"


def _where_structures(bad: np.ndarray) -> str:
    """``"structure k"`` of the first True entry of a per-structure mask, plus how many are affected."""
    idx = np.flatnonzero(bad)
    more = f" ({idx.size} structures: {idx[:10].tolist()}{'...' if idx.size > 10 else ''})" if idx.size > 1 else ""
    return f"structure {int(idx[0])}{more}"


@dataclass(frozen=True, eq=False)
class StructureSet:
    """A set of atomic structures with optional DFT labels.

    Attributes:
      atomic_numbers: ``[n_total_atoms]`` int32, atomic numbers Z (1..118).
      positions: ``[n_total_atoms, 3]`` float64, Cartesian positions in Å.
      n_atoms: ``[n_structures]`` int64, number of atoms of each structure (> 0).
      cell: ``[n_structures, 3, 3]`` float64, lattice vectors as rows in Å (zeros where not periodic).
      pbc: ``[n_structures, 3]`` bool, periodicity along each lattice vector.
      energy: ``[n_structures]`` float64 total energy in eV, or None.
      forces: ``[n_total_atoms, 3]`` float64 in eV/Å, or None.
      stress: ``[n_structures, 6]`` float64 in eV/Å³ (ASE sign, Voigt xx yy zz yz xz xy), or None.
        Rows that have no stress label are NaN and masked out by :meth:`has_stress`.

    Raises:
      DataError: on inconsistent shapes; an array that is not real numbers (strings, complex, objects;
        ints for ``n_atoms``, bools or 0/1 for ``pbc``); an empty structure; a NaN or inf in positions,
        cell, energy, forces or stress (a stress row may be all NaN, meaning "no label"); an atomic number
        outside 1..118 or not an integer; a periodic direction with a zero lattice vector. The message
        names the first offending structure and, for per-atom values, the atom (both 0-based, the atom
        counted within its structure).
    """

    atomic_numbers: np.ndarray
    positions: np.ndarray
    n_atoms: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    energy: np.ndarray | None = None
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None
    offsets: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        n_atoms = _numeric("n_atoms", self.n_atoms, "iu").astype(np.int64).reshape(-1)
        if n_atoms.size and n_atoms.min() <= 0:
            k = int(np.argmin(n_atoms))
            raise DataError(f"structure {k} is empty (0 atoms); every structure needs at least one atom")
        total = int(n_atoms.sum())
        n = n_atoms.size
        offsets = np.concatenate([[0], np.cumsum(n_atoms)]).astype(np.int64)
        z = _numeric("atomic_numbers", self.atomic_numbers)
        if z.shape != (total,):
            raise DataError(f"atomic_numbers has shape {z.shape}, expected ({total},) from n_atoms")
        if z.dtype.kind == "f":
            with np.errstate(invalid="ignore"):
                fractional = ~np.isfinite(z) | (np.mod(z, 1) != 0)
            if np.any(fractional):
                raise DataError(
                    f"atomic numbers must be integers, got {z[fractional][0]} at {_where_atoms(fractional, offsets)}"
                )
        out_of_range = (z < 1) | (z > 118)  # compared in the input's dtype: no wrap-around before the check
        if np.any(out_of_range):
            raise DataError(
                f"atomic numbers must lie in 1..118, got {z[out_of_range][0]} at {_where_atoms(out_of_range, offsets)}"
            )
        z = z.astype(np.int32)
        pos = _as_float64("positions", self.positions, (3,))
        if pos.shape[0] != total:
            raise DataError(f"positions has {pos.shape[0]} rows, expected {total} from n_atoms")
        bad = ~np.all(np.isfinite(pos), axis=1)
        if np.any(bad):
            raise DataError(f"positions contain NaN or inf at {_where_atoms(bad, offsets)}")
        cell = _numeric("cell", self.cell).astype(np.float64)
        if cell.shape != (n, 3, 3):
            raise DataError(f"cell has shape {cell.shape}, expected ({n}, 3, 3)")
        bad = ~np.all(np.isfinite(cell), axis=(1, 2))
        if np.any(bad):
            raise DataError(f"cell contains NaN or inf at {_where_structures(bad)}")
        pbc = _numeric("pbc", self.pbc, "biu")
        if pbc.dtype.kind != "b":
            if np.any((pbc != 0) & (pbc != 1)):
                raise DataError(f"pbc must be booleans (or 0/1), got values {np.unique(pbc)[:5].tolist()}")
            pbc = pbc.astype(bool)
        if pbc.shape == (3,):
            pbc = np.broadcast_to(pbc, (n, 3)).copy()
        if pbc.shape != (n, 3):
            raise DataError(f"pbc has shape {pbc.shape}, expected ({n}, 3)")
        lengths = np.linalg.norm(cell, axis=-1)
        bad = np.any(pbc & (lengths == 0.0), axis=1)
        if np.any(bad):
            raise DataError(f"a periodic direction has a zero lattice vector at {_where_structures(bad)}")
        energy = None
        if self.energy is not None:
            energy = _numeric("energy", self.energy).astype(np.float64).reshape(-1)
            if energy.shape != (n,):
                raise DataError(f"energy has shape {energy.shape}, expected ({n},)")
            bad = ~np.isfinite(energy)
            if np.any(bad):
                raise DataError(f"energy is NaN or inf at {_where_structures(bad)}")
        forces = None
        if self.forces is not None:
            forces = _as_float64("forces", self.forces, (3,))
            if forces.shape[0] != total:
                raise DataError(f"forces has {forces.shape[0]} rows, expected {total}")
            bad = ~np.all(np.isfinite(forces), axis=1)
            if np.any(bad):
                raise DataError(f"forces contain NaN or inf at {_where_atoms(bad, offsets)}")
        stress = None
        if self.stress is not None:
            stress = _numeric("stress", self.stress).astype(np.float64)
            if stress.shape == (n, 3, 3):
                stress = full_3x3_to_voigt(stress)
            if stress.shape != (n, 6):
                raise DataError(f"stress has shape {stress.shape}, expected ({n}, 6) or ({n}, 3, 3)")
            # a row of NaN marks a structure without a stress label; anything else must be finite
            bad = ~np.all(np.isfinite(stress), axis=1) & ~np.all(np.isnan(stress), axis=1)
            if np.any(bad):
                raise DataError(
                    f"stress contains NaN or inf at {_where_structures(bad)} (only a whole row of NaN may "
                    "mark a missing stress label)"
                )
        set_(self, "atomic_numbers", z)
        set_(self, "positions", pos)
        set_(self, "n_atoms", n_atoms)
        set_(self, "cell", cell)
        set_(self, "pbc", pbc)
        set_(self, "energy", energy)
        set_(self, "forces", forces)
        set_(self, "stress", stress)
        set_(self, "offsets", offsets)

    # ------------------------------------------------------------------ basic access
    def __len__(self) -> int:
        return int(self.n_atoms.size)

    @property
    def n_total_atoms(self) -> int:
        return int(self.offsets[-1])

    @property
    def species(self) -> tuple[int, ...]:
        """Sorted distinct atomic numbers present in the set."""
        return tuple(int(z) for z in np.unique(self.atomic_numbers))

    @property
    def has_stress(self) -> np.ndarray:
        """``[n_structures]`` bool: which structures carry a (finite) stress label."""
        if self.stress is None:
            return np.zeros(len(self), dtype=bool)
        return np.all(np.isfinite(self.stress), axis=-1)

    def atom_slice(self, k: int) -> slice:
        return slice(int(self.offsets[k]), int(self.offsets[k + 1]))

    def subset(self, indices: Sequence[int] | np.ndarray) -> StructureSet:
        """The structures at ``indices`` (in that order) as a new set."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"index out of range for a set of {len(self)} structures")
        idx = np.where(idx < 0, idx + len(self), idx)
        atom_idx = (
            np.concatenate([np.arange(self.offsets[k], self.offsets[k + 1]) for k in idx])
            if idx.size
            else np.zeros(0, dtype=np.int64)
        )
        return StructureSet(
            atomic_numbers=self.atomic_numbers[atom_idx],
            positions=self.positions[atom_idx],
            n_atoms=self.n_atoms[idx],
            cell=self.cell[idx],
            pbc=self.pbc[idx],
            energy=None if self.energy is None else self.energy[idx],
            forces=None if self.forces is None else self.forces[atom_idx],
            stress=None if self.stress is None else self.stress[idx],
        )

    # ------------------------------------------------------------------ constructors
    @classmethod
    def concatenate(cls, sets: Iterable[StructureSet]) -> StructureSet:
        """Join sets end to end. A label is kept only if every part has it."""
        sets = list(sets)
        if not sets:
            raise DataError("nothing to concatenate")

        def cat(name):
            parts = [getattr(s, name) for s in sets]
            return None if any(p is None for p in parts) else np.concatenate(parts)

        return cls(
            atomic_numbers=np.concatenate([s.atomic_numbers for s in sets]),
            positions=np.concatenate([s.positions for s in sets]),
            n_atoms=np.concatenate([s.n_atoms for s in sets]),
            cell=np.concatenate([s.cell for s in sets]),
            pbc=np.concatenate([s.pbc for s in sets]),
            energy=cat("energy"),
            forces=cat("forces"),
            stress=cat("stress"),
        )

    @classmethod
    def from_frames(
        cls,
        atomic_numbers: np.ndarray,
        positions: np.ndarray,
        energy: np.ndarray | None = None,
        forces: np.ndarray | None = None,
    ) -> StructureSet:
        """A set of non-periodic frames of one molecule (the MD17 layout).

        Args:
          atomic_numbers: ``[n_atoms]`` ints.
          positions: ``[n_frames, n_atoms, 3]`` in Å.
          energy: ``[n_frames]`` in eV, optional.
          forces: ``[n_frames, n_atoms, 3]`` in eV/Å, optional.
        """
        z = np.asarray(atomic_numbers).reshape(-1)
        pos = np.asarray(positions, dtype=np.float64)
        if pos.ndim != 3 or pos.shape[1:] != (z.size, 3):
            raise DataError(f"positions must have shape (n_frames, {z.size}, 3), got {pos.shape}")
        n_frames = pos.shape[0]
        if energy is not None:
            energy = np.asarray(energy, dtype=np.float64).reshape(-1)
            if energy.shape != (n_frames,):
                raise DataError(f"energy has {energy.size} values for {n_frames} frames")
        if forces is not None:
            forces = np.asarray(forces, dtype=np.float64)
            if forces.shape != pos.shape:
                raise DataError(f"forces shape {forces.shape} does not match positions {pos.shape}")
            forces = forces.reshape(-1, 3)
        return cls(
            atomic_numbers=np.tile(z, n_frames),
            positions=pos.reshape(-1, 3),
            n_atoms=np.full(n_frames, z.size, dtype=np.int64),
            cell=np.zeros((n_frames, 3, 3)),
            pbc=np.zeros((n_frames, 3), dtype=bool),
            energy=energy,
            forces=forces,
        )

    @classmethod
    def from_atoms(cls, atoms_list: Sequence, *, require_labels: bool = False) -> StructureSet:
        """Build a set from ``ase.Atoms`` objects, taking labels from their attached calculators.

        Energies, forces and stress are taken from ``atoms.calc.results`` when present (ASE units:
        eV, eV/Å, eV/Å³). Energy is taken as ``energy`` (falling back to ``free_energy``).
        A label is kept only when every structure has it; with ``require_labels`` a missing energy
        or forces raises :class:`DataError`. Stress is kept when at least one structure has it;
        the others get NaN rows (masked in training).
        """
        atoms_list = list(atoms_list)
        if not atoms_list:
            raise DataError("no structures given")
        energies, forces, stresses = [], [], []
        for k, atoms in enumerate(atoms_list):
            if len(atoms) == 0:
                raise DataError(f"structure {k} is empty (0 atoms)")
            results = getattr(atoms.calc, "results", {}) if atoms.calc is not None else {}
            e = results.get("energy", results.get("free_energy"))
            if e is not None:
                e = _numeric(f"energy of structure {k}", e)
                if e.size != 1:
                    raise DataError(f"energy of structure {k} has shape {e.shape}, expected a single number")
                e = float(e.reshape(()))
            energies.append(e)
            f = results.get("forces")
            if f is not None:
                f = _numeric(f"forces of structure {k}", f).astype(np.float64)
                if f.shape != (len(atoms), 3):
                    raise DataError(f"forces of structure {k} have shape {f.shape}, expected ({len(atoms)}, 3)")
            forces.append(f)
            s = results.get("stress")
            if s is not None:
                s = _numeric(f"stress of structure {k}", s).astype(np.float64)
                if s.shape not in ((3, 3), (6,)):
                    raise DataError(f"stress of structure {k} has shape {s.shape}, expected (6,) or (3, 3)")
                s = full_3x3_to_voigt(s[None])[0] if s.shape == (3, 3) else s
                if not np.all(np.isfinite(s)):
                    raise DataError(f"stress contains NaN or inf at structure {k}")
            stresses.append(s)
        have_e = all(e is not None for e in energies)
        have_f = all(f is not None for f in forces)
        if require_labels and not (have_e and have_f):
            missing = "energy" if not have_e else "forces"
            k = next(i for i, v in enumerate(energies if not have_e else forces) if v is None)
            raise DataError(f"structure {k} has no {missing} label")
        have_s = any(s is not None for s in stresses)
        return cls(
            atomic_numbers=np.concatenate([a.get_atomic_numbers() for a in atoms_list]),
            positions=np.concatenate([a.get_positions() for a in atoms_list]),
            n_atoms=np.array([len(a) for a in atoms_list], dtype=np.int64),
            cell=np.stack([np.asarray(a.get_cell()[:], dtype=np.float64) for a in atoms_list]),
            pbc=np.stack([a.get_pbc() for a in atoms_list]),
            energy=np.array(energies, dtype=np.float64) if have_e else None,
            forces=np.concatenate(forces) if have_f else None,
            stress=np.stack([np.full(6, np.nan) if s is None else s for s in stresses]) if have_s else None,
        )

    def to_atoms(self, k: int):
        """Structure ``k`` as an ``ase.Atoms`` with a SinglePointCalculator holding its labels."""
        from ase import Atoms
        from ase.calculators.singlepoint import SinglePointCalculator

        sl = self.atom_slice(k)
        atoms = Atoms(numbers=self.atomic_numbers[sl], positions=self.positions[sl], cell=self.cell[k], pbc=self.pbc[k])
        results = {}
        if self.energy is not None:
            results["energy"] = float(self.energy[k])
        if self.forces is not None:
            results["forces"] = self.forces[sl].copy()
        if self.stress is not None and self.has_stress[k]:
            results["stress"] = self.stress[k].copy()
        if results:
            atoms.calc = SinglePointCalculator(atoms, **results)
        return atoms


def full_3x3_to_voigt(stress: np.ndarray) -> np.ndarray:
    """``[..., 3, 3]`` → ``[..., 6]`` in ASE Voigt order (xx, yy, zz, yz, xz, xy)."""
    s = np.asarray(stress)
    return np.stack([s[..., 0, 0], s[..., 1, 1], s[..., 2, 2], s[..., 1, 2], s[..., 0, 2], s[..., 0, 1]], axis=-1)


def voigt_to_full_3x3(stress: np.ndarray) -> np.ndarray:
    """``[..., 6]`` in ASE Voigt order → symmetric ``[..., 3, 3]``."""
    s = np.asarray(stress)
    xx, yy, zz, yz, xz, xy = (s[..., i] for i in range(6))
    return np.stack([np.stack([xx, xy, xz], -1), np.stack([xy, yy, yz], -1), np.stack([xz, yz, zz], -1)], axis=-2)
