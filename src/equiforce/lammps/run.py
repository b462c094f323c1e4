"""``equiforce lammps MODEL INPUT.in``: run a LAMMPS input with an equiforce model as the potential.

The input convention: the input is an ordinary LAMMPS input in ``units metal`` whose potential lines are::

    pair_style equiforce
    pair_coeff * * C H O        # one element per atom type, in type order (after the box exists)

They are replaced by ``pair_style zero <r_max>`` / ``pair_coeff * *`` (LAMMPS keeps a neighbour list of the
model's cutoff, e.g. for ``compute rdf``, and adds no force) followed by what :func:`~equiforce.lammps.attach`
adds (``comm_modify cutoff``, ``fix equiforce all external``, ``fix_modify equiforce energy yes virial yes``
and, for a model with an uncertainty, the per-atom ``d_equiforce_sigma``). Everything else runs unchanged,
so the input may use every fix, compute, dump, ``minimize``, ``read_restart`` / ``write_restart`` and
variable it needs. The skin of the exactness guard is the largest ``neighbor`` skin in the input (LAMMPS' metal
default 2.0 Å without one). Only the potential's two lines are interpreted; they must sit in the input file
itself (not in an ``include``d file), each once.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from equiforce.lammps._library import check_mpi_launch, import_lammps
from equiforce.lammps.attach import EquiforceFix, LammpsInputError, attach

__all__ = ["TranslatedInput", "run_input", "translate_input"]

_PAIR_STYLE = re.compile(r"^\s*pair_style\s+equiforce\b(.*)$")
_PAIR_COEFF = re.compile(r"^\s*pair_coeff\s+(\S+)\s+(\S+)(.*)$")
_NEIGHBOR = re.compile(r"^\s*neighbor\s+(\S+)\s+\S+")
_UNITS = re.compile(r"^\s*units\s+(\S+)")
DEFAULT_SKIN = 2.0  # LAMMPS' default skin in metal units


class TranslatedInput:
    """An input split at the potential: ``head`` (up to ``pair_coeff * *``), then :func:`attach`, then ``tail``.

    Attributes:
      head, tail: LAMMPS input text.
      elements: one element symbol per atom type.
      skin: the largest ``neighbor`` skin in the input (Å), or the metal default.
    """

    def __init__(self, head: str, tail: str, elements: list[str], skin: float) -> None:
        self.head, self.tail, self.elements, self.skin = head, tail, elements, skin


def _logical_lines(text: str) -> list[str]:
    """Lines with LAMMPS' ``&`` continuations joined (comments kept)."""
    out: list[str] = []
    buf = ""
    for line in text.splitlines():
        stripped = line.rstrip()
        if stripped.endswith("&"):
            buf += stripped[:-1] + " "
            continue
        out.append(buf + line)
        buf = ""
    if buf:
        out.append(buf)
    return out


def _code(line: str) -> str:
    return line.split("#", 1)[0]


def translate_input(text: str, r_max: float, *, where: str = "the input") -> TranslatedInput:
    """Split a LAMMPS input at its equiforce potential lines (see the module docstring).

    Args:
      text: the input.
      r_max: the model's cutoff (Å), for ``pair_style zero``.
      where: the input's name, for messages.

    Raises:
      LammpsInputError: no or several ``pair_style equiforce`` lines, no ``pair_coeff * * ELEMENTS`` after it,
        a ``pair_coeff`` with other than ``* *``, or ``units`` other than metal.
    """
    lines = _logical_lines(text)
    style_at = [k for k, line in enumerate(lines) if _PAIR_STYLE.match(_code(line))]
    if not style_at:
        raise LammpsInputError(f"{where} has no `pair_style equiforce` line: name the potential with it")
    if len(style_at) > 1:
        raise LammpsInputError(f"{where} has {len(style_at)} `pair_style equiforce` lines (lines are joined): one")
    extra = _PAIR_STYLE.match(_code(lines[style_at[0]])).group(1).split()
    if extra:
        raise LammpsInputError(f"`pair_style equiforce` takes no arguments, got {' '.join(extra)!r} in {where}")
    coeff_at = [k for k, line in enumerate(lines) if _PAIR_COEFF.match(_code(line))]
    after = [k for k in coeff_at if k > style_at[0]]
    if not after:
        raise LammpsInputError(f"{where} has no `pair_coeff * * ELEMENT ...` line after `pair_style equiforce`")
    if len(coeff_at) > 1:
        raise LammpsInputError(
            f"{where} has {len(coeff_at)} pair_coeff lines; equiforce needs one: pair_coeff * * C H O"
        )
    i, j, rest = _PAIR_COEFF.match(_code(lines[after[0]])).groups()
    elements = rest.split()
    if (i, j) != ("*", "*") or not elements:
        raise LammpsInputError(
            f"equiforce's pair_coeff is `pair_coeff * * ELEMENT ...` (one element per type), got "
            f"{lines[after[0]].strip()!r} in {where}"
        )
    for line in lines:
        m = _UNITS.match(_code(line))
        if m and m.group(1) != "metal":
            raise LammpsInputError(
                f"{where} sets `units {m.group(1)}`: equiforce potentials need `units metal` (eV, Å, ps)"
            )
    skins = [float(m.group(1)) for line in lines if (m := _NEIGHBOR.match(_code(line)))]
    skin = max(skins) if skins else DEFAULT_SKIN
    out = list(lines)
    out[style_at[0]] = f"pair_style zero {r_max:.10g}"
    out[after[0]] = "pair_coeff * *"
    head = "\n".join(out[: after[0] + 1]) + "\n"
    tail = "\n".join(out[after[0] + 1 :]) + "\n"
    return TranslatedInput(head, tail, elements, skin)


def _lammps_call(fn, *args: Any) -> None:
    try:
        fn(*args)
    except Exception as err:  # the lammps module raises a bare Exception with LAMMPS' message
        if type(err).__module__.startswith("lammps") or type(err) is Exception:
            raise RuntimeError(f"LAMMPS: {err}") from None
        raise


def run_input(
    model: str | os.PathLike,
    input_path: str | os.PathLike,
    *,
    variables: Sequence[tuple[str, str]] = (),
    log: str | None = "log.lammps",
    screen: bool = True,
) -> EquiforceFix:
    """Run a LAMMPS input (see the module docstring) with the model as the potential; every rank calls this.

    Args:
      model: the model file.
      input_path: the LAMMPS input; relative paths inside it are relative to the current folder, as for ``lmp``.
      variables: ``(name, value)`` pairs, LAMMPS' ``-var NAME VALUE``.
      log: LAMMPS' log file (None: no log).
      screen: LAMMPS prints to the screen (rank 0).

    Returns:
      The attached :class:`~equiforce.lammps.EquiforceFix` (counters, ghost fraction).

    Raises:
      FileNotFoundError: no such model or input file.
      ModelFileError: a model file that does not load.
      LammpsInputError, UnknownSpeciesError: the input does not fit the model (see :func:`translate_input`,
        :func:`~equiforce.lammps.attach`), or atoms moved further than the ghost shell allows.
      LammpsSetupError: LAMMPS / MPI / mpi4py missing, or an mpirun of another MPI.
      RuntimeError: LAMMPS stopped with an error (its message).
    """
    from equiforce.potentials.model_io import enable_x64_for, load_model

    lammps, MPI = import_lammps()
    check_mpi_launch(MPI)
    model, input_path = Path(model), Path(input_path)
    for p, what in ((model, "model file"), (input_path, "LAMMPS input")):
        if not p.is_file():
            raise FileNotFoundError(f"{what} {p} does not exist")
    enable_x64_for(model)
    potential, params, _ = load_model(model)
    translated = translate_input(input_path.read_text(), potential.r_max, where=str(input_path))
    args = ["-nocite", "-log", log if log else "none"]
    if not screen:
        args += ["-screen", "none"]
    for name, value in variables:
        args += ["-var", str(name), str(value)]
    lmp = lammps.lammps(cmdargs=args)
    try:
        with tempfile.TemporaryDirectory(prefix="equiforce-lammps-") as tmp:
            head, tail = Path(tmp) / "head.in", Path(tmp) / "tail.in"
            head.write_text(translated.head)
            tail.write_text(translated.tail)
            _lammps_call(lmp.file, str(head))
            fix = attach(lmp, (potential, params), translated.elements, skin=translated.skin)
            _lammps_call(lmp.file, str(tail))
        fix.raise_if_failed()
        return fix
    finally:
        lmp.close()
