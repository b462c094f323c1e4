"""A model file described for a person (``equiforce info MODEL.eqf``; ``--json`` prints the raw header).

:func:`describe_model` reads the header (and counts the parameters) and writes a few labelled lines: the model and
its size, species, E0s, scale and shift, what it was trained on and for how long, its validation and test errors,
the NVE verdict (with the steps and picoseconds it rests on), the uncertainty and its calibration, and its lineage
(an import, a fine-tuning source). Every field is optional: files written by older versions, imported models and
calibrated copies each say what they hold.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["describe_header", "describe_model"]

_WIDTH = 14


def describe_model(path: str | os.PathLike) -> str:
    """The summary of the model file at ``path`` (see :func:`describe_header`).

    Raises:
      ModelFileError: an unreadable, corrupt or foreign file (as :func:`~equiforce.potentials.load_model`).
    """
    from equiforce.potentials.model_io import header_and_parameter_count

    path = Path(path)
    header, n_parameters = header_and_parameter_count(path)
    return describe_header(header, path=path, n_parameters=n_parameters)


def describe_header(header: dict[str, Any], *, path: Path | None = None, n_parameters: int | None = None) -> str:
    """Labelled lines (plain text) describing a model file's header.

    Args:
      header: what :func:`~equiforce.potentials.read_header` returns.
      path: the file (its name and size head the summary).
      n_parameters: the parameter count (all committee members together), if known.
    """
    pot = header.get("potential") or {}
    meta = header.get("metadata") or {}
    lines: list[str] = []

    def add(label: str, text: str | None) -> None:
        if text:
            lines.append((f"{label + ':':{_WIDTH}s}" if label else " " * _WIDTH) + text)

    title = []
    if path is not None:
        title.append(f"{path.name} ({_size(path.stat().st_size)})" if path.exists() else path.name)
    title.append(f"{header.get('format', 'equiforce-model')} v{header.get('format_version', '?')}")
    if header.get("equiforce_version"):
        title.append(f"written by equiforce {header['equiforce_version']}")
    lines.append(", ".join(title))
    add("model", _model(pot, n_parameters))
    add("", _hyperparameters(pot))
    add("species", _species(pot.get("species") or []))
    add("E0s", _e0s(pot, meta.get("atomic_energies")))
    add("scale/shift", _scale_shift(pot))
    add("trained on", _trained_on(meta))
    add("training", _training(meta))
    for key, label in (("valid_metrics", "valid errors"), ("test_metrics", "test errors")):
        if meta.get(key):
            from equiforce.training.finish import format_metrics

            add(label, format_metrics(meta[key]))
    add("NVE check", _nve(meta.get("nve_check")))
    add("uncertainty", _uncertainty(pot, meta.get("uncertainty")))
    add("imported", _source(meta.get("source")))
    for k, entry in enumerate(meta.get("lineage") or []):
        add("lineage" if k == 0 else "", _lineage(entry))
    post = meta.get("post_training") or {}
    if post.get("errors"):
        add("post-training", "failed steps: " + "; ".join(f"{k}: {v}" for k, v in post["errors"].items()))
    return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _model(pot: dict[str, Any], n_parameters: int | None) -> str | None:
    model = pot.get("model") or {}
    if not model and not pot:
        return None
    parts = [str(model.get("name", "?"))]
    if n_parameters is not None:
        parts.append(f"{n_parameters:,} parameters")
    if pot.get("dtype"):
        parts.append(str(pot["dtype"]))
    if pot.get("r_max") is not None:
        parts.append(f"r_max {pot['r_max']:g} Å")
    if (pot.get("ensemble_size") or 1) > 1:
        parts.append(f"a committee of {pot['ensemble_size']}")
    return ", ".join(parts)


def _hyperparameters(pot: dict[str, Any]) -> str | None:
    model = {k: v for k, v in (pot.get("model") or {}).items() if k != "name"}
    if not model:
        return None
    text = ", ".join(f"{k}={v}" for k, v in model.items())
    return text if len(text) <= 200 else text[:197] + "..."


def _symbol(z: int) -> str:
    from ase.data import chemical_symbols

    return chemical_symbols[z] if 0 < z < len(chemical_symbols) else str(z)


def _species(species: list[int]) -> str | None:
    return ", ".join(_symbol(int(z)) for z in species) if species else None


def _e0s(pot: dict[str, Any], record: dict[str, Any] | None) -> str | None:
    species, e0 = pot.get("species") or [], pot.get("atomic_energies")
    if not species or e0 is None:
        return None
    elements = (record or {}).get("elements") or {}
    parts = []
    for z, value in zip(species, e0, strict=False):
        source = (elements.get(str(z)) or {}).get("source")
        parts.append(f"{_symbol(int(z))} {value:.4f}" + (f" ({source})" if source else ""))
    return ", ".join(parts) + " eV"


def _scale_shift(pot: dict[str, Any]) -> str | None:
    if pot.get("scale") is None and pot.get("shift") is None:
        return None
    text = f"scale {pot.get('scale', 1.0):.4g} eV, shift {pot.get('shift', 0.0):.4g} eV/atom"
    if pot.get("avg_num_neighbours") is not None:
        text += f", {pot['avg_num_neighbours']:.3g} neighbours on average"
    return text


def _trained_on(meta: dict[str, Any]) -> str | None:
    data = ((meta.get("config") or {}).get("data")) or {}
    if not data and meta.get("n_train") is None:
        return None
    sizes = [f"{meta[k]} {name}" for k, name in (("n_train", "train"), ("n_valid", "valid"), ("n_test", "test"))]
    sizes = [s for s, k in zip(sizes, ("n_train", "n_valid", "n_test"), strict=True) if meta.get(k) is not None]
    where = data.get("train")
    text = str(where) if where is not None else "training data"
    if data.get("test"):
        text += f" (test: {data['test']})"
    return text + (f"; {' / '.join(sizes)} structures" if sizes else "")


def _training(meta: dict[str, Any]) -> str | None:
    if meta.get("trained_epochs") is None:
        return None
    text = f"{meta['trained_epochs']} epochs"
    if meta.get("best_epoch") is not None:
        text += f" (best {meta['best_epoch']})"
    if meta.get("training_time_s") is not None:
        text += f" in {meta['training_time_s'] / 60:.1f} min"
    if meta.get("stopped_because"):
        text += f", stopped by {str(meta['stopped_because']).replace('_', ' ')}"
    return text


def _nve(nve: dict[str, Any] | None) -> str | None:
    if not nve:
        return None
    verdict = {"passed": "passed", "failed": "FAILED", "blew_up": "FAILED (blew up)", "error": "FAILED (no run)"}
    text = verdict.get(nve.get("status"), str(nve.get("status")))
    if nve.get("drift_meV_per_atom_per_ps") is not None:
        text += (
            f": drift {nve['drift_meV_per_atom_per_ps']:.3f} meV/atom/ps "
            f"(limit ±{nve.get('threshold_meV_per_atom_per_ps')})"
        )
        if nve.get("fluctuation_meV_per_atom") is not None:
            text += f", fluctuation {nve['fluctuation_meV_per_atom']:.3f} meV/atom"
    ran = f"{nve.get('steps')} steps of {nve.get('timestep_fs')} fs"
    if nve.get("time_ps") is not None:
        ran += f" = {nve['time_ps']:.3g} ps"
    if nve.get("stopped_by_time_limit"):
        ran += f" of {nve.get('steps_requested')} asked (time limit {nve['time_limit_s'] / 60:.1f} min)"
    if nve.get("n_atoms") is not None:
        ran += f", {nve['n_atoms']} atoms"
    if nve.get("supercell") and list(nve["supercell"]) != [1, 1, 1]:
        ran += f" ({'x'.join(map(str, nve['supercell']))} supercell)"
    text += f"; {ran}"
    if nve.get("status") in ("blew_up", "error") and nve.get("message"):
        text += f"; {nve['message']}"
    return text


def _uncertainty(pot: dict[str, Any], record: dict[str, Any] | None) -> str | None:
    config = pot.get("uncertainty")
    method = (record or {}).get("method") or (config or {}).get("method")
    if not method:
        return "none"
    text = str(method)
    if record:
        scales = [
            f"{name} {record[key]:.3g}"
            for key, name in (("energy_scale", "σ_E scale"), ("forces_scale", "σ_F scale"))
            if record.get(key) is not None
        ]
        if scales:
            text += f", calibrated ({', '.join(scales)}"
            if record.get("n_valid") is not None:
                text += f" on {record['n_valid']} validation structures"
            text += ")"
        report = ((record.get("valid_report") or {}).get("forces")) or {}
        if report.get("coverage_95") is not None:
            text += f"; forces' 95 % interval covers {100 * report['coverage_95']:.0f} % of validation errors"
        with_ = record.get("calibrated_with")
        if with_:
            text += f"; calibrated with equiforce calibrate on {with_.get('data')}"
    else:
        text += ", not calibrated"
    return text


def _source(source: dict[str, Any] | None) -> str | None:
    if not source:
        return None
    parts = [f"{source.get('format', 'a model file')} {source.get('file', '')}".strip()]
    if source.get("mace_torch_version"):
        parts.append(f"mace-torch {source['mace_torch_version']}")
    if source.get("head"):
        parts.append(f"head {source['head']!r}")
    if source.get("model_dtype"):
        parts.append(f"trained in {source['model_dtype']}")
    if source.get("sha256"):
        parts.append(f"sha256 {str(source['sha256'])[:12]}…")
    return ", ".join(parts)


def _lineage(entry: dict[str, Any]) -> str:
    if entry.get("kind") == "import":
        return f"imported from {entry.get('from', '?')} ({entry.get('file', '?')})"
    if entry.get("init_from"):
        text = f"fine-tuned from {entry['init_from']}"
        details = [str(entry[k]) for k in ("model",) if entry.get(k)]
        if entry.get("trained_on"):
            details.append(f"trained on {entry['trained_on']}")
        if entry.get("sha256"):
            details.append(f"sha256 {str(entry['sha256'])[:12]}…")
        return text + (f" ({', '.join(details)})" if details else "")
    return ", ".join(f"{k}={v}" for k, v in entry.items())
