"""Thin integrator steps over jax-md's space, states and thermostat pieces, with explicit per-step outputs.

jax-md's simulators return only the new state. The MD engine also needs what the step's single force call
computed (the potential energy at the new positions) and, for Langevin dynamics, the energy the bath put
into the system. Here each step is ``step(state, neighbor) -> (state, StepAux)``: the same arithmetic as
jax-md's ``simulate.nve`` (velocity Verlet), ``simulate.nvt_langevin`` (BAOAB; Davidchack, Ouldridge and
Tretyakov, J. Chem. Phys. 142, 144114 (2015)) and ``simulate.nvt_nose_hoover`` (Nosé–Hoover chains;
Martyna, Klein and Tuckerman, J. Chem. Phys. 97, 2635 (1992)), built from jax-md's own
``momentum_step``, ``position_step``, ``stochastic_step`` and ``nose_hoover_chain``, with a force function
that returns the energy as well. Initial states come from jax-md's ``init_fn``.

NPT (``simulate.npt_nose_hoover``) is kept as jax-md's step; its energy is evaluated once at the end of a
chunk by the engine (the barostat needs the box derivative, not only the forces).

Degrees of freedom: with the centre-of-mass momentum removed at the start, velocity Verlet and the
Nosé–Hoover chains (which scale all momenta alike) keep it zero, so the kinetic energy lives in
``3N - 3`` degrees of freedom; the chains here are told so (jax-md's default is ``3N``, which makes the
thermostat aim 3N/(3N - 3) too hot, 5 % for a 21-atom molecule). Langevin noise acts on every momentum
component, centre of mass included: ``3N``. :func:`degrees_of_freedom` gives the number per ensemble, and
the engine reports temperatures with it.

Units are ASE's (Å, eV, amu, ASE time units; kT in eV).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp
from jax_md import simulate

__all__ = [
    "StepAux",
    "degrees_of_freedom",
    "kinetic_energy",
    "langevin_step_fn",
    "nose_hoover_chain_energy",
    "nose_hoover_step_fn",
    "nve_step_fn",
    "set_chain_dof",
]

#: ``value_and_force(positions, **kwargs) -> (energy, forces, extra)``, energy in eV (E0 excluded), forces
#: eV/Å, ``extra`` a tuple of further outputs of the same force call (e.g. the uncertainties; may be empty).
ValueAndForce = Callable[..., tuple[jnp.ndarray, jnp.ndarray, tuple]]


class StepAux(NamedTuple):
    """What one step computed besides the new state (scalars in the dtype of the positions).

    Attributes:
      potential_energy: energy at the new positions from the step's own force call, eV (E0 excluded).
      heat: energy the thermostat's stochastic step put into the kinetic energy during the step, eV (zero
        for deterministic integrators, whose thermostat energy is in the chain variables instead).
      extra: what the force call returned besides energy and forces, unchanged (the MD engine passes
        ``(σ_E, σ_F [n_atoms])`` of a potential with an uncertainty; ``()`` otherwise).
    """

    potential_energy: jnp.ndarray
    heat: jnp.ndarray
    extra: tuple = ()


def degrees_of_freedom(ensemble: str, n_atoms: int) -> int:
    """Kinetic degrees of freedom the engine reports temperatures with: ``3N`` for Langevin (the noise
    thermalises the centre of mass), else ``3N - 3`` (centre-of-mass momentum zero and conserved); at least 1."""
    dof = 3 * n_atoms if ensemble == "nvt_langevin" else 3 * n_atoms - 3
    return max(dof, 1)


def kinetic_energy(momentum: jnp.ndarray, mass: jnp.ndarray) -> jnp.ndarray:
    """``Σ p² / 2m`` in eV; ``momentum [N, 3]``, ``mass [N]`` or ``[N, 1]`` amu."""
    return 0.5 * jnp.sum(momentum**2 / mass.reshape(-1, 1))


def _verlet(value_and_force: ValueAndForce, shift_fn: Callable, dt: float, state: Any, kwargs: dict[str, Any]):
    """Velocity Verlet (jax-md's ``velocity_verlet``) returning the energy of its force call."""
    state = simulate.momentum_step(state, dt / 2)
    state = simulate.position_step(state, shift_fn, dt, **kwargs)
    energy, force, extra = value_and_force(state.position, **kwargs)
    state = simulate.momentum_step(state.set(force=force), dt / 2)
    return state, energy, extra


def nve_step_fn(value_and_force: ValueAndForce, shift_fn: Callable, dt: float) -> Callable[..., tuple[Any, StepAux]]:
    """Velocity Verlet step ``(state, **kwargs) -> (state, StepAux)`` on jax-md's ``NVEState``."""

    def step(state: Any, **kwargs: Any) -> tuple[Any, StepAux]:
        state, energy, extra = _verlet(value_and_force, shift_fn, dt, state, kwargs)
        return state, StepAux(energy, jnp.zeros_like(energy), extra)

    return step


def langevin_step_fn(
    value_and_force: ValueAndForce, shift_fn: Callable, dt: float, kT: float, gamma: float
) -> Callable[..., tuple[Any, StepAux]]:
    """BAOAB Langevin step (jax-md's ``nvt_langevin``) on ``NVTLangevinState``; ``gamma`` in 1/(ASE time).

    ``StepAux.heat`` is the change of kinetic energy in the stochastic (O) step, the only part of BAOAB
    that exchanges energy with the bath: ``E_pot + E_kin − Σ heat`` is then conserved up to the
    integrator's discretisation error (the effective conserved quantity of a Langevin run; e.g.
    Bussi and Parrinello, Phys. Rev. E 75, 056707 (2007), arXiv:cond-mat/0701540).
    """

    def step(state: Any, **kwargs: Any) -> tuple[Any, StepAux]:
        state = simulate.momentum_step(state, dt / 2)
        state = simulate.position_step(state, shift_fn, dt / 2, **kwargs)
        before = kinetic_energy(state.momentum, state.mass)
        state = simulate.stochastic_step(state, dt, kT, gamma)
        heat = kinetic_energy(state.momentum, state.mass) - before
        state = simulate.position_step(state, shift_fn, dt / 2, **kwargs)
        energy, force, extra = value_and_force(state.position, **kwargs)
        state = simulate.momentum_step(state.set(force=force), dt / 2)
        return state, StepAux(energy, heat.astype(energy.dtype), extra)

    return step


def nose_hoover_step_fn(
    value_and_force: ValueAndForce, shift_fn: Callable, dt: float, kT: float, chain: Any
) -> Callable[..., tuple[Any, StepAux]]:
    """Nosé–Hoover chain step (jax-md's ``nvt_nose_hoover``) on ``NVTNoseHooverState``.

    Args:
      chain: the ``NoseHooverChainFns`` of ``simulate.nose_hoover_chain(dt, ...)`` (the same one whose
        ``initialize`` made the state's chain).
    """

    def step(state: Any, **kwargs: Any) -> tuple[Any, StepAux]:
        thermostat = chain.update_mass(state.chain, kT)
        p, thermostat = chain.half_step(state.momentum, thermostat, kT)
        state, energy, extra = _verlet(value_and_force, shift_fn, dt, state.set(momentum=p), kwargs)
        thermostat = thermostat.set(kinetic_energy=kinetic_energy(state.momentum, state.mass))
        p, thermostat = chain.half_step(state.momentum, thermostat, kT)
        return state.set(momentum=p, chain=thermostat), StepAux(energy, jnp.zeros_like(energy), extra)

    return step


def set_chain_dof(chain_state: Any, dof: int) -> Any:
    """A jax-md ``NoseHooverChain`` state with ``dof`` degrees of freedom (the first chain mass rescaled,
    as ``nose_hoover_chain``'s ``initialize``/``update_mass`` compute it)."""
    old = chain_state.degrees_of_freedom
    mass = chain_state.mass.at[0].multiply(dof / old)
    return dataclasses.replace(chain_state, degrees_of_freedom=dof, mass=mass)


def nose_hoover_chain_energy(chain_state: Any, kT: float) -> Any:
    """Energy of a Nosé–Hoover chain, eV: ``Σ p_k²/2Q_k + N_f kT ξ_0 + Σ_{k≥1} kT ξ_k`` (Martyna et al.
    1992, eq. 2.12); added to ``E_pot + E_kin`` it gives the conserved quantity of the extended system."""
    xi, p_xi, q = chain_state.position, chain_state.momentum, chain_state.mass
    return jnp.sum(p_xi**2 / (2 * q)) + kT * (chain_state.degrees_of_freedom * xi[0] + jnp.sum(xi[1:]))
