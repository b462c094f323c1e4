"""One system's MD over several devices (``run_md(..., devices=N)``, :mod:`equiforce.md.sharded`): energies, forces
and an NVE trajectory of a periodic water box on 4 simulated CPU devices equal the 1-device ones.

JAX fixes its device count when it starts, so the runs go in fresh subprocesses with 4 simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=4``), in float64 so that agreement to 1e-10 means the same
mathematics (the observed differences are ~1e-14: only the order of additions changes). The 1-device and the
4-device runs are two subprocesses run side by side (their compilations take most of the time).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from equiforce.md.sharded import resolve_md_devices

SCRIPT = textwrap.dedent(
    """
    import dataclasses, sys
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    from ase import Atoms
    from equiforce.md import run_md
    from equiforce.md.sharded import make_sharded_system
    from equiforce.potentials.nequip import NequIPConfig
    from equiforce.potentials.potential import Potential

    devices = None if sys.argv[1] == "1" else int(sys.argv[1])
    # 27 waters on a grid, 3.1 Å apart, slightly rattled: a periodic 9.3 Å box
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(3)] * 3, indexing="ij"), -1).reshape(-1, 3) * 3.1
    local = np.array([[0.0, 0.0, 0.0], [0.76, 0.59, 0.0], [-0.76, 0.59, 0.0]])
    pos = (grid[:, None] + local).reshape(-1, 3) + rng.normal(scale=0.05, size=(81, 3))
    atoms = Atoms("OH2" * 27, positions=pos, cell=[9.3] * 3, pbc=True)
    atoms.wrap()
    model = NequIPConfig(num_interactions=2, num_features=4, l_max=1, parity=False, num_bessel=4,
                         radial_mlp_hidden=8, radial_mlp_layers=1)
    potential = Potential(model=model, species=(1, 8), r_max=3.0, atomic_energies=(-13.6, -2041.0),
                          dtype="float64", avg_num_neighbours=10.0)
    params = potential.init(jax.random.PRNGKey(0))

    positions = jnp.asarray(atoms.get_positions())
    out = {}
    # without edge blocks (the GPU default), and each device blocking its own edges (16 pairs per block)
    for name, chunk in (("", 0), ("blocked_", 16)):
        pot = potential.replace(model=dataclasses.replace(model, edge_chunk_size=chunk))
        system = make_sharded_system(pot, params, atoms, devices=devices, skin=0.5)
        neighbor = system.neighbor_fn.allocate(positions)
        energy, grad = jax.jit(jax.value_and_grad(system.energy_fn))(positions, neighbor)
        out[name + "energy"], out[name + "forces"] = float(energy), -np.asarray(grad)
    n_mesh = 1 if system.mesh is None else int(system.mesh.devices.size)

    result = run_md((potential, params), atoms, ensemble="nve", temperature_K=300.0, timestep_fs=0.5, steps=100,
                    report_interval=100, skin=0.5, seed=1, progress=False, devices=devices, log=lambda s: None)
    np.savez(sys.argv[2], **out, n_mesh=n_mesh,
             positions=result.final_atoms.get_positions(), velocities=result.final_atoms.get_velocities(),
             epot=[f.potential_energy for f in result.frames])
    """
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, dict[str, np.ndarray]]:
    out = tmp_path_factory.mktemp("sharded")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    procs = {
        n: subprocess.Popen(
            [sys.executable, "-c", SCRIPT, str(n), str(out / f"{n}.npz")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for n in (1, 4)
    }
    for n, proc in procs.items():
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{n}-device run failed:\n{log[-4000:]}"
    return {n: dict(np.load(out / f"{n}.npz")) for n in procs}


@pytest.mark.parametrize("blocks", ["", "blocked_"])
def test_energies_and_forces_equal_one_device(runs, blocks):
    one, four = runs[1], runs[4]
    assert int(one["n_mesh"]) == 1 and int(four["n_mesh"]) == 4
    assert abs(float(one["energy"]) - float(four[blocks + "energy"])) < 1e-10
    assert np.abs(one["forces"]).max() > 0.1  # a real test: forces are not all zero
    np.testing.assert_allclose(four[blocks + "forces"], one["forces"], rtol=0, atol=1e-10)


def test_nve_trajectory_equals_one_device(runs):
    one, four = runs[1], runs[4]
    assert np.abs(one["positions"] - four["positions"]).max() < 1e-8  # Å, after 100 steps
    np.testing.assert_allclose(four["velocities"], one["velocities"], rtol=0, atol=1e-8)
    np.testing.assert_allclose(four["epot"], one["epot"], rtol=0, atol=1e-8)


def test_more_devices_than_exist():
    n = len(__import__("jax").local_devices())
    with pytest.raises(ValueError, match=f"devices = {n + 1}, but {n}"):
        resolve_md_devices(n + 1)
    for bad in (0, "most", True, []):
        with pytest.raises(ValueError, match="devices"):
            resolve_md_devices(bad)
    assert len(resolve_md_devices(None)) == 1 and len(resolve_md_devices("all")) == n


def test_a_list_of_structures_with_more_devices_than_exist():
    from ase import Atoms

    from equiforce.md import run_md
    from equiforce.potentials.nequip import NequIPConfig
    from equiforce.potentials.potential import Potential

    potential = Potential(model=NequIPConfig(), species=(1,), r_max=3.0, atomic_energies=(0.0,))
    h2 = Atoms("H2", positions=[[0.0, 0.0, 0.0], [0.74, 0.0, 0.0]])
    n = len(__import__("jax").local_devices())
    with pytest.raises(ValueError, match="devices"):
        run_md((potential, None), [h2, h2.copy()], devices=n + 1)
