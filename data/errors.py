"""Exceptions raised by ``equiforce.data``."""

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad or inconsistent input data: a corrupt file, a missing key, mismatched shapes, NaN positions,
    an unknown unit, an empty structure. The message says what and where."""
