"""The readers' shared check of stored numbers: positions and labels must be real floats of enough precision,
in the shape the format documents.

Integers are refused for positions, energies, forces and stress because a file that stores them as integers
has already lost them: a ``uint8`` energy of -47,000 eV wraps around to some value in 0..255, an ``int16`` force
is truncated to whole eV/Å. ``float16`` is refused because its 11-bit significand keeps about 3 significant
digits: a total energy of -47,000 eV is stored to the nearest 32 eV, far coarser than the meV per atom a
potential is fitted to. ``float32`` (7 digits: ~4 meV at -47,000 eV) and wider are read.

Every reader of stored arrays (the npz readers and the native HDF5 reader of :mod:`equiforce.data.readers`
and :mod:`equiforce.data.hdf5`, the DeePMD ``.npy`` sets of :mod:`equiforce.data.deepmd`) calls
:func:`check_float_array` before converting to float64, so the file's own dtype and shape are what is
checked; formats parsed from text (extended XYZ, ASE db, DeePMD ``.raw``) give float64 numbers anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from equiforce.data.errors import DataError

__all__ = ["MIN_FLOAT_BITS", "check_float_array", "check_shape", "describe_shapes"]

#: the narrowest float accepted for positions and labels (float32); float16 is refused
MIN_FLOAT_BITS = 32


def describe_shapes(shapes: Sequence[tuple[int | str, ...]]) -> str:
    """``[(10, 'n_atoms', 3), (10,)]`` → ``"(10, n_atoms, 3) or (10,)"``."""
    parts = []
    for shape in shapes:
        inner = ", ".join(str(d) for d in shape)
        parts.append(f"({inner},)" if len(shape) == 1 else f"({inner})")
    return " or ".join(parts)


def check_float_array(key: str, array: Any, shapes: Sequence[tuple[int | str, ...]] | None = None) -> None:
    """Refuse stored positions, energies, forces or stress that are not floats of at least 32 bits, or whose
    shape is none of the documented ones.

    Nothing is read or converted: ``array`` may be a NumPy array or anything with ``dtype`` and ``shape``
    (an ``h5py.Dataset``), so a large dataset is checked from its header.

    Args:
      key: what the array is, as the file names it (``"npz key 'energies'"``, ``"dataset 'forces'"``,
        ``"force.npy"``): the message starts with it.
      array: the stored array (its dtype and shape are checked).
      shapes: the accepted shapes; an int is that size, a str any size (shown by that name, e.g.
        ``"n_frames"``); None: any shape.

    Raises:
      DataError: a dtype that is not a float (integers, bools, complex, strings, objects) or a float narrower
        than 32 bits (float16), naming the dtype and the expected one; a shape that is none of ``shapes``,
        naming the shape and the expected ones.
    """
    dtype = np.dtype(array.dtype)
    if dtype.kind != "f" or dtype.itemsize * 8 < MIN_FLOAT_BITS:
        why = (
            "float16 keeps about 3 significant digits"
            if dtype.kind == "f"
            else "integers cannot hold these values (they wrap around or are truncated)"
            if dtype.kind in "iub"
            else "not real numbers"
        )
        raise DataError(f"{key} has dtype {dtype}, expected float32 or float64 ({why})")
    if shapes is not None:
        check_shape(key, array.shape, shapes)


def check_shape(key: str, shape: tuple[int, ...], shapes: Sequence[tuple[int | str, ...]]) -> None:
    """Refuse a stored array's ``shape`` that is none of ``shapes`` (an int: that size; a str: any size).

    Raises:
      DataError: ``"{key} has shape {shape}, expected {shapes}"``.
    """
    shape = tuple(int(d) for d in shape)
    for want in shapes:
        if len(want) == len(shape) and all(isinstance(w, str) or w == d for w, d in zip(want, shape, strict=True)):
            return
    raise DataError(f"{key} has shape {shape}, expected {describe_shapes(shapes)}")
