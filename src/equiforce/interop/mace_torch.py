"""Read a mace-torch model file and write an equiforce model file (``equiforce import mace``).

This module is the only one that needs torch and mace-torch (the optional extra ``equiforce[mace-import]``).
It loads the model object, reads its hyperparameters from the modules themselves and its ``state_dict`` as
NumPy arrays, and hands both to the torch-free core :func:`equiforce.interop.mace.convert_mace`. The file it
writes is an ordinary equiforce model file: pickle-free and loadable without torch.

mace-torch saves whole model objects with ``torch.save`` (a pickle): loading one runs code from the file, as
mace-torch itself does. Import only model files you trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import time
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from equiforce.interop.mace import MaceImportError, convert_mace

__all__ = ["MaceImportError", "import_mace", "is_torchscript", "read_mace_model"]

_EXTRA_HINT = "pip install 'equiforce[mace-import]' (the CPU build of torch: see the README)"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence what importing and unpickling mace-torch prints (its cuequivariance notice, e3nn's and torch's
    warnings about ``torch.load``), none of which concerns the user of the importer."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _modules() -> tuple[Any, Any]:
    try:
        with _quiet():
            import mace  # (first: sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, which e3nn 0.4.4 needs)
            import torch
            from e3nn import o3  # noqa: F401  (loads e3nn's constants once, quietly)
    except ImportError as exc:
        raise ImportError(f"importing a mace-torch model needs torch and mace-torch: {_EXTRA_HINT} ({exc})") from exc
    return torch, mace


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_torchscript(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a TorchScript archive (``torch.jit.save``, e.g. mace-torch's ``*_compiled.model``).

    Read from the file itself, without torch: both ``torch.save`` and ``torch.jit.save`` write a zip archive of
    records under one top folder, and only TorchScript's holds ``constants.pkl`` (what ``torch.load`` itself
    checks to tell them apart) next to the ``code/`` folder of the compiled module's source.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    parts = [name.split("/") for name in names]
    has_constants = any(len(p) == 2 and p[1] == "constants.pkl" for p in parts)
    has_code = any(len(p) > 2 and p[1] == "code" for p in parts)
    return has_constants and has_code


def _refuse_torchscript(path: Path) -> None:
    if is_torchscript(path):
        raise MaceImportError(
            f"{path} is a TorchScript-compiled model (torch.jit, e.g. mace-torch's *_compiled.model), which "
            "holds compiled code instead of the model object the importer reads: give the uncompiled model "
            "file instead (the *.model that mace-torch's training writes next to *_compiled.model, or "
            "torch.save(model, path) of the MACE object)"
        )


def hyperparameters_of(model: Any) -> dict[str, Any]:
    """The hyperparameters :func:`~equiforce.interop.mace.convert_mace` needs, read from a mace-torch model.

    Raises:
      MaceImportError: the object is not a mace-torch ``MACE`` / ``ScaleShiftMACE`` (or lacks its parts).
    """
    import torch

    name = type(model).__name__
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "interactions") or not hasattr(model, "products"):
        raise MaceImportError(f"the file holds a {name}, not a mace-torch MACE model")
    try:
        readout = model.readouts[-1]
        act = readout.non_linearity.acts[0] if hasattr(readout, "non_linearity") else None
        gate_fn = getattr(act, "f", None)
        gate = "silu" if gate_fn is torch.nn.functional.silu else getattr(gate_fn, "__name__", str(gate_fn))
        radial = model.radial_embedding
        transform = getattr(radial, "distance_transform", None)
        radial_names = {"BesselBasis": "bessel", "GaussianBasis": "gaussian", "ChebychevBasis": "chebyshev"}
        interactions = list(model.interactions)
        activation_scale = float(getattr(act, "cst", 0.0) or 0.0)
        if activation_scale == 0.0:  # e3nn's normalize2mom of the radial MLP's SiLU
            from e3nn.math import normalize2mom

            activation_scale = float(normalize2mom(torch.nn.functional.silu).cst)
        sh_irreps = [(ir.l, ir.p) for _, ir in model.spherical_harmonics.irreps_out]
        hyper = {
            "model_class": name,
            "r_max": float(model.r_max),
            "num_bessel": int(radial.out_dim),
            "num_polynomial_cutoff": int(radial.cutoff_fn.p),
            "max_ell": int(model.spherical_harmonics._lmax),
            "num_interactions": int(model.num_interactions),
            "hidden_irreps": str(model.products[0].linear.irreps_out),
            "mlp_irreps": str(getattr(readout, "hidden_irreps", "1x0e")),
            "correlation": [len(p.symmetric_contractions.contractions[0].weights) + 1 for p in model.products],
            "interaction_classes": [type(i).__name__ for i in interactions],
            "readout_classes": [type(r).__name__ for r in model.readouts],
            "radial_mlp": [int(w) for w in interactions[0].radial_MLP],
            "avg_num_neighbors": [float(i.avg_num_neighbors) for i in interactions],
            "atomic_numbers": [int(z) for z in model.atomic_numbers.tolist()],
            "heads": [str(h) for h in getattr(model, "heads", ["Default"])],
            "gate": gate,
            "radial_type": radial_names.get(type(radial.bessel_fn).__name__, type(radial.bessel_fn).__name__),
            "distance_transform": "None" if transform is None else type(transform).__name__.replace("Transform", ""),
            "pair_repulsion": hasattr(model, "pair_repulsion_fn"),
            "activation_scale": activation_scale,
            "unsupported": {
                "use_so3 (spherical harmonics without parity)": any(p != (-1) ** lv for lv, p in sh_irreps),
                "use_agnostic_product": bool(getattr(model, "use_agnostic_product", False)),
                "use_last_readout_only": bool(getattr(model, "use_last_readout_only", False)),
                "edge_irreps": getattr(model, "edge_irreps", None) is not None,
                "embedding_specs (extra embeddings)": hasattr(model, "joint_embedding"),
                "apply_cutoff=False": not bool(getattr(model, "apply_cutoff", True)),
                "cuequivariance layout": bool(getattr(getattr(model, "cueq_config", None), "enabled", False)),
            },
        }
    except AttributeError as exc:
        raise MaceImportError(f"the {name} object lacks a part of mace-torch's MACE ({exc})") from exc
    return hyper


def read_mace_model(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, Any]]:
    """Load a mace-torch model file into plain data.

    Args:
      path: a file written by mace-torch (``torch.save`` of a ``MACE`` / ``ScaleShiftMACE``, e.g. a released
        ``*.model`` file).

    Returns:
      ``(state_dict, hyperparameters, source)``: NumPy arrays by mace-torch's names; the hyperparameters of
      :data:`~equiforce.interop.mace.HYPERPARAMETER_KEYS`; the source description (file name, sha256, size,
      mace-torch, torch and e3nn versions).

    Raises:
      ImportError: torch or mace-torch is not installed.
      FileNotFoundError: no such file.
      MaceImportError: the file is not a mace-torch model, or not one this importer supports; a
        TorchScript-compiled model (``*_compiled.model``: give the uncompiled file), told from the file
        itself before torch is needed.
    """
    path = Path(path)
    if path.is_file():
        _refuse_torchscript(path)
    torch, mace_module = _modules()
    if not path.is_file():
        raise FileNotFoundError(f"no mace-torch model file at {path}")
    try:
        with _quiet():
            model = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises several types for a file that is not a torch pickle
        raise MaceImportError(f"{path} is not a mace-torch model file ({type(exc).__name__}: {exc})") from exc
    if isinstance(model, dict):
        raise MaceImportError(
            f"{path} holds a dictionary (a checkpoint or state dict), not a model object: export the model with "
            "mace-torch first (its `*.model` file, `torch.save(model, path)`)"
        )
    hyper = hyperparameters_of(model)
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    import e3nn

    source = {
        "file": path.name,
        "sha256": _sha256(path),
        "bytes": path.stat().st_size,
        "mace_torch_version": getattr(mace_module, "__version__", "unknown"),
        "torch_version": torch.__version__,
        "e3nn_version": e3nn.__version__,
        "model_dtype": str(next(iter(model.parameters())).dtype).replace("torch.", ""),
    }
    return state, hyper, source


def import_mace(
    model_file: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "float64", head: str | None = None
) -> tuple[Path, dict[str, Any]]:
    """Convert a mace-torch model file into an equiforce model file (``equiforce import mace``).

    Args:
      model_file: the mace-torch model file.
      out: the equiforce model file to write (conventionally ``*.eqf``; written atomically).
      dtype: ``"float64"`` or ``"float32"``: the precision the imported potential computes in.
      head: the head of a multi-head model (default: the only head or the one called "default", as
        mace-torch's calculator).

    Returns:
      ``(path, summary)``: the file written and a summary (source, head, parameters, seconds, bytes).

    Raises:
      ImportError, FileNotFoundError, MaceImportError: as :func:`read_mace_model` and
      :func:`~equiforce.interop.mace.convert_mace`.
    """
    import jax

    from equiforce.potentials.model_io import save_model

    start = time.perf_counter()
    state, hyper, source = read_mace_model(model_file)
    potential, params = convert_mace(state, hyper, head=head, dtype=dtype)
    chosen = (
        head
        if head is not None
        else next(h for h in hyper["heads"] if len(hyper["heads"]) == 1 or h.lower() == "default")
    )
    n_params = int(sum(np.size(x) for x in jax.tree.leaves(params)))
    metadata = {
        "source": {**source, "format": "mace-torch", "head": chosen, "hyperparameters": hyper},
        "lineage": [{"kind": "import", "from": f"mace-torch {source['mace_torch_version']}", "file": source["file"]}],
    }
    path = save_model(out, potential, params, metadata)
    summary = {
        **source,
        "head": chosen,
        "parameters": n_params,
        "seconds": time.perf_counter() - start,
        "out_bytes": path.stat().st_size,
        "species": list(potential.species),
        "r_max": potential.r_max,
    }
    return path, summary
