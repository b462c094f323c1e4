"""Labellers: the reference method of the active-learning loop, any ASE calculator given by configuration.

A labeller spec is a mapping (the ``labeller`` section of a learning config):

* ``{"kind": "emt"}``: ASE's EMT (metals: Al, Ni, Cu, Pd, Ag, Pt, Au, and H, C, N, O);
* ``{"kind": "tblite", "method": "GFN2-xTB"}``: GFN2-xTB or GFN1-xTB through ``tblite.ase.TBLite``
  (the ``xtb`` extra); ``options`` go to its constructor (``accuracy``, ``electronic_temperature``, ...);
* ``{"kind": "python", "function": "module:function"}``: ``module.function(**options)`` returns any ASE
  calculator (the user's DFT code through ASE).

:func:`label_frame` computes one label and checks it at the edge: energy (eV) finite, forces (eV/Å) of
shape ``[n_atoms, 3]`` and finite, stress (eV/Å³, Voigt xx yy zz yz xz xy, ASE's sign) of shape ``[6]`` and
finite for fully periodic cells, and a calculator that reports ``converged: False`` is a failure. It never
raises for a bad label: it returns a :class:`LabelOutcome` with the reason, so the loop records it and goes
on.

This module imports nothing heavy (no JAX): labelling worker processes import it.
"""

from __future__ import annotations

import dataclasses
import importlib
import traceback
from typing import Any

import numpy as np

__all__ = ["KINDS", "LabelOutcome", "LabellerError", "build_calculator", "check_species", "label_frame"]

#: labeller kinds
KINDS = ("emt", "tblite", "python")

#: tblite methods
TBLITE_METHODS = ("GFN2-xTB", "GFN1-xTB")


class LabellerError(ValueError):
    """A labeller that cannot be imported or built, or a structure with elements it does not support."""


@dataclasses.dataclass(frozen=True)
class LabelOutcome:
    """One labelling attempt.

    Attributes:
      ok: whether a usable label came back.
      energy: eV (None on failure).
      forces: ``[n_atoms, 3]`` float64, eV/Å (None on failure).
      stress: ``[6]`` float64, eV/Å³ Voigt (periodic cells only, else None).
      reason: why it failed (None when ``ok``).
      seconds: wall time of the calculation, s.
    """

    ok: bool
    energy: float | None = None
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None
    reason: str | None = None
    seconds: float = 0.0


def build_calculator(spec: dict[str, Any]) -> Any:
    """An ASE calculator from a labeller spec (see the module doc).

    Raises:
      LabellerError: an unknown kind or method, a missing ``tblite`` package, a ``python`` function that
        cannot be imported, raises, or does not return an ASE calculator.
    """
    kind = spec.get("kind")
    options = dict(spec.get("options") or {})
    if kind == "emt":
        from ase.calculators.emt import EMT

        return EMT(**options)
    if kind == "tblite":
        method = spec.get("method") or "GFN2-xTB"
        if method not in TBLITE_METHODS:
            raise LabellerError(f"labeller.method must be one of {TBLITE_METHODS} for tblite, got {method!r}")
        try:
            from tblite.ase import TBLite
        except ImportError as err:
            raise LabellerError(
                f"labeller kind 'tblite' needs the tblite package (pip install 'equiforce[xtb]'): {err}"
            ) from None
        return TBLite(method=method, **{"verbosity": 0, **options})
    if kind == "python":
        target = spec.get("function") or ""
        module_name, sep, func_name = str(target).partition(":")
        if not sep or not module_name or not func_name:
            raise LabellerError(f"labeller.function must look like module:function, got {target!r}")
        try:
            module = importlib.import_module(module_name)
        except Exception as err:  # ImportError, or the module itself failing at import
            raise LabellerError(
                f"labeller {target}: cannot import {module_name} ({type(err).__name__}: {err})"
            ) from None
        func = getattr(module, func_name, None)
        if not callable(func):
            raise LabellerError(f"labeller {target}: {module_name} has no callable {func_name!r}")
        try:
            calc = func(**options)
        except Exception as err:
            raise LabellerError(
                f"labeller {target}: building the calculator failed ({type(err).__name__}: {err})"
            ) from None
        if not callable(getattr(calc, "get_potential_energy", None)) or not callable(getattr(calc, "get_forces", None)):
            raise LabellerError(f"labeller {target} returned {type(calc).__name__}, not an ASE calculator")
        return calc
    raise LabellerError(f"labeller.kind must be one of {KINDS}, got {kind!r}")


def supported_elements(spec: dict[str, Any]) -> set[str] | None:
    """Element symbols the labeller supports, or None when it cannot be known without running it."""
    kind = spec.get("kind")
    if kind == "emt":
        from ase.calculators.emt import parameters

        return set(parameters)
    if kind == "tblite":
        from ase.data import chemical_symbols

        return set(chemical_symbols[1:87])  # GFN1/GFN2-xTB are parametrised for Z = 1-86
    return None


def check_species(spec: dict[str, Any], symbols: set[str]) -> None:
    """Raise :class:`LabellerError` naming the elements of ``symbols`` the labeller does not support."""
    known = supported_elements(spec)
    if known is None:
        return
    missing = sorted(set(symbols) - known)
    if missing:
        raise LabellerError(
            f"the labeller {spec.get('kind')} does not support element(s) {missing} (it supports {sorted(known)})"
        )


def label_frame(calc: Any, atoms: Any) -> LabelOutcome:
    """Label ``atoms`` (a copy is used) with ``calc``; never raises for a failed or bad label.

    Returns:
      A :class:`LabelOutcome`: energy eV, forces ``[n, 3]`` eV/Å, stress ``[6]`` eV/Å³ for a fully periodic
      cell; or ``ok=False`` with the reason (an exception and the last lines of its traceback, a NaN or
      infinite value, a wrong shape, or ``converged: False`` in the calculator's results).
    """
    import time

    a = atoms.copy()
    a.calc = calc
    periodic = bool(np.all(a.get_pbc()))
    t0 = time.perf_counter()
    try:
        energy = float(a.get_potential_energy())
        forces = np.asarray(a.get_forces(), np.float64)
        stress = np.asarray(a.get_stress(voigt=True), np.float64) if periodic else None
    except Exception as err:  # any calculator error is a recorded failure, not a crash of the loop
        tb = traceback.format_exc(limit=-2).strip().splitlines()
        return LabelOutcome(
            False, reason=f"{type(err).__name__}: {err} [{' | '.join(tb[-3:])}]", seconds=time.perf_counter() - t0
        )
    seconds = time.perf_counter() - t0
    results = getattr(calc, "results", None) or {}
    if results.get("converged") is False:
        return LabelOutcome(False, reason="the calculation did not converge (converged: False)", seconds=seconds)
    n = len(a)
    if not np.isfinite(energy):
        return LabelOutcome(False, reason=f"energy is not finite ({energy})", seconds=seconds)
    if forces.shape != (n, 3):
        return LabelOutcome(False, reason=f"forces have shape {forces.shape}, expected ({n}, 3)", seconds=seconds)
    if not np.all(np.isfinite(forces)):
        bad = int(np.argwhere(~np.isfinite(forces))[0, 0])
        return LabelOutcome(False, reason=f"forces are not finite (atom {bad})", seconds=seconds)
    if stress is not None:
        if stress.shape != (6,):
            return LabelOutcome(False, reason=f"stress has shape {stress.shape}, expected (6,)", seconds=seconds)
        if not np.all(np.isfinite(stress)):
            return LabelOutcome(False, reason="stress is not finite", seconds=seconds)
    return LabelOutcome(True, energy=energy, forces=forces, stress=stress, seconds=seconds)
