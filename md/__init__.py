"""equiforce.md: molecular dynamics with a trained potential (jax-md engine) and the ASE calculator."""
