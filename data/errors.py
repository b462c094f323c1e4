"""Exceptions raised by ``equiforce.data``."""

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad or inconsistent input data: a corrupt file, a missing key, mismatched shapes, NaN positions,
    an unknown unit, an empty structure. The message says what and where: the file (when reading one)
    and, for a bad value, the structure (frame) and atom, both 0-based (``structure 3, atom 5``)."""
