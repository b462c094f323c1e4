"""The MD ensembles as values: one frozen :class:`Ensemble` per ensemble, looked up by name in :data:`ENSEMBLES`.

An ensemble holds its initial state (jax-md's ``init_fn``), its step, its conserved quantity, its degrees of
freedom and the fields a restart stores. The single-structure engine (:class:`~equiforce.md.engine.MDEngine`)
runs one step per MD step; the replica engine (:class:`~equiforce.md.replica_engine.ReplicaEngine`)
``jax.vmap``-s the *same* step over its replicas. Nothing outside this module tests an ensemble's name.

The steps are thin functions over jax-md's states and building blocks (``simulate.momentum_step``,
``position_step``, ``stochastic_step``, ``nose_hoover_chain``), with the same arithmetic as jax-md's
``simulate.nve`` (velocity Verlet), ``nvt_langevin`` (BAOAB; Davidchack, Ouldridge and Tretyakov, J. Chem.
Phys. 142, 144114 (2015)) and ``nvt_nose_hoover`` (Nosé–Hoover chains; Martyna, Klein and Tuckerman, J. Chem.
Phys. 97, 2635 (1992)); they also return what the step's single force call computed (the potential energy and,
e.g., the uncertainties) and, for Langevin, the heat the bath put in (:class:`StepAux`). NPT is jax-md's own
``simulate.npt_nose_hoover`` step (the barostat differentiates the energy with respect to the box); its energy
is evaluated once at the end of a chunk.

A step is ``step(state, thermostat, free, **kwargs) -> (state, StepAux)``:

* ``thermostat``: a :class:`Thermostat` (Python floats in a single run; arrays under the replica engine's
  ``vmap``, one value per replica);
* ``free``: ``[n_atoms]`` bool, False for atoms that do not move (fixed atoms; the replica engine's padding
  atoms), or None (every atom moves; the arithmetic is then exactly that without a mask). A fixed atom's
  force and momentum are zero, so it never moves (NPT: it keeps its fractional coordinates and moves with the
  box; jax-md's NPT step would move an atom without momentum, so the engine puts fixed atoms back);
* ``kwargs``: go to the force call and the shift (``neighbor=``, NPT's ``box=``).

Degrees of freedom (:meth:`Ensemble.degrees_of_freedom`): with the centre-of-mass momentum removed at the start,
velocity Verlet and the Nosé–Hoover chains (which scale all momenta alike) keep it zero: ``3N - 3``; the chains
are told so (jax-md's default is ``3N``, which makes the thermostat aim 3N/(3N - 3) too hot). Langevin noise acts
on every momentum component, centre of mass included: ``3N``. With fixed atoms the forces they exert change the
free atoms' total momentum, so nothing is conserved beyond them: ``3 (N - n_fixed)`` in every ensemble. The
temperature is reported over these, and the thermostats aim at them.

Units are ASE's (Å, eV, amu, ASE time units; kT in eV).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax_md import simulate

__all__ = [
    "ENSEMBLES",
    "Ensemble",
    "StepAux",
    "Thermostat",
    "chain_energy",
    "chain_op",
    "get_ensemble",
    "kinetic_energy",
    "pin",
    "restore_state",
    "state_arrays",
    "thermal_momenta",
]

#: Nosé–Hoover chain length, chain steps, Suzuki–Yoshida steps (jax-md's defaults)
CHAIN = (5, 2, 3)

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


class Thermostat(NamedTuple):
    """One system's thermostat settings as the step reads them: Python floats in a single run, arrays with a
    leading replica axis in the replica engine (``vmap``).

    Attributes:
      kT: target temperature, eV. gamma: Langevin friction, 1/(ASE time). chain_kT: kT as the Nosé–Hoover
      chain masses are computed with (jax-md keeps them in float32). dof_index: which of the step's
      ``chain_dofs`` is this system's (jax-md keeps a chain's degrees of freedom a static int).
    """

    kT: Any
    gamma: Any = 0.0
    chain_kT: Any = 0.0
    dof_index: Any = 0


def kinetic_energy(momentum: jnp.ndarray, mass: jnp.ndarray) -> jnp.ndarray:
    """``Σ p² / 2m`` in eV; ``momentum [N, 3]``, ``mass [N]`` or ``[N, 1]`` amu."""
    return 0.5 * jnp.sum(momentum**2 / mass.reshape(-1, 1))


def chain_energy(chain_state: Any, kT: Any, dof: Any = None) -> Any:
    """Energy of a Nosé–Hoover chain, eV: ``Σ p_k²/2Q_k + N_f kT ξ_0 + Σ_{k≥1} kT ξ_k`` (Martyna et al. 1992,
    eq. 2.12; ``N_f`` the chain's degrees of freedom, or ``dof``); added to ``E_pot + E_kin`` it gives the
    conserved quantity of the extended system."""
    xi, p_xi, q = chain_state.position, chain_state.momentum, chain_state.mass
    n_f = chain_state.degrees_of_freedom if dof is None else dof
    return jnp.sum(p_xi**2 / (2 * q)) + kT * (n_f * xi[0] + jnp.sum(xi[1:]))


def with_chain_dof(chain_state: Any, dof: int) -> Any:
    """A jax-md ``NoseHooverChain`` state with ``dof`` degrees of freedom (the first chain mass rescaled, as
    ``nose_hoover_chain``'s ``initialize``/``update_mass`` compute it)."""
    old = chain_state.degrees_of_freedom
    mass = chain_state.mass.at[0].multiply(dof / old)
    return dataclasses.replace(chain_state, degrees_of_freedom=dof, mass=mass)


def thermal_momenta(
    momentum: jnp.ndarray, mass: jnp.ndarray, kT: Any, dof: Any, free: jnp.ndarray | None = None
) -> jnp.ndarray:
    """Initial momenta from jax-md's Maxwell–Boltzmann draw ``momentum [N, 3]``: the centre-of-mass momentum
    removed and the kinetic energy rescaled to exactly ``dof kT / 2``. ``free [N]`` (bool): only those atoms
    move (the others get zero momentum; the centre of mass is that of the free atoms); None: all."""
    if free is None:
        p = momentum - jnp.mean(momentum, axis=0)
    else:
        real = free[:, None]
        p = jnp.where(real, momentum, 0.0)
        p = jnp.where(real, p - jnp.sum(p, axis=0) / jnp.sum(free), 0.0)
    ke = kinetic_energy(p, mass)
    target = 0.5 * dof * kT
    return jnp.where(ke > 0, p * jnp.sqrt(target / jnp.maximum(ke, 1e-30)), p)


def pin(free: jnp.ndarray | None, array: jnp.ndarray) -> jnp.ndarray:
    """``array [N, 3]`` with the rows of atoms that do not move set to zero (unchanged for ``free`` None)."""
    return array if free is None else jnp.where(free[:, None], array, 0.0)


def _verlet(vf: ValueAndForce, shift_fn: Callable, dt: float, state: Any, free: Any, kwargs: dict[str, Any]):
    """Velocity Verlet (jax-md's ``velocity_verlet``) returning the energy of its force call."""
    state = simulate.momentum_step(state, dt / 2)
    state = simulate.position_step(state, shift_fn, dt, **kwargs)
    energy, force, extra = vf(state.position, **kwargs)
    state = simulate.momentum_step(state.set(force=pin(free, force)), dt / 2)
    return state, energy, extra


def _nve_step(vf: ValueAndForce, shift_fn: Callable, dt: float, chain_dofs: tuple[int, ...]):
    def step(state: Any, thermostat: Thermostat, free: Any = None, **kwargs: Any) -> tuple[Any, StepAux]:
        state, energy, extra = _verlet(vf, shift_fn, dt, state, free, kwargs)
        return state, StepAux(energy, jnp.zeros_like(energy), extra)

    return step


def _langevin_step(vf: ValueAndForce, shift_fn: Callable, dt: float, chain_dofs: tuple[int, ...]):
    """BAOAB. ``StepAux.heat`` is the change of kinetic energy in the stochastic (O) step, the only part of
    BAOAB that exchanges energy with the bath: ``E_pot + E_kin − Σ heat`` is then conserved up to the
    integrator's discretisation error (Bussi and Parrinello, Phys. Rev. E 75, 056707 (2007))."""

    def step(state: Any, thermostat: Thermostat, free: Any = None, **kwargs: Any) -> tuple[Any, StepAux]:
        state = simulate.momentum_step(state, dt / 2)
        state = simulate.position_step(state, shift_fn, dt / 2, **kwargs)
        before = kinetic_energy(state.momentum, state.mass)
        state = simulate.stochastic_step(state, dt, thermostat.kT, thermostat.gamma)
        if free is not None:
            state = state.set(momentum=pin(free, state.momentum))
        heat = kinetic_energy(state.momentum, state.mass) - before
        state = simulate.position_step(state, shift_fn, dt / 2, **kwargs)
        energy, force, extra = vf(state.position, **kwargs)
        state = simulate.momentum_step(state.set(force=pin(free, force)), dt / 2)
        return state, StepAux(energy, heat.astype(energy.dtype), extra)

    return step


def chain_op(op: Callable[[Any], tuple], chain: Any, dof_index: Any, chain_dofs: tuple[int, ...]) -> tuple:
    """``op(chain)`` (a jax-md chain function returning a tuple whose last item is the new chain) with the
    chain's degrees of freedom ``chain_dofs[dof_index]``. jax-md keeps them a static field, which cannot differ
    between the replicas of a ``vmap``: one branch per distinct value, chosen by ``dof_index`` (``lax.switch``;
    each branch computes with a Python int, as a single run does). The returned chain keeps the static field
    the given one had."""
    keep = chain.degrees_of_freedom

    def branch(dof: int) -> tuple:
        out = op(dataclasses.replace(chain, degrees_of_freedom=dof))
        return (*out[:-1], dataclasses.replace(out[-1], degrees_of_freedom=keep))

    if len(chain_dofs) == 1:
        return branch(chain_dofs[0])
    return jax.lax.switch(dof_index, [partial(branch, d) for d in chain_dofs])


def _nose_hoover_step(vf: ValueAndForce, shift_fn: Callable, dt: float, chain_dofs: tuple[int, ...]):
    chain = simulate.nose_hoover_chain(dt, *CHAIN, 1.0)  # tau: the chain state's own (update_mass)

    def step(state: Any, thermostat: Thermostat, free: Any = None, **kwargs: Any) -> tuple[Any, StepAux]:
        kT, index = thermostat.kT, thermostat.dof_index
        ch = chain_op(lambda x: (chain.update_mass(x, thermostat.chain_kT),), state.chain, index, chain_dofs)[0]
        p, ch = chain_op(lambda x: chain.half_step(state.momentum, x, kT), ch, index, chain_dofs)
        state, energy, extra = _verlet(vf, shift_fn, dt, state.set(momentum=p), free, kwargs)
        ch = ch.set(kinetic_energy=kinetic_energy(state.momentum, state.mass))
        p, ch = chain_op(lambda x: chain.half_step(state.momentum, x, kT), ch, index, chain_dofs)
        return state.set(momentum=p, chain=ch), StepAux(energy, jnp.zeros_like(energy), extra)

    return step


@dataclasses.dataclass(frozen=True)
class Ensemble:
    """One MD ensemble (see the module docstring).

    Attributes:
      name: as given to ``run_md(ensemble=...)``.
      jax_md: jax-md's ``simulate.<ensemble>`` (see :meth:`simulator`; its ``init_fn`` makes the initial
        state; NPT: its ``apply_fn`` is the step).
      make_step: ``(value_and_force, shift_fn, dt, chain_dofs) -> step`` (None for NPT: jax-md's own).
      stochastic: whether the bath exchanges heat through noise (the conserved quantity subtracts it; the
        centre-of-mass momentum is thermalised too).
      chain_field: the state field holding the Nosé–Hoover chain of the particles (None: none).
      fixed_box: whether the box stays fixed (the replica engine runs only these).
      restart_fields: the state fields a restart stores (:func:`state_arrays`).
    """

    name: str
    jax_md: Callable[..., Any]
    make_step: Callable[..., Callable[..., tuple[Any, StepAux]]] | None
    stochastic: bool = False
    chain_field: str | None = None
    fixed_box: bool = True
    restart_fields: tuple[str, ...] = ("position", "momentum", "force", "mass")

    def degrees_of_freedom(self, n_atoms: int, n_fixed: int = 0) -> int:
        """Kinetic degrees of freedom the temperature is reported over and the thermostat aims at: ``3N - 3``
        (centre-of-mass momentum zero and conserved), ``3N`` for Langevin, ``3 (N - n_fixed)`` with fixed atoms;
        at least 1."""
        if n_fixed:
            dof = 3 * (n_atoms - n_fixed)
        else:
            dof = 3 * n_atoms if self.stochastic else 3 * n_atoms - 3
        return max(dof, 1)

    def extended_energy(self, state: Any, kT: Any, pressure: Any = 0.0, dof: Any = None) -> Any:
        """Energy of the extended system's variables, eV (traceable; zero without them): the Nosé–Hoover chain
        (with ``dof`` degrees of freedom; None: the chain's own) and, for NPT, the barostat chain, ``P V``
        (``pressure`` eV/Å³) and the box kinetic energy (jax-md's ``npt_nose_hoover_invariant``)."""
        if self.chain_field is None:
            return jnp.zeros(())
        energy = chain_energy(getattr(state, self.chain_field), kT, dof)
        if self.fixed_box:
            return energy
        b = state.barostat
        barostat = jnp.sum(b.momentum**2 / (2 * b.mass)) + kT * jnp.sum(b.position)
        volume = jnp.abs(jnp.linalg.det(simulate.npt_box(state)))
        box_ke = state.box_momentum**2 / (2 * state.box_mass)
        return energy + barostat + pressure * volume + box_ke

    def conserved(self, total: float, heat: float, extended: float) -> float:
        """The conserved quantity, eV, from ``total = E_pot + E_kin``: NVE the total energy; Langevin the total
        minus the ``heat`` the bath put in since step 0; Nosé–Hoover and NPT the total plus the ``extended``
        energy (:meth:`extended_energy`)."""
        return total - heat if self.stochastic else total + extended

    def simulator(
        self,
        fn: Callable,
        shift_fn: Callable,
        dt: float,
        kT: Any,
        *,
        gamma: Any,
        tau: Any,
        pressure: Any = 0.0,
        barostat_tau: Any = None,
    ) -> tuple[Callable, Callable]:
        """jax-md's ``(init_fn, apply_fn)`` of this ensemble for the force (NPT: energy) function ``fn``."""
        if self.stochastic:
            return self.jax_md(fn, shift_fn, dt, kT, gamma=gamma)
        if self.chain_field is None:
            return self.jax_md(fn, shift_fn, dt)
        if self.fixed_box:
            return self.jax_md(fn, shift_fn, dt, kT, tau=tau)
        return self.jax_md(
            fn, shift_fn, dt, pressure, kT, barostat_kwargs={"tau": barostat_tau}, thermostat_kwargs={"tau": tau}
        )


_STATE = ("position", "momentum", "force", "mass")

#: the ensembles by name
_NPT_STATE = (*_STATE, "thermostat", "barostat", "box_position", "box_momentum", "box_mass", "reference_box")
ENSEMBLES: dict[str, Ensemble] = {
    e.name: e
    for e in (
        Ensemble("nve", simulate.nve, _nve_step),
        Ensemble("nvt_langevin", simulate.nvt_langevin, _langevin_step, True, restart_fields=(*_STATE, "rng")),
        Ensemble(
            "nvt_nose_hoover", simulate.nvt_nose_hoover, _nose_hoover_step, False, "chain", True, (*_STATE, "chain")
        ),
        Ensemble("npt_nose_hoover", simulate.npt_nose_hoover, None, False, "thermostat", False, _NPT_STATE),
    )
}


def _leaf_name(path: Any) -> str:
    """The name a restart file gives a state leaf: its pytree path, e.g. ``position``, ``chain_momentum``."""
    return jax.tree_util.keystr(path).strip(".").replace("/", "_") or "leaf"


def state_arrays(state: Any) -> dict[str, np.ndarray]:
    """An ensemble's state as named NumPy arrays (one per leaf, named by :func:`_leaf_name`), as a restart
    stores them."""
    return {_leaf_name(path): np.asarray(x) for path, x in jax.tree_util.tree_flatten_with_path(state)[0]}


def restore_state(template: Any, arrays: dict[str, Any]) -> Any:
    """A state like ``template`` (an ensemble's state) rebuilt from the named arrays a restart stores
    (:func:`state_arrays`).

    Raises:
      ValueError: a missing array or a shape mismatch (a file from another ensemble or system).
    """
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = []
    for path, leaf in paths:
        key = _leaf_name(path)
        if key not in arrays:
            raise ValueError(f"restart state lacks {key!r}: written by another ensemble or version?")
        value = arrays[key]
        if value.shape != jnp.shape(leaf):
            raise ValueError(f"restart state {key!r} has shape {value.shape}, expected {jnp.shape(leaf)}")
        leaves.append(jnp.asarray(value, dtype=leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def get_ensemble(name: str, *, fixed_box: bool = False) -> Ensemble:
    """The :class:`Ensemble` called ``name``.

    Raises:
      ValueError: an unknown name, or (``fixed_box``) an ensemble whose box changes (NPT: each replica's box
        would change; run it with ``run_md``), naming the ones there are.
    """
    names = tuple(n for n, e in ENSEMBLES.items() if e.fixed_box or not fixed_box)
    if name not in names:
        what = "replicas support the ensembles" if fixed_box else "ensemble must be one of"
        extra = " (NPT changes each replica's box: run each structure with run_md)" if name in ENSEMBLES else ""
        raise ValueError(f"{what} {names}, got {name!r}{extra}")
    return ENSEMBLES[name]
