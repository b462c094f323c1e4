"""The float32 user's real path: JAX's 64-bit types off for the whole process (JAX's default).

Every other test process switches x64 on somewhere (float64 fixtures), and the switch is global, so this
runs float32 training (a committee of two, calibrated), the NVE gate, NVE and NPT MD with the per-step
uncertainty, and the calculator in a fresh subprocess that never
turns it on, and checks that x64 is still off at the end, that nothing is NaN, that energy is conserved,
and that JAX printed no "float64 requested ... truncated" warning.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    import numpy as np
    import jax
    assert not jax.config.jax_enable_x64
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        from equiforce.data import load_sample
        from equiforce.md import EquiforceCalculator, run_md
        from equiforce.training import load_config, train

        out = sys.argv[1]
        cfg = load_config(None, [
            f"output_dir={out}", "progress_bar=false", "data.train_size=20", "data.test=null",
            "model.dtype=float32", "model.hyperparameters={num_interactions: 1, num_features: 4, l_max: 1}",
            "optim.max_epochs=2", "optim.batch_size=5", "md_check.steps=200", "md_check.report_interval=50",
            "model.ensemble_size=2",
        ])
        result = train(cfg, log=lambda _: None)
        model = str(result.model_path)
        nve = run_md(model, "sample:test:1", ensemble="nve", temperature_K=300.0, timestep_fs=0.25, steps=400,
                     report_interval=100, progress=False, log=lambda _: None)
        atoms = load_sample("test").to_atoms(0)
        atoms.set_cell([16.0, 16.0, 16.0]); atoms.center(); atoms.pbc = True
        npt = run_md(model, atoms, ensemble="npt_nose_hoover", timestep_fs=0.25, steps=100, report_interval=50,
                     progress=False, log=lambda _: None)
        atoms.calc = EquiforceCalculator(model)
        energy, forces, stress = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        sigma_e = atoms.calc.get_property("energy_uncertainty", atoms)
        sigma_f = atoms.calc.get_property("forces_uncertainty", atoms)
    print(json.dumps({
        "uncertainty": result.metadata["uncertainty"]["method"],
        "sigma": [float(sigma_e), float(sigma_f.max())]
        + [f.max_forces_uncertainty for f in nve.frames + npt.frames],
        "x64": bool(jax.config.jax_enable_x64),
        "history": [h["train_loss"] for h in result.history],
        "nve_drift": nve.drift_meV_per_atom_per_ps,
        "nve_frames": len(nve.frames),
        "npt_conserved": [f.conserved for f in npt.frames],
        "calc": [float(energy), float(np.abs(forces).max()), float(np.abs(stress).max())],
        "finite": bool(np.all(np.isfinite(forces)) and np.all(np.isfinite(stress))),
        "truncation_warnings": [str(w.message)[:200] for w in caught if "truncated" in str(w.message)],
    }))
    """
)


def test_float32_training_and_md_with_x64_off(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    env["JAX_ENABLE_X64"] = "0"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=1200
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["x64"] is False  # nothing switched 64-bit types on behind the float32 user's back
    assert len(report["history"]) == 2 and all(map(_finite, report["history"]))
    assert report["nve_frames"] == 5 and abs(report["nve_drift"]) < 5.0  # meV/atom/ps, float32, 0.1 ps
    assert all(map(_finite, report["npt_conserved"]))
    assert report["finite"] and all(map(_finite, report["calc"]))
    assert report["truncation_warnings"] == []
    assert report["uncertainty"] == "committee"
    assert all(_finite(x) and x > 0 for x in report["sigma"])


def _finite(x: float) -> bool:
    return x is not None and x == x and abs(x) != float("inf")
