"""equiforce.md: molecular dynamics with a trained potential (jax-md engine) and the ASE calculator."""

from equiforce.md.calculator import EquiforceCalculator, bucket_size

__all__ = ["EquiforceCalculator", "bucket_size"]
