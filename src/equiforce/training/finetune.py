"""Fine-tuning: start a training run from an existing model file (``model.init_from``).

The source is any equiforce model file — trained with equiforce or imported — and the run continues from its
weights on new data:

* **architecture** (model family, hyperparameters, ``r_max``, committee size) comes from the source; a
  config that sets one of them to something else is refused (:func:`resolve_model_section`, called by
  :func:`~equiforce.training.config.load_config`). The source's ``scale``, ``shift`` and
  ``avg_num_neighbours`` are kept: they are part of the function the weights compute.
* **species**: the potential knows the source's species plus those of the new data. Species-indexed weights
  (embeddings, species-dependent contractions) get the new species' rows freshly initialised and keep the
  old species' rows exactly (:func:`transfer_params`); weights that are not species-indexed are copied.
* **E0s**: ``model.atomic_energies: fit`` fits them on the new training set by least squares of the residual
  ``E_ref − E_network`` of the transferred network (so the starting model already has the new data's energy
  reference, e.g. another DFT functional); given E0s are used as they are.
* **freezing** (``finetune.freeze``): parameters whose path matches a pattern get their own learning rate
  (``finetune.frozen_learning_rate``; 0 = frozen) and warm-up, through ``optax.multi_transform``.
* **replay** (``finetune.replay_data``, ``finetune.replay_fraction``): a seeded random fraction of the
  original training data joins the training set, to limit forgetting (as in MACE's multi-head replay
  fine-tuning, Batatia et al., arXiv:2401.00096, where part of the pre-training data is mixed in).
* **lineage**: the model file's metadata lists the source (path, sha256, what it was trained on) and the
  source's own lineage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from equiforce.data.errors import DataError
from equiforce.potentials.model_io import ModelFileError, enable_x64_for, load_model
from equiforce.potentials.potential import Potential
from equiforce.training.config import ConfigError, resolve_model_section

if TYPE_CHECKING:
    from equiforce.data.structures import StructureSet
    from equiforce.training.config import TrainConfig

__all__ = [
    "FinetuneSource",
    "check_freeze_patterns",
    "freeze_labels",
    "lineage_record",
    "load_source",
    "resolve_model_section",
    "resolve_source",
    "start_from_source",
    "transfer_params",
]

_DEFAULT_NAME, _DEFAULT_R_MAX = "nequip", 5.0


def load_source(path: str | Path) -> tuple[Potential, Any, dict[str, Any], str]:
    """``(potential, params, header, sha256)`` of a fine-tuning source (64-bit JAX switched on for a float64
    file).

    Raises:
      ConfigError: the file cannot be read as a model.
    """
    path = Path(path)
    try:
        enable_x64_for(path)
        potential, params, header = load_model(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except (ModelFileError, OSError) as err:
        raise ConfigError(f"model.init_from: cannot load {path}: {err}") from err
    return potential, params, header, digest


def _keystr(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _declared_blocks(potential: Potential, key: str) -> tuple[int, int, bool] | None:
    """``(axis, blocks, fan_in_normalised)`` of a weight the model declares in ``species_blocks``, else None."""
    for pattern, axis, n_blocks, normalised in getattr(potential.model, "species_blocks", ()):
        if re.fullmatch(pattern, key):
            return axis, n_blocks, normalised
    return None


def transfer_params(
    source: Potential, source_params: Any, target: Potential, target_params: Any
) -> tuple[Any, list[str]]:
    """The target's parameters with the source's weights copied in.

    ``target`` has the source's architecture and a superset of its species (sorted). A weight of the same
    shape is copied. A weight whose shape differs only along axes where the source has ``len(source.species)``
    entries and the target ``len(target.species)`` is species-indexed: the old species' entries are copied to
    their new positions, the new species' keep ``target_params``' fresh initialisation. Weights whose axis
    starts with several per-species blocks (one-hot inputs of both atoms of an edge) are declared by the model
    config's ``species_blocks`` and mapped block by block.

    Returns:
      ``(params, extended)``: the parameters (in the target's dtype) and the paths of the weights that were
      extended for new species.

    Raises:
      DataError: a weight whose shape cannot be matched (a species that cannot be added to this model).
      ConfigError: the trees differ (not the same architecture).
    """
    old, new = len(source.species), len(target.species)
    missing = sorted(set(source.species) - set(target.species))
    if missing:
        raise ConfigError(f"fine-tuning cannot drop species the source knows: {missing}")
    where = np.searchsorted(np.asarray(target.species), np.asarray(source.species))
    src_leaves = {_keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(source_params)[0]}
    flat, treedef = jax.tree_util.tree_flatten_with_path(target_params)
    dtype = target.jnp_dtype
    out, extended = [], []
    for path, leaf in flat:
        key = _keystr(path)
        tgt = np.asarray(leaf)
        if key not in src_leaves:  # e3nn names a Linear's weights by its irreps, e.g. "w[0,0] 3x0e,4x0e"
            key = re.sub(rf"(?<![0-9]){new}x", f"{old}x", key)
        if key not in src_leaves:
            raise ConfigError(f"fine-tuning: the source has no weight {key}: not the same architecture")
        src = src_leaves[key]
        if src.shape == tgt.shape:
            out.append(np.asarray(src, dtype))
            continue
        axes = [a for a, (s, t) in enumerate(zip(src.shape, tgt.shape, strict=False)) if s != t]
        blocks = _declared_blocks(target, key)
        if blocks is not None and src.ndim == tgt.ndim and axes == [blocks[0]]:
            axis, n_blocks, normalised = blocks
            rest = src.shape[axis] - n_blocks * old
            if rest >= 0 and tgt.shape[axis] - n_blocks * new == rest:
                rows = [b * new + where for b in range(n_blocks)] + [n_blocks * new + np.arange(rest)]
                merged = np.array(tgt, dtype=np.asarray(src, dtype).dtype)
                index = tuple(np.concatenate(rows) if a == axis else np.arange(src.shape[a]) for a in range(src.ndim))
                # a layer that divides by sqrt(fan-in) sees a larger fan-in now: keep w / sqrt(fan-in) unchanged
                factor = np.sqrt(tgt.shape[axis] / src.shape[axis]) if normalised else 1.0
                merged[np.ix_(*index)] = src * factor
                out.append(merged)
                extended.append(key)
                continue
        if src.ndim != tgt.ndim or old == new or any(src.shape[a] != old or tgt.shape[a] != new for a in axes):
            raise DataError(
                f"cannot add species {sorted(set(target.species) - set(source.species))} to this model: weight "
                f"{key} has shape {src.shape} in the source and {tgt.shape} with the new species, which is not a "
                "per-species table"
            )
        merged = np.array(tgt, dtype=np.asarray(src, dtype).dtype)
        index = tuple(where if a in axes else np.arange(src.shape[a]) for a in range(src.ndim))
        merged[np.ix_(*index)] = src
        out.append(merged)
        extended.append(key)
    return jax.tree_util.tree_unflatten(treedef, out), extended


def freeze_labels(params: Any, patterns: Sequence[str]) -> Any:
    """``"frozen"`` for every parameter whose path (``params/interaction_0/...``) matches one of the regular
    expressions (``re.search``), else ``"trainable"``; a tree like ``params``."""
    compiled = [re.compile(p) for p in patterns]

    def label(path: tuple, _leaf: Any) -> str:
        key = _keystr(path)
        return "frozen" if any(c.search(key) for c in compiled) else "trainable"

    return jax.tree_util.tree_map_with_path(label, params)


def check_freeze_patterns(params: Any, patterns: Sequence[str]) -> int:
    """How many parameter arrays the patterns freeze.

    Raises:
      ConfigError: an invalid regular expression, or a pattern that matches no parameter (a typo would
        otherwise freeze nothing, silently).
    """
    keys = [_keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    n = 0
    for p in patterns:
        try:
            c = re.compile(p)
        except re.error as err:
            raise ConfigError(f"finetune.freeze: invalid pattern {p!r}: {err}") from err
        hits = [k for k in keys if c.search(k)]
        if not hits:
            raise ConfigError(f"finetune.freeze: pattern {p!r} matches no parameter (e.g. {keys[:3]})")
        n += len(hits)
    return n


def lineage_record(path: str | Path, digest: str, header: dict[str, Any]) -> list[dict[str, Any]]:
    """The fine-tuned model's lineage: its source (path, sha256, model, what it was trained on), then the
    source's own lineage."""
    meta = header.get("metadata") or {}
    cfg = meta.get("config") or {}
    entry = {
        "init_from": str(Path(path).resolve()),
        "sha256": digest,
        "model": header["potential"]["model"].get("name"),
        "species": header["potential"]["species"],
        "equiforce_version": header.get("equiforce_version"),
        "trained_on": (cfg.get("data") or {}).get("train"),
        "n_train": meta.get("n_train"),
        "source": meta.get("source"),  # an imported model's origin (e.g. a mace-torch file)
    }
    return [entry, *list(meta.get("lineage") or [])]


@dataclasses.dataclass(frozen=True)
class FinetuneSource:
    """A fine-tuning source, read once (:func:`resolve_source`) and checked against the config.

    Attributes:
      path: the model file (``model.init_from`` resolved against the config's folder).
      potential: the source's potential (architecture, species, E0s, scale, shift, dtype).
      params: its weights (NumPy arrays in the source's dtype; an LLPR model's projections included).
      header: the file's header (its metadata feeds the lineage).
      sha256: hex digest of the file's bytes.
    """

    path: Path
    potential: Potential
    params: Any
    header: dict[str, Any]
    sha256: str


def resolve_source(cfg: TrainConfig) -> FinetuneSource:
    """Read ``cfg.model.init_from`` once and check that the config's architecture is the source's.

    Called by :func:`~equiforce.training.train` before the training data are read, so a missing, unreadable or
    mismatched source is reported at once; switches on JAX's 64-bit types for a float64 source.

    Raises:
      ConfigError: no ``model.init_from``, an unreadable source, or a config whose model (name,
        hyperparameters, ``r_max`` to 1e-9 Å, committee size) is not the source's.
    """
    from equiforce.potentials.registry import config_from_dict

    m = cfg.model
    if m.init_from is None:
        raise ConfigError("fine-tuning needs model.init_from (the model file to start from)")
    path = cfg.resolve_path(m.init_from)
    source, params, header, digest = load_source(path)
    wanted = config_from_dict({"name": m.name, **m.hyperparameters})
    if wanted != source.model or abs(m.r_max - source.r_max) > 1e-9 or m.ensemble_size != source.ensemble_size:
        raise ConfigError(
            f"model.init_from {path}: the config's model ({m.name}, r_max {m.r_max} Å, {m.ensemble_size} "
            f"member(s)) is not the source's ({source.model.name}, r_max {source.r_max} Å, "
            f"{source.ensemble_size} member(s)); load the config with load_config, which takes the source's over"
        )
    return FinetuneSource(path, source, params, header, digest)


def start_from_source(
    cfg: TrainConfig,
    train: StructureSet,
    log: Callable[[str], None],
    *,
    source: FinetuneSource | None = None,
) -> tuple[Potential, Any, list[dict[str, Any]]]:
    """The potential and starting weights of a fine-tuning run, and its lineage.

    Species: the source's plus the training set's. E0s: given ones as they are; fitted ones start from the
    source's (0 for a new species) plus the least-squares per-species offset of ``E_ref − E_pred`` on the
    training set, so the starting model has the new data's energy reference.

    ``source``: the source as :func:`resolve_source` read it (the trainer reads it once, before the data);
    default: read ``cfg.model.init_from`` now.

    Raises:
      ConfigError: unreadable source, or a config whose architecture differs from the source's.
      DataError: species that cannot be added to the model.
    """
    from equiforce.data.statistics import check_atomic_energies
    from equiforce.potentials.uncertainty import network_params
    from equiforce.training.finish import refit_atomic_energies

    m = cfg.model
    if source is None:
        source = resolve_source(cfg)
    path, src_params = source.path, source.params
    src = source.potential
    species = tuple(sorted(set(src.species) | {int(z) for z in train.species}))
    new = [z for z in species if z not in src.species]
    old_e0 = dict(zip(src.species, src.atomic_energies, strict=True))
    base = Potential(
        model=src.model,
        species=species,
        r_max=src.r_max,
        atomic_energies=tuple(old_e0.get(z, 0.0) for z in species),
        scale=src.scale,
        shift=src.shift,
        avg_num_neighbours=src.avg_num_neighbours,
        dtype=m.dtype,
        ensemble_size=src.ensemble_size,
    )
    fresh = base.init(jax.random.PRNGKey(cfg.seed))
    params, extended = transfer_params(src, network_params(src_params), base, fresh)
    if isinstance(m.atomic_energies, dict):
        given = check_atomic_energies({int(k): float(v) for k, v in m.atomic_energies.items()}, species)
        potential = base.replace(atomic_energies=tuple(given[z] for z in species))
    else:
        potential = refit_atomic_energies(base, params, train)
    from ase.data import chemical_symbols

    names = [chemical_symbols[z] for z in new]
    added = f"; adding {names}: {len(extended)} per-species weights extended" if new else ""
    how = "given" if isinstance(m.atomic_energies, dict) else "fitted on the residuals of the source network"
    log(f"fine-tuning {path} ({src.model.name}, {len(src.species)} species{added}); E0s {how}")
    return potential, params, lineage_record(path, source.sha256, source.header)
