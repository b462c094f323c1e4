"""The on-the-fly active-learning loop: ``equiforce learn CONFIG`` and :func:`run_active_learning`.

Start (generation 0): a model file (``start.model``), or labelled frames (``start.data``: trained on first), or
unlabelled structures (``start.structures``: labelled first, then trained on).

Each further generation ``g``:

1. **MD**: every seed structure runs under every condition (``md.conditions``) as one replica, with
   :func:`equiforce.md.run_md` (jit-compiled chunks; σ_F of every step is computed inside the compiled chunk by
   its uncertainty monitor, which stops the replica at the first step whose largest per-atom σ_F exceeds
   ``selection.upper``). :func:`equiforce.md.run_replicas` runs replicas in one program but has no uncertainty
   monitor, so each replica is its own ``run_md`` call.
2. **Candidates**: the replica's trajectory frames (every ``md.report_interval`` steps) and its stop frame whose
   largest per-atom σ_F exceeds ``selection.lower``. A replica restarts next generation from its last frame
   below ``selection.lower`` (its old start when there is none).
3. **Batch**: :func:`equiforce.uncertainty.select.select_structures` (σ, then farthest-point diversity) picks
   ``selection.batch_size`` of them (fewer when the budget or the candidates run out).
4. **Labels**: :func:`equiforce.learning.labelling.label_batch` (workers; each label appended as it is done;
   failures recorded and skipped). Each labelled frame keeps its per-atom σ_F as the extxyz array
   ``sigma_forces`` (eV/Å).
5. **Training**: :func:`equiforce.training.train` on all labelled data so far (start data + every
   generation's labels), from the current model (``model.init_from``; ``training.mode: finetune``) or from
   scratch; then the calibration of σ is refitted (:func:`equiforce.uncertainty.calibration.recalibrate`) on
   the frames the loop has labelled, this generation's and the earlier ones, together with the in-distribution
   start frames (``start.data`` and generation 0's labels): fitted on the shifted frames alone σ over-covers in
   distribution. Below :data:`RECALIBRATE_MIN_STRUCTURES` structures in all only σ's scale is refitted
   (``b = 1, q = 0``): the 3-parameter power law goes extreme on a few frames. Coverage of the 95 % interval on
   the frames just labelled is reported for the model that picked them, and for the new model before and after
   recalibration.
6. **Report**: ``gen_NNN/report.json`` and ``sigma.png``; the run's ``report.json/.md/.csv/.png``.

Stop: every replica of every condition ran ``md.target_ps`` below ``selection.upper`` (``converged``), or the
label budget or the generation count is spent. The final model is ``OUTPUT_DIR/model.eqf``; its metadata
(``active_learning``) lists every generation's labelled file, its size and sha256.

Resume: the same command continues a killed run (``state.json``, written atomically after every step): no
finished generation is redone, no label computed twice, each generation once in the report. A finished run
says so and does nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from equiforce.atomic import atomic_write_bytes
from equiforce.learning.config import ConfigError, LearnConfig, load_learn_config
from equiforce.learning.labellers import LabellerError, build_calculator, check_species
from equiforce.learning.labelling import LABELLED, label_batch, read_frames
from equiforce.learning.report import plot_sigma, write_generation_report, write_run_report
from equiforce.learning.state import file_sha256, load_state, save_state

__all__ = ["LearnResult", "run_active_learning"]

#: config sections a resumed run may change (the rest must match the run in OUTPUT_DIR)
RESUMABLE_CHANGES = ("budget", "base_dir", "labeller.workers")
#: fewest structures (in-distribution start frames plus the loop's labels) on which a generation refits σ's
#: power law ``σ_F = a σ_raw^b σ̄_raw^q``; on fewer, only the scale ``a`` is refitted (``b = 1, q = 0``). At least 2
#: (``recalibrate`` needs 2); the 3-parameter fit went extreme on 3-10 frames (a = 204, b = 0.45, q = 2.76).
RECALIBRATE_MIN_STRUCTURES = 20


@dataclasses.dataclass(frozen=True)
class LearnResult:
    """What a run produced.

    Attributes:
      model_path: the final model file (``OUTPUT_DIR/model.eqf``).
      generations: the generation records (as in ``report.json``).
      finished: why the run stopped (``converged: ...``, ``label budget spent``, ``generation count spent``).
      labels_used: labeller calls of the loop (failed ones included, ``start.structures`` excluded).
      output_dir: the run's folder.
    """

    model_path: Path
    generations: list[dict[str, Any]]
    finished: str
    labels_used: int
    output_dir: Path


def _write_extxyz(path: Path, frames: list[Any]) -> None:
    import ase.io

    buf = io.StringIO()
    ase.io.write(buf, frames, format="extxyz")
    atomic_write_bytes(path, buf.getvalue().encode())


def _read_any(path: Path) -> list[Any]:
    """Frames of any readable structure file as ``ase.Atoms`` (labels on a SinglePointCalculator)."""
    from equiforce.data.readers import read_structures

    s = read_structures(path)
    return [s.to_atoms(k) for k in range(len(s))]


def _config_key(cfg: LearnConfig) -> dict[str, Any]:
    d = cfg.to_dict()
    for k in ("budget", "base_dir"):
        d.pop(k, None)
    d["labeller"].pop("workers", None)
    return json.loads(json.dumps(d))  # as the state file holds it (tuples become lists)


def _diff(a: Any, b: Any, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{where}{k}.")
        return out
    return [] if a == b else [where.rstrip(".")]


class _Loop:
    def __init__(self, cfg: LearnConfig, log: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.log = log
        self.out = cfg.resolve(cfg.output_dir)
        self.spec = cfg.labeller.spec()

    # -- checks before anything runs ----------------------------------------------------------------------------

    def check_inputs(self) -> None:
        cfg = self.cfg
        for name in ("model", "data", "structures"):
            p = cfg.resolve(getattr(cfg.start, name))
            if p is not None and not p.exists():
                raise FileNotFoundError(f"start.{name}: no such file: {p}")
        for name in ("seeds", "test"):
            p = cfg.resolve(getattr(cfg, name))
            if p is not None and not p.exists():
                raise FileNotFoundError(f"{name}: no such file: {p}")
        try:
            build_calculator(self.spec)
        except LabellerError as err:
            raise LabellerError(f"labeller: {err}") from None
        self.seeds = self._seed_frames()
        seed_symbols = {s for a in self.seeds for s in a.get_chemical_symbols()}
        check_species(self.spec, seed_symbols)
        if cfg.start.structures:
            check_species(self.spec, {s for a in _read_any(cfg.resolve(cfg.start.structures)) for s in a.symbols})
        if cfg.start.model:
            from equiforce.potentials.model_io import enable_x64_for, load_model

            enable_x64_for(cfg.resolve(cfg.start.model))
            pot, _, _ = load_model(cfg.resolve(cfg.start.model))
            if pot.uncertainty_config is None:
                raise ConfigError(
                    f"start.model {cfg.start.model} has no uncertainty: the loop needs σ (train with "
                    "model.uncertainty: true, a committee, or run `equiforce calibrate` on it first)"
                )
            pot.check_species(np.concatenate([a.numbers for a in self.seeds]))
        else:
            known = set()
            for name in ("data", "structures"):
                p = cfg.resolve(getattr(cfg.start, name))
                if p is not None:
                    known |= {s for a in _read_any(p) for s in a.get_chemical_symbols()}
            missing = sorted(seed_symbols - known)
            if missing:
                raise ConfigError(
                    f"the seed structures hold element(s) {missing} that the start data lack: the first model "
                    "would not know them"
                )
            if (cfg.training.config.get("model") or {}).get("uncertainty") is False:
                raise ConfigError("training.config.model.uncertainty is false: the loop needs σ")
        if cfg.md.conditions and any(c.ensemble == "npt_nose_hoover" for c in cfg.md.conditions):
            if not all(np.all(a.pbc) for a in self.seeds):
                raise ConfigError("md.conditions: npt_nose_hoover needs periodic seed structures")

    def _seed_frames(self) -> list[Any]:
        cfg = self.cfg
        if cfg.seeds is not None:
            import ase.io

            frames = list(ase.io.read(cfg.resolve(cfg.seeds), ":"))
        else:
            src = cfg.start.structures or cfg.start.data
            if src is None:
                raise ConfigError("seeds: give the MD's seed structures (start.model alone has none)")
            frames = _read_any(cfg.resolve(src))[:1]
        if not frames:
            raise ConfigError("seeds: no structures")
        for a in frames:
            a.calc = None
        return frames

    # -- state -------------------------------------------------------------------------------------------------

    def open_state(self) -> dict[str, Any]:
        state = load_state(self.out)
        key = _config_key(self.cfg)
        if state is None:
            self.out.mkdir(parents=True, exist_ok=True)
            starts = []
            n_seeds = len(self.seeds)
            for r in range(len(self.cfg.md.conditions) * n_seeds):
                p = self.out / "replicas" / f"r{r:03d}_start_g001.extxyz"
                _write_extxyz(p, [self.seeds[r % n_seeds]])
                starts.append(str(p))
            state = {
                "version": 1,
                "config": key,
                "current_model": None,
                "labels_used": 0,
                "replica_starts": starts,
                "generations": [],
                "finished": None,
            }
            save_state(self.out, state)
            return state
        changed = _diff(state["config"], key)
        if changed:
            raise ConfigError(
                f"{self.out} holds an active-learning run of another config (changed: {', '.join(changed)}); "
                "only budget and labeller.workers may change on resume: use another output_dir"
            )
        return state

    def save(self) -> None:
        save_state(self.out, self.state)

    def gen_record(self, g: int) -> dict[str, Any]:
        gens = self.state["generations"]
        while len(gens) <= g:
            gens.append({"generation": len(gens), "step": "started"})
        return gens[g]

    # -- the run -----------------------------------------------------------------------------------------------

    def run(self) -> LearnResult:
        cfg = self.cfg
        self.state = self.open_state()
        st = self.state
        self.generation_zero()
        while True:
            done_gens = sum(1 for r in st["generations"][1:] if r.get("step") == "reported")
            last = st["generations"][-1]
            if last.get("step") == "reported":
                if last.get("converged"):
                    return self.finish(last["converged"])
                if st["labels_used"] >= cfg.budget.max_labels:
                    return self.finish(f"label budget spent ({st['labels_used']} of {cfg.budget.max_labels} labels)")
                if done_gens >= cfg.budget.max_generations:
                    return self.finish(f"generation count spent ({done_gens} generations)")
                g = len(st["generations"])
            else:
                g = len(st["generations"]) - 1
            self.generation(g)

    def finish(self, why: str) -> LearnResult:
        st = self.state
        final = self.out / "model.eqf"
        src = Path(st["current_model"])
        if not final.is_file() or file_sha256(final) != file_sha256(src):
            atomic_write_bytes(final, src.read_bytes(), fault="model")
        if st.get("finished") == why:
            self.log(f"the run in {self.out} is already finished ({why}): nothing to do; model {final}")
            return self.result()
        st["finished"] = why
        self.save()
        write_run_report(self.out, st["generations"], why)
        self.log(f"active learning finished: {why}; model {final}")
        return self.result()

    def result(self) -> LearnResult:
        st = self.state
        return LearnResult(self.out / "model.eqf", st["generations"], st["finished"], st["labels_used"], self.out)

    # -- generation 0 ------------------------------------------------------------------------------------------

    def generation_zero(self) -> None:
        cfg, st = self.cfg, self.state
        rec = self.gen_record(0)
        if rec["step"] == "reported":
            return
        folder = self.out / "gen_000"
        labelled: list[Any] = []
        if cfg.start.structures:
            frames = _read_any(cfg.resolve(cfg.start.structures))
            for k, a in enumerate(frames):
                a.calc = None
                a.info["al_id"] = f"start-{k:05d}"
            self.log(f"generation 0: labelling {len(frames)} start structures")
            labelled, failures = label_batch(self.spec, frames, folder, workers=cfg.labeller.workers, log=self.log)
            rec.update(n_labelled=len(labelled), n_failed=len(failures), failures=failures)
            if not labelled and not cfg.start.data and not cfg.start.model:
                raise LabellerError("the labeller failed on every start structure (see gen_000/failures.jsonl)")
        start_model = cfg.resolve(cfg.start.model)
        if cfg.start.structures or start_model is None:
            if rec["step"] != "trained":
                self.log("generation 0: training the first model")
                self.train_generation(0, labelled, previous=start_model)
        else:
            st["current_model"] = str(start_model)
        rec.update(step="reported", labels_used=0, conditions={})
        self.save()
        if folder.is_dir():
            write_generation_report(folder, rec)
        write_run_report(self.out, st["generations"], None)

    # -- a generation ------------------------------------------------------------------------------------------

    def generation(self, g: int) -> None:
        cfg, st = self.cfg, self.state
        rec = self.gen_record(g)
        folder = self.out / f"gen_{g:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        self.log(f"generation {g}: step {rec['step']} done so far; model {st['current_model']}")
        if rec["step"] == "started":
            self.md_step(g, rec, folder)
            rec["step"] = "md"
            self.save()
        if rec.get("converged"):
            rec.update(step="reported", labels_used=st["labels_used"], n_labelled=0, n_failed=0)
            self.report(g, rec, folder)
            return
        if rec["step"] == "md":
            self.select_step(g, rec, folder)
            rec["step"] = "selected"
            self.save()
        if rec["step"] == "selected":
            selected = read_frames(folder / "selected.extxyz")
            labelled, failures = label_batch(self.spec, selected, folder, workers=cfg.labeller.workers, log=self.log)
            rec.update(n_labelled=len(labelled), n_failed=len(failures), failures=failures)
            st["labels_used"] += len(selected)
            rec.update(step="labelled", labels_used=st["labels_used"])
            self.save()
        if rec["step"] == "labelled":
            labelled = read_frames(folder / LABELLED)
            if labelled:
                self.train_generation(g, labelled, previous=Path(st["current_model"]))
            else:
                self.log(f"generation {g}: no frame labelled; the model stays")
            rec["step"] = "trained"
            self.save()
        if rec["step"] == "trained":
            rec["step"] = "reported"
            self.report(g, rec, folder)

    def report(self, g: int, rec: dict[str, Any], folder: Path) -> None:
        import json

        sig_path = folder / "md" / "sigma.json"
        if sig_path.is_file():
            plot_sigma(
                folder / "sigma.png",
                json.loads(sig_path.read_text()),
                self.cfg.selection.lower,
                self.cfg.selection.upper,
            )
        self.save()
        write_generation_report(folder, rec)
        write_run_report(self.out, self.state["generations"], None)
        self.log(
            f"generation {g} done: {rec.get('n_labelled', 0)} labelled, {rec.get('n_failed', 0)} failed, "
            f"{self.state['labels_used']} labels used"
        )

    # -- 1-2: MD and candidates --------------------------------------------------------------------------------

    def md_step(self, g: int, rec: dict[str, Any], folder: Path) -> None:
        import json

        import ase.io

        from equiforce.md import MDBlowUpError, run_md
        from equiforce.potentials.model_io import enable_x64_for, load_model
        from equiforce.uncertainty.calibration import predict_uncertainties
        from equiforce.uncertainty.select import read_pool

        cfg, st = self.cfg, self.state
        md = cfg.md
        model_path = Path(st["current_model"])
        enable_x64_for(model_path)
        potential, params, _ = load_model(model_path)
        md_dir = folder / "md"
        md_dir.mkdir(parents=True, exist_ok=True)
        n_seeds = len(self.seeds)
        candidates: list[Any] = []
        sigma_by_condition: dict[str, list[float]] = {}
        conditions: dict[str, dict[str, Any]] = {}
        next_starts = list(st["replica_starts"])
        for r, start in enumerate(st["replica_starts"]):
            cond = md.conditions[r // n_seeds]
            name = f"r{r:03d}_{cond.name}"
            traj, unc, summary = md_dir / f"{name}.h5", md_dir / f"{name}_uncertain.extxyz", md_dir / f"{name}.json"
            if not summary.is_file():
                atoms = ase.io.read(start)
                kwargs = {"pressure_GPa": cond.pressure_GPa} if cond.pressure_GPa is not None else {}
                t0 = time.perf_counter()
                blew_up = None
                try:
                    run_md(
                        str(model_path),
                        atoms,
                        ensemble=cond.ensemble,
                        temperature_K=cond.temperature_K,
                        timestep_fs=md.timestep_fs,
                        steps=md.steps,
                        report_interval=md.report_interval,
                        friction_per_ps=md.friction_per_ps,
                        seed=cfg.seed + 1000 * g + r,
                        trajectory=traj,
                        restart=True,
                        progress=False,
                        precision=md.precision,
                        uncertainty_threshold=cfg.selection.upper,
                        uncertainty_action="stop",
                        uncertainty_min_spacing=1,
                        uncertain_frames=unc,
                        log=lambda m: None,
                        **kwargs,
                    )
                except MDBlowUpError as err:
                    blew_up = str(err)
                atomic_write_bytes(
                    summary,
                    json.dumps({"blew_up": blew_up, "wall_s": time.perf_counter() - t0}).encode(),
                )
            info = json.loads(summary.read_text())
            stops = [a for a in read_frames(unc) if not _collapsed(a)]
            pool = read_pool(traj)
            steps = _trajectory_steps(traj)
            # a replica that collapsed (atoms closer than MIN_PAIR_DISTANCE) with σ_F still below upper: its
            # frames from the collapse on are no configurations to learn from (nor to predict on)
            n_ok = next((k for k in range(len(pool)) if _collapsed(pool.to_atoms(k))), len(pool))
            collapsed_step = int(steps[n_ok]) if n_ok < len(pool) else None
            if collapsed_step is not None:
                self.log(f"generation {g}: replica {name} collapsed at step {collapsed_step} (σ_F below upper)")
                pool, steps = pool.subset(np.arange(n_ok)), steps[:n_ok]
                stops = [a for a in stops if int(a.info.get("step", 0)) < collapsed_step]
            per_atom: list[np.ndarray] = []
            if len(pool):
                pred = predict_uncertainties(potential, params, pool)
                per_atom = np.split(pred.forces_uncertainty, np.cumsum(pool.n_atoms)[:-1])
            smax = np.array([float(np.max(s)) for s in per_atom])
            if stops:
                stop_step = min(int(a.info.get("step", 0)) for a in stops)
            elif collapsed_step is not None:
                stop_step = collapsed_step
            elif info.get("blew_up"):
                stop_step = int(steps[-1]) if len(steps) else 0
            else:
                stop_step = None
            reached = (stop_step if stop_step is not None else int(steps[-1])) * md.timestep_fs / 1000.0
            c = conditions.setdefault(
                cond.name, {"n_replicas": 0, "n_stopped": 0, "min_time_below_upper_ps": np.inf, "replicas": {}}
            )
            c["n_replicas"] += 1
            c["n_stopped"] += int(stop_step is not None)
            c["min_time_below_upper_ps"] = float(min(c["min_time_below_upper_ps"], reached))
            c["replicas"][name] = {
                "time_below_upper_ps": reached,
                "stopped": stop_step is not None,
                "blew_up": info.get("blew_up"),
                "collapsed_at_step": collapsed_step,
                "frames": len(pool),
                "md_wall_s": info.get("wall_s"),
            }
            sigma_by_condition.setdefault(cond.name, []).extend(smax.tolist())
            for k in range(len(pool)):
                if smax[k] > cfg.selection.lower:
                    a = pool.to_atoms(k)
                    a.arrays["sigma_forces"] = per_atom[k].copy()
                    a.info.update(replica=name, condition=cond.name, step=int(steps[k]), sigma_max=float(smax[k]))
                    candidates.append(a)
            if stops:  # the stop frame itself (σ above upper), with σ_F as the model computes it
                a = stops[0].copy()
                a.calc = None
                one = _structure_set([a])
                p1 = predict_uncertainties(potential, params, one)
                a.arrays["sigma_forces"] = p1.forces_uncertainty.copy()
                a.info = {"replica": name, "condition": cond.name, "step": stop_step}
                a.info["sigma_max"] = float(np.max(p1.forces_uncertainty))
                candidates.append(a)
            below = np.nonzero(smax < cfg.selection.lower)[0]
            if len(below):
                p = self.out / "replicas" / f"r{r:03d}_start_g{g + 1:03d}.extxyz"
                a = pool.to_atoms(int(below[-1]))
                a.calc = None
                _write_extxyz(p, [a])
                next_starts[r] = str(p)
        for c in conditions.values():
            c["done"] = c["n_stopped"] == 0 and c["min_time_below_upper_ps"] >= cfg.md.target_ps - 1e-9
        for a in candidates:
            a.set_velocities(np.zeros((len(a), 3))) if "momenta" in a.arrays else None
        _write_extxyz(folder / "candidates.extxyz", candidates) if candidates else None
        atomic_write_bytes(md_dir / "sigma.json", json.dumps(sigma_by_condition).encode())
        rec.update(conditions=conditions, n_candidates=len(candidates))
        rec["sigma_max_quantiles"] = {
            name: [float(q) for q in np.quantile(v, [0.05, 0.5, 0.95])] for name, v in sigma_by_condition.items() if v
        }
        st["replica_starts"] = next_starts
        if all(c["done"] for c in conditions.values()):
            rec["converged"] = (
                f"converged: every condition ran {cfg.md.target_ps} ps below σ_F = {cfg.selection.upper} eV/Å"
            )
        self.log(
            f"generation {g}: MD done; {len(candidates)} candidates; "
            + ", ".join(f"{n}: {c['min_time_below_upper_ps']:.3g} ps below upper" for n, c in conditions.items())
        )

    # -- 3: the batch ------------------------------------------------------------------------------------------

    def select_step(self, g: int, rec: dict[str, Any], folder: Path) -> None:
        from equiforce.potentials.model_io import load_model
        from equiforce.uncertainty.select import select_structures

        cfg, st = self.cfg, self.state
        candidates = read_frames(folder / "candidates.extxyz")
        n = min(cfg.selection.batch_size, cfg.budget.max_labels - st["labels_used"], len(candidates))
        selected = []
        if n > 0:
            potential, params, _ = load_model(st["current_model"])
            pool = _structure_set(candidates)
            idx, _ = select_structures(potential, params, pool, n, candidates=cfg.selection.candidates)
            for j, k in enumerate(idx):
                a = candidates[int(k)]
                a.info["al_id"] = f"g{g:03d}-{j:04d}"
                selected.append(a)
        _write_extxyz(folder / "selected.extxyz", selected)
        rec["n_selected"] = len(selected)
        self.log(f"generation {g}: {len(selected)} frames selected from {len(candidates)} candidates")

    # -- 5: training and recalibration -------------------------------------------------------------------------

    def all_labelled(self, upto: int) -> list[Any]:
        cfg = self.cfg
        frames: list[Any] = []
        if cfg.start.data:
            frames += _read_any(cfg.resolve(cfg.start.data))
        for g in range(upto + 1):
            frames += read_frames(self.out / f"gen_{g:03d}" / LABELLED)
        return frames

    def train_generation(self, g: int, labelled: list[Any], previous: Path | None) -> None:
        import yaml

        from equiforce.potentials.model_io import enable_x64_for, load_model, save_model
        from equiforce.training import load_config, train

        cfg, st = self.cfg, self.state
        rec = self.gen_record(g)
        folder = self.out / f"gen_{g:03d}"
        data = self.all_labelled(g)
        if len(data) < 2:
            raise ConfigError(f"generation {g}: {len(data)} labelled frame(s) in all: training needs at least 2")
        for a in data:
            a.arrays.pop("momenta", None)
        train_file = folder / "train_data.extxyz"
        _write_extxyz(train_file, data)
        tc = copy.deepcopy(dict(cfg.training.config))
        tc["output_dir"] = str(folder / "train")
        tc["data"] = {**dict(tc.get("data") or {}), "train": str(train_file), "test": None}
        tc.setdefault("md_check", {"steps": 0})
        tc.setdefault("progress_bar", False)
        model = dict(tc.get("model") or {})
        if previous is not None and (cfg.training.mode == "finetune" or g == 0):
            model["init_from"] = str(previous)
        tc["model"] = model
        yaml_path = folder / "train.yaml"
        atomic_write_bytes(yaml_path, yaml.safe_dump(tc, sort_keys=False).encode())
        tcfg = load_config(yaml_path)
        resume = (folder / "train" / "checkpoints" / "last.ckpt").is_file()
        t0 = time.perf_counter()
        result = train(tcfg, resume=resume, log=self.log)
        rec["train_wall_s"] = time.perf_counter() - t0
        enable_x64_for(result.model_path)
        potential, params, header = load_model(result.model_path)
        metadata = dict(header.get("metadata") or {})
        calib: dict[str, Any] = {}
        new_set = _structure_set(labelled) if len(labelled) else None
        if previous is not None and new_set is not None and g > 0:
            enable_x64_for(previous)
            p_old, w_old, _ = load_model(previous)
            calib["previous_model"] = _coverage(p_old, w_old, new_set)
        if new_set is not None and len(labelled) >= 1:
            calib["before"] = _coverage(potential, params, new_set)
            if cfg.training.recalibrate and g > 0:
                from equiforce.uncertainty.calibration import UncertaintyError

                # the frames the loop labelled (picked where the model was unsure, i.e. shifted) with the start
                # frames (in distribution); training's own LLPR fit stays, its calibration is refitted
                in_dist, shifted = _calibration_frames(self.out, cfg.resolve(cfg.start.data), g)
                try:
                    potential, params, info = _recalibrate(potential, params, in_dist, shifted, log=self.log)
                    calib["after"] = _coverage(potential, params, new_set)
                    calib.update(info)
                except UncertaintyError as err:
                    calib["error"] = str(err)
                    self.log(f"generation {g}: recalibration skipped ({err})")
        rec["calibration"] = calib
        lineage = []
        if previous is not None:  # the generations before this one, as the model fine-tuned from lists them
            prev_meta = (load_model(previous)[2].get("metadata") or {}).get("active_learning") or {}
            lineage = [e for e in prev_meta.get("generations") or [] if e["generation"] < g]
        if (folder / LABELLED).is_file():
            lineage.append(
                {
                    "generation": g,
                    "labelled": str(folder / LABELLED),
                    "n_frames": len(labelled),
                    "sha256": file_sha256(folder / LABELLED),
                }
            )
        start_data = cfg.resolve(cfg.start.data)
        metadata["active_learning"] = {
            "start": {
                "model": cfg.start.model,
                "data": None
                if start_data is None
                else {"path": str(start_data), "sha256": file_sha256(start_data) if start_data.is_file() else None},
            },
            "labeller": self.spec,
            "generations": lineage,
            "training_data": {"path": str(train_file), "n_frames": len(data), "sha256": file_sha256(train_file)},
        }
        model_path = folder / "model.eqf"
        save_model(model_path, potential, params, metadata)
        if cfg.test:
            rec["test"] = _test_errors(potential, params, _structure_set(_read_any(cfg.resolve(cfg.test))))
        st["current_model"] = str(model_path)
        rec["model"] = str(model_path)
        rec["n_train"] = len(data)
        rec["step"] = "trained"
        self.save()


def _calibration_frames(out: Path, start_data: Path | None, g: int) -> tuple[list[Any], list[Any]]:
    """The frames generation ``g`` recalibrates σ on: ``(in_distribution, shifted)``, the start frames
    (``start.data`` and generation 0's labels of ``start.structures``) and generations 1..g's labels."""
    in_dist = _read_any(start_data) if start_data is not None else []
    in_dist += read_frames(out / "gen_000" / LABELLED)
    shifted = [a for k in range(1, g + 1) for a in read_frames(out / f"gen_{k:03d}" / LABELLED)]
    return in_dist, shifted


def _recalibrate(
    potential: Any,
    params: Any,
    in_distribution: list[Any],
    shifted: list[Any],
    *,
    min_structures: int = RECALIBRATE_MIN_STRUCTURES,
    log: Callable[[str], None] | None = None,
) -> tuple[Any, Any, dict[str, Any]]:
    """:func:`equiforce.uncertainty.calibration.recalibrate` on ``in_distribution + shifted`` (labelled
    ``ase.Atoms``): the power law with structure term from ``min_structures`` frames on, the scale alone below.

    Returns ``(potential, params, info)``; ``info``: ``fit`` (``"power_law"`` or ``"scale"``), ``n_frames``,
    ``n_in_distribution``, ``n_shifted`` and recalibrate's ``record``.

    Raises:
      UncertaintyError: fewer than 2 frames, no labels, degenerate σ (from ``recalibrate``).
    """
    from equiforce.uncertainty.calibration import recalibrate

    frames = list(in_distribution) + list(shifted)
    fit = "power_law" if len(frames) >= min_structures else "scale"
    if log and fit == "scale":
        log(f"σ recalibration on {len(frames)} frames (< {min_structures}): the scale only (b = 1, q = 0)")
    potential, params, record = recalibrate(
        potential, params, _structure_set(frames), exponent=fit == "power_law", log=log
    )
    info = {
        "fit": fit,
        "n_frames": len(frames),
        "n_in_distribution": len(in_distribution),
        "n_shifted": len(shifted),
        "record": record,
    }
    return potential, params, info


def _collapsed(atoms: Any) -> bool:
    """Whether two atoms are closer than :data:`equiforce.data.neighbours.MIN_PAIR_DISTANCE` (a collapsed MD
    frame: the data pipeline refuses it)."""
    from ase.neighborlist import neighbor_list

    from equiforce.data.neighbours import MIN_PAIR_DISTANCE

    return len(neighbor_list("d", atoms, MIN_PAIR_DISTANCE)) > 0


def _trajectory_steps(path: Path) -> np.ndarray:
    from equiforce.md import read_h5md

    return np.asarray(read_h5md(path)["step"], np.int64)


def _structure_set(frames: list[Any]) -> Any:
    from equiforce.data.structures import StructureSet

    labelled = all(a.calc is not None for a in frames)
    return StructureSet.from_atoms(frames, require_labels=labelled) if labelled else StructureSet.from_atoms(frames)


def _coverage(potential: Any, params: Any, s: Any) -> float | None:
    """Fraction of force components of ``s`` within ±1.96 σ_F of the model (None without labels)."""
    from equiforce.uncertainty.calibration import predict_uncertainties

    if s.forces is None:
        return None
    pred = predict_uncertainties(potential, params, s)
    z = np.abs(pred.forces - s.forces) / np.maximum(pred.forces_uncertainty[:, None], 1e-300)
    return float(np.mean(z <= 1.959963984540054))


def _test_errors(potential: Any, params: Any, s: Any) -> dict[str, float]:
    from equiforce.uncertainty.calibration import predict_uncertainties

    pred = predict_uncertainties(potential, params, s)
    f_err = np.abs(pred.forces - s.forces)
    z = f_err / np.maximum(pred.forces_uncertainty[:, None], 1e-300)
    return {
        "n_frames": len(s),
        "forces_mae_meV_per_A": float(1000.0 * np.mean(f_err)),
        "energy_mae_meV_per_atom": float(1000.0 * np.mean(np.abs(pred.energy - s.energy) / s.n_atoms)),
        "coverage95": float(np.mean(z <= 1.959963984540054)),
        "mean_sigma_forces": float(np.mean(pred.forces_uncertainty)),
    }


def run_active_learning(config: LearnConfig | str | Path, *, log: Callable[[str], None] | None = None) -> LearnResult:
    """Run (or resume) an active-learning loop (see the module doc).

    Args:
      config: a :class:`~equiforce.learning.config.LearnConfig` or the path of its YAML file.
      log: receives progress lines (default: print).

    Returns:
      A :class:`LearnResult`.

    Raises:
      ConfigError: a bad config (lower ≥ upper, a budget below one batch, unknown keys, ...), a resumed
        ``output_dir`` that holds a run of another config, a start model without uncertainty, seed elements the
        first model cannot know.
      LabellerError: the labeller cannot be imported or built, or does not support an element of the seeds or
        start structures.
      UnknownSpeciesError: the start model does not know an element of the seeds.
      FileNotFoundError: a missing start, seeds or test file.
      All raised before any MD runs.
    """
    cfg = load_learn_config(config) if isinstance(config, str | Path) else config
    loop = _Loop(cfg, log or print)
    loop.check_inputs()
    return loop.run()
