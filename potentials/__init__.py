"""equiforce.potentials: equivariant networks and the Potential that turns them into energies and forces."""
