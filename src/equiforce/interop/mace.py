"""Convert a mace-torch MACE model into an equiforce potential: the torch-free core.

The input is plain data: mace-torch's ``state_dict`` as NumPy arrays and a dictionary of its hyperparameters
(:data:`HYPERPARAMETER_KEYS`; :func:`equiforce.interop.mace_torch.read_mace_model` produces both from a model
file, and the tests keep a committed fixture of both). The output is an ordinary
:class:`~equiforce.potentials.potential.Potential` of the ``mace_compat`` model
(:class:`~equiforce.potentials.mace_compat.MACECompatConfig`) with its parameters: it runs in MD, the ASE
calculator, evaluation and training with no MACE-specific code, and computes the same energy as mace-torch
(to floating-point rounding; tested in ``tests/interop``).

The weight mapping, module by module (e3nn-torch layouts: a flat weight vector per layer, one block per
instruction, in e3nn's instruction order):

* ``o3.Linear``: the block of input irrep i and output irrep o is ``[mul_in, mul_out]``; e3nn divides by
  sqrt(Σ mul_in over the inputs of o) at run time, which is folded into the weights here;
* the species "skip" ``FullyConnectedTensorProduct(x, one-hot)``: blocks ``[mul_in, num_elements, mul_out]``,
  coefficient 1/sqrt(mul_in · num_elements) (e3nn's "element" path normalisation times the Clebsch-Gordan
  coefficient of ``l ⊗ 0 → l``, 1/sqrt(2l+1), times e3nn's "component" factor sqrt(2l+1));
* the radial MLP (e3nn ``FullyConnectedNet``) is copied as is (:class:`~equiforce.potentials.mace_compat.TorchMLP`
  keeps e3nn-torch's parametrisation); its output columns are the tensor product's weights, path-major, in the
  order in which equiforce numbers the paths;
* the symmetric contraction: mace-torch's weights ``[num_elements, M, C]`` multiply its own coupling basis
  (the ``U_matrix_ν`` buffers). Both that basis and equiforce's (e3nn-jax's reduced symmetric basis) are bases
  of couplings of the symmetric products A_i1..A_iν; the importer writes mace-torch's couplings on the distinct
  monomials, solves for the matrix R with ``U_equiforce R = U_mace`` (least squares, and checks that the
  residual is rounding: otherwise the model is refused) and maps the weights ``W_equiforce = R W_mace``;
* readouts: the last layer's nonlinear readout keeps the chosen head's hidden units; scale, shift and E0s
  are those of the head.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping
from typing import Any

import e3nn_jax as e3nn
import numpy as np

from equiforce.potentials.mace import _symmetric_basis, natural_irreps, tensor_product_irreps
from equiforce.potentials.mace_compat import ZBL_COEFFICIENTS, MACECompatConfig
from equiforce.potentials.potential import Potential

__all__ = ["HYPERPARAMETER_KEYS", "MaceImportError", "convert_mace"]

#: keys of the hyperparameter dictionary :func:`convert_mace` reads (values: JSON types)
HYPERPARAMETER_KEYS = (
    "model_class",  # "MACE" or "ScaleShiftMACE"
    "r_max",  # Å
    "num_bessel",
    "num_polynomial_cutoff",
    "max_ell",
    "num_interactions",
    "hidden_irreps",  # e.g. "128x0e+128x1o"
    "mlp_irreps",  # the last readout's hidden irreps, all heads, e.g. "16x0e"
    "correlation",  # one per layer
    "interaction_classes",  # class name of each layer's interaction block
    "readout_classes",  # class name of each readout block
    "radial_mlp",  # hidden widths
    "avg_num_neighbors",  # one per layer
    "atomic_numbers",  # the model's element table, in its one-hot order
    "heads",
    "gate",  # the readout's activation: "silu"
    "radial_type",  # "bessel"
    "distance_transform",  # "None" or "Agnesi"
    "pair_repulsion",
    "activation_scale",  # e3nn-torch's normalize2mom(silu) constant
    "unsupported",  # {feature: value} of options the importer cannot convert, when set (checked: must be falsy)
)

_INTERACTIONS = {  # class name -> (residual, density normalisation)
    "RealAgnosticInteractionBlock": (False, False),
    "RealAgnosticResidualInteractionBlock": (True, False),
    "RealAgnosticDensityInteractionBlock": (False, True),
    "RealAgnosticDensityResidualInteractionBlock": (True, True),
}


class MaceImportError(ValueError):
    """A mace-torch model that the importer cannot convert exactly (the message names the unsupported part)."""


# ----------------------------------------------------------------------------------------------- layouts
def _irreps(text: str) -> list[tuple[int, e3nn.Irrep]]:
    return [(mul, ir) for mul, ir in e3nn.Irreps(text)]


def _linear_blocks(flat: np.ndarray, irreps_in: str, irreps_out: str, name: str) -> dict[int, list[np.ndarray]]:
    """e3nn-torch ``o3.Linear`` weight → ``{i_out: [block [mul_in, mul_out] / sqrt(fan_in), ...]}``.

    Blocks of one output in the order of the inputs (e3nn's instruction order: inputs outer, outputs inner).
    """
    ins, outs = _irreps(irreps_in), _irreps(irreps_out)
    instructions = [(i, o) for i, (_, a) in enumerate(ins) for o, (_, b) in enumerate(outs) if a == b]
    size = sum(ins[i][0] * outs[o][0] for i, o in instructions)
    flat = np.asarray(flat, np.float64).reshape(-1)
    if flat.size != size:
        raise MaceImportError(
            f"{name}: {flat.size} weights, expected {size} for o3.Linear({irreps_in} -> {irreps_out})"
        )
    fan_in = {o: sum(ins[i][0] for i, oo in instructions if oo == o) for _, o in instructions}
    blocks: dict[int, list[np.ndarray]] = {o: [] for o in range(len(outs))}
    start = 0
    for i, o in instructions:
        n = ins[i][0] * outs[o][0]
        blocks[o].append(flat[start : start + n].reshape(ins[i][0], outs[o][0]) / math.sqrt(fan_in[o]))
        start += n
    return blocks


def _channel_linear(flat: np.ndarray, irreps_in: str, irreps_out: str, name: str) -> dict[str, np.ndarray]:
    """``ChannelLinear`` parameters ``{w_<ir>: [P, C_in, C_out]}`` of an e3nn-torch ``o3.Linear``."""
    blocks = _linear_blocks(flat, irreps_in, irreps_out, name)
    out = {}
    for o, (_, ir) in enumerate(_irreps(irreps_out)):
        if blocks[o]:
            out[f"w_{ir}"] = np.stack(blocks[o])
    return out


def _species_linear(
    flat: np.ndarray, irreps_in: str, num_elements: int, irreps_out: str, name: str
) -> dict[str, np.ndarray]:
    """``SpeciesChannelLinear`` parameters ``{w_<ir>: [S, P, C_in, C_out]}`` of mace-torch's ``skip_tp``.

    ``FullyConnectedTensorProduct(irreps_in, "Sx0e", irreps_out)``: instructions (i_in, 0, i_out) for equal
    irreps, blocks ``[mul_in, S, mul_out]``, coefficient 1/sqrt(Σ mul_in · S) per output.
    """
    ins, outs = _irreps(irreps_in), _irreps(irreps_out)
    instructions = [(i, o) for i, (_, a) in enumerate(ins) for o, (_, b) in enumerate(outs) if a == b]
    size = sum(ins[i][0] * num_elements * outs[o][0] for i, o in instructions)
    flat = np.asarray(flat, np.float64).reshape(-1)
    if flat.size != size:
        raise MaceImportError(f"{name}: {flat.size} weights, expected {size} for the species tensor product")
    fan_in = {o: sum(ins[i][0] * num_elements for i, oo in instructions if oo == o) for _, o in instructions}
    per_out: dict[int, list[np.ndarray]] = {o: [] for o in range(len(outs))}
    start = 0
    for i, o in instructions:
        n = ins[i][0] * num_elements * outs[o][0]
        w = flat[start : start + n].reshape(ins[i][0], num_elements, outs[o][0]) / math.sqrt(fan_in[o])
        per_out[o].append(np.transpose(w, (1, 0, 2)))  # [S, C_in, C_out]
        start += n
    return {f"w_{ir}": np.stack(per_out[o], axis=1) for o, (_, ir) in enumerate(outs) if per_out[o]}


def _monomial_coefficients(u: np.ndarray, monomials: np.ndarray, nu: int) -> np.ndarray:
    """mace-torch coupling tensor ``U [(2L+1,) d..d (ν times), M]`` → coefficients on sorted monomials.

    Returns ``[T, M, 2L+1]``: for each sorted index tuple t, Σ over the distinct permutations p of t of U[.., p, k]
    (the symmetric product A_i1..A_iν is the same for every permutation).
    """
    if u.ndim == nu + 1:  # L = 0: no leading component axis
        u = u[None]
    u = np.moveaxis(u, 0, -1)  # [d..d, M, 2L+1]
    out = np.zeros((len(monomials), u.shape[-2], u.shape[-1]))
    for row, t in enumerate(monomials):
        for p in set(itertools.permutations(tuple(int(i) for i in t))):
            out[row] += u[p]
    return out


def _all_sorted_tuples(d: int, nu: int) -> np.ndarray:
    return np.array(list(itertools.combinations_with_replacement(range(d), nu)), np.int64).reshape(-1, nu)


def _contraction_params(
    state: Mapping[str, np.ndarray],
    prefix: str,
    irreps_a: str,
    irreps_out: str,
    correlation: int,
    perm: np.ndarray,
) -> dict[str, np.ndarray]:
    """``SymmetricContraction`` weights ``{w<ν>_<ir>: [S, M_eqf, C]}`` from one mace-torch ``SymmetricContraction``."""
    basis = _symmetric_basis(str(e3nn.Irreps(irreps_a)), str(e3nn.Irreps(irreps_out)), correlation)
    d = e3nn.Irreps(irreps_a).dim
    params: dict[str, np.ndarray] = {}
    for k, (_, ir) in enumerate(e3nn.Irreps(irreps_out)):
        head = f"{prefix}.contractions.{k}"
        for nu in range(1, correlation + 1):
            u_key = f"{head}.U_matrix_{nu}"
            w_key = f"{head}.weights_max" if nu == correlation else f"{head}.weights.{correlation - 1 - nu}"
            if u_key not in state or w_key not in state:
                raise MaceImportError(f"missing {u_key if u_key not in state else w_key} in the state dict")
            u = np.asarray(state[u_key], np.float64)
            w = np.asarray(state[w_key], np.float64)[perm]  # [S, M_mace, C]
            tol = 1e-5 if state[u_key].dtype == np.float32 else 1e-10
            scale = max(float(np.abs(u).max()), 1.0)
            all_tuples = _all_sorted_tuples(d, nu)
            everything = _monomial_coefficients(u, all_tuples, nu)  # [T_all, M, 2L+1]
            key = (nu, str(ir))
            if key not in basis.u:
                if np.abs(everything).max() > tol * scale and np.any(w):
                    raise MaceImportError(f"{head}: couplings of order {nu} to {ir} that equiforce's basis lacks")
                continue
            index = {tuple(int(i) for i in t): row for row, t in enumerate(all_tuples)}
            kept = np.array([index[tuple(int(i) for i in t)] for t in basis.monomials[nu - 1]], np.int64)
            dropped = np.setdiff1d(np.arange(len(everything)), kept)
            if dropped.size and np.abs(everything[dropped]).max() > tol * scale:
                raise MaceImportError(f"{head}: order-{nu} couplings on monomials outside equiforce's basis")
            target = everything[kept]  # [T, M_mace, 2L+1]
            ours = basis.u[key]  # [T, M_eqf, 2L+1]
            a = np.moveaxis(ours, 1, -1).reshape(-1, ours.shape[1])  # [(T, m), M_eqf]
            b = np.moveaxis(target, 1, -1).reshape(-1, target.shape[1])  # [(T, m), M_mace]
            r, *_ = np.linalg.lstsq(a, b, rcond=None)
            residual = np.abs(a @ r - b).max() if b.size else 0.0
            if residual > tol * scale:
                raise MaceImportError(
                    f"{head}: mace-torch's order-{nu} couplings to {ir} are not in the span of equiforce's basis "
                    f"(residual {residual:.2e})"
                )
            params[f"w{nu}_{ir}"] = np.einsum("em,smc->sec", r, w)
    return params


# ----------------------------------------------------------------------------------------------- checks
def _check_supported(h: Mapping[str, Any]) -> None:
    missing = [k for k in HYPERPARAMETER_KEYS if k not in h and k != "unsupported"]
    if missing:
        raise MaceImportError(f"hyperparameters {missing} are missing")
    if h["model_class"] not in ("MACE", "ScaleShiftMACE"):
        raise MaceImportError(
            f"model class {h['model_class']!r} is not supported (only mace-torch's MACE and ScaleShiftMACE)"
        )
    unsupported = {k: v for k, v in (h.get("unsupported") or {}).items() if v}
    if unsupported:
        raise MaceImportError(f"unsupported mace-torch options: {unsupported}")
    if h["radial_type"] != "bessel":
        raise MaceImportError(f"radial basis {h['radial_type']!r} is not supported (only 'bessel')")
    if str(h["distance_transform"]) not in ("None", "Agnesi"):
        raise MaceImportError(f"distance transform {h['distance_transform']!r} is not supported (None, Agnesi)")
    if h["gate"] != "silu":
        raise MaceImportError(f"readout activation {h['gate']!r} is not supported (only silu)")
    classes = list(h["interaction_classes"])
    for name in classes:
        if name not in _INTERACTIONS:
            raise MaceImportError(f"interaction block {name!r} is not supported (supported: {sorted(_INTERACTIONS)})")
    if any(not _INTERACTIONS[name][0] for name in classes[1:]):
        raise MaceImportError("a non-residual interaction block after the first layer is not supported")
    if len({_INTERACTIONS[name][1] for name in classes}) > 1:
        raise MaceImportError("mixing density-normalised and plain interaction blocks is not supported")
    readouts = list(h["readout_classes"])
    expected = ["LinearReadoutBlock"] * (h["num_interactions"] - 1) + ["NonLinearReadoutBlock"]
    if readouts != expected:
        raise MaceImportError(f"readout blocks {readouts} are not supported (expected {expected})")


def _hidden(h: Mapping[str, Any]) -> tuple[int, int]:
    """``(num_features, hidden_l_max)`` of ``hidden_irreps`` (equal multiplicities, 0e + 1o + 2e + ...)."""
    irreps = _irreps(str(h["hidden_irreps"]))
    muls = {mul for mul, _ in irreps}
    natural = [ir for _, ir in natural_irreps(len(irreps) - 1)]
    if len(muls) != 1 or [ir for _, ir in irreps] != natural:
        raise MaceImportError(
            f"hidden_irreps {h['hidden_irreps']} is not supported (equal multiplicities of 0e + 1o + 2e + ...)"
        )
    return muls.pop(), len(irreps) - 1


# ----------------------------------------------------------------------------------------------- convert
def convert_mace(
    state_dict: Mapping[str, np.ndarray],
    hyperparameters: Mapping[str, Any],
    *,
    head: str | None = None,
    dtype: str = "float64",
) -> tuple[Potential, dict[str, Any]]:
    """An equiforce potential computing what a mace-torch ``MACE`` / ``ScaleShiftMACE`` computes.

    Args:
      state_dict: mace-torch's ``model.state_dict()`` as NumPy arrays (parameters and buffers, float32 or
        float64; keys as mace-torch names them).
      hyperparameters: the model's hyperparameters, keys :data:`HYPERPARAMETER_KEYS`.
      head: the head of a multi-head model to import (default, as mace-torch's calculator: the only head,
        or the one called "default"; a model with several heads and none called so needs it).
      dtype: ``"float64"`` or ``"float32"``, the equiforce potential's precision.

    Returns:
      ``(potential, params)``: a :class:`~equiforce.potentials.potential.Potential` of the ``mace_compat``
      model and its parameter tree (NumPy arrays in ``dtype``).

    Raises:
      MaceImportError: an unsupported architecture or option (named), an unknown or missing head, a state
        dict that does not match the hyperparameters.
    """
    h = dict(hyperparameters)
    _check_supported(h)
    if dtype not in ("float32", "float64"):
        raise MaceImportError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    state = {k: np.asarray(v) for k, v in state_dict.items()}
    heads = list(h["heads"])
    if head is None:  # as mace-torch's calculator: the only head, or the one called "default"
        named_default = [name for name in heads if name.lower() == "default"]
        if len(heads) > 1 and not named_default:
            raise MaceImportError(f"the model has several heads {heads}: choose one (--head / head=)")
        head = heads[0] if len(heads) == 1 else named_default[0]
    if head not in heads:
        raise MaceImportError(f"head {head!r} is not in the model's heads {heads}")
    hi, n_heads = heads.index(head), len(heads)

    z_mace = [int(z) for z in h["atomic_numbers"]]
    species = sorted(z_mace)
    perm = np.array([z_mace.index(z) for z in species])  # sorted species -> mace one-hot index
    s = len(species)
    channels, hidden_l_max = _hidden(h)
    n_layers = int(h["num_interactions"])
    correlation = [int(c) for c in h["correlation"]]
    l_max = int(h["max_ell"])
    classes = list(h["interaction_classes"])
    density = _INTERACTIONS[classes[0]][1]
    avg = [float(a) for a in h["avg_num_neighbors"]]
    mlp_total = _irreps(str(h["mlp_irreps"]))
    if len(mlp_total) != 1 or mlp_total[0][1] != e3nn.Irrep("0e") or mlp_total[0][0] % n_heads:
        raise MaceImportError(f"MLP_irreps {h['mlp_irreps']} is not supported (scalars, a multiple of the heads)")
    mlp_hidden = mlp_total[0][0] // n_heads

    def take(key: str) -> np.ndarray:
        if key not in state:
            raise MaceImportError(f"the state dict has no {key!r} (not a mace-torch MACE of this architecture?)")
        return np.asarray(state[key], np.float64)

    expected_bessel = np.pi / h["r_max"] * np.arange(1, h["num_bessel"] + 1)
    if "radial_embedding.bessel_fn.bessel_weights" in state:
        bessel = take("radial_embedding.bessel_fn.bessel_weights")
        if not np.allclose(bessel, expected_bessel, rtol=1e-6):
            raise MaceImportError("trained Bessel frequencies are not supported (mace-torch's default is fixed)")

    agnesi = (0.9183, 4.5791, 1.0805)
    radii: tuple[tuple[int, float], ...] = ()
    if str(h["distance_transform"]) == "Agnesi":
        prefix = "radial_embedding.distance_transform"
        agnesi = tuple(float(take(f"{prefix}.{k}")) for k in ("q", "p", "a"))
        table = take(f"{prefix}.covalent_radii")
        radii = tuple((z, float(table[z])) for z in species)
    zbl_a = (0.4543, 0.300)
    if h["pair_repulsion"]:
        zbl_a = (float(take("pair_repulsion_fn.a_prefactor")), float(take("pair_repulsion_fn.a_exp")))
        c = take("pair_repulsion_fn.c")
        if not np.allclose(c, [ck for ck, _ in ZBL_COEFFICIENTS], rtol=1e-6):
            raise MaceImportError(f"ZBL coefficients {c} differ from mace-torch's fixed ones")
        table = take("pair_repulsion_fn.covalent_radii")
        zbl_radii = tuple((z, float(table[z])) for z in species)
        if radii and not np.allclose([r for _, r in radii], [r for _, r in zbl_radii]):
            raise MaceImportError("the ZBL and Agnesi covalent radii differ")
        radii = zbl_radii

    config = MACECompatConfig(
        num_interactions=n_layers,
        num_features=channels,
        l_max=l_max,
        hidden_l_max=hidden_l_max if n_layers > 1 else 0,
        correlation=tuple(correlation),
        num_bessel=int(h["num_bessel"]),
        envelope_p=int(h["num_polynomial_cutoff"]),
        radial_mlp=tuple(int(w) for w in h["radial_mlp"]),
        readout_mlp_hidden=mlp_hidden,
        first_layer_residual=_INTERACTIONS[classes[0]][0],
        density_normalization=density,
        distance_transform="agnesi" if str(h["distance_transform"]) == "Agnesi" else "none",
        agnesi=agnesi,
        pair_repulsion=bool(h["pair_repulsion"]),
        zbl_a=zbl_a,
        covalent_radii=radii,
        activation_scale=float(h["activation_scale"]),
    )

    # -------------------------------------------------------------- parameters
    cx = f"{channels}x"
    hidden_full = "+".join(f"{cx}{ir}" for _, ir in natural_irreps(hidden_l_max))
    scalars = f"{cx}0e"
    a_irreps = "+".join(f"{cx}{ir}" for _, ir in natural_irreps(l_max))
    params: dict[str, Any] = {}
    emb = take("node_embedding.linear.weight").reshape(s, channels) / math.sqrt(s)
    params["embedding"] = emb[perm]
    irreps_in = scalars
    for t in range(n_layers):
        last = t == n_layers - 1
        irreps_out = scalars if last else hidden_full
        p = f"interactions.{t}"
        layer: dict[str, Any] = {}
        residual = t > 0 or config.first_layer_residual
        if residual:
            layer["skip"] = {
                k: v[perm]
                for k, v in _species_linear(
                    take(f"{p}.skip_tp.weight"), irreps_in, s, irreps_out, f"{p}.skip_tp"
                ).items()
            }
        layer["linear_up"] = _channel_linear(take(f"{p}.linear_up.weight"), irreps_in, irreps_in, f"{p}.linear_up")
        # the tensor product's output irreps as mace-torch sorts them: one C-channel block per path, in the order
        # equiforce numbers the paths (its irreps_mid regroups them: "Px0e + Px1o + ...")
        per_channel_in = "+".join(str(ir) for _, ir in _irreps(irreps_in))
        paths = e3nn.Irreps(tensor_product_irreps(per_channel_in, l_max))
        mid = "+".join(f"{cx}{ir}" for mul, ir in paths for _ in range(mul))
        layer["linear_down"] = _channel_linear(take(f"{p}.linear.weight"), mid, a_irreps, f"{p}.linear")
        if not density:  # fold this layer's avg_num_neighbors into the one the potential divides by
            layer["linear_down"] = {k: v * (avg[0] / avg[t]) for k, v in layer["linear_down"].items()}
        else:
            layer["density"] = {"layer0": take(f"{p}.density_fn.layer0.weight")}
        mlp_keys = sorted(
            (k for k in state if re.fullmatch(rf"{re.escape(p)}\.conv_tp_weights\.layer\d+\.weight", k)),
            key=lambda k: int(k.split(".layer")[1].split(".")[0]),
        )
        if len(mlp_keys) != len(config.radial_mlp) + 1:
            raise MaceImportError(
                f"{p}.conv_tp_weights has {len(mlp_keys)} layers, expected {len(config.radial_mlp) + 1}"
            )
        layer["radial_mlp"] = {f"layer{i}": take(k) for i, k in enumerate(mlp_keys)}
        if layer["radial_mlp"][f"layer{len(mlp_keys) - 1}"].shape[1] != paths.num_irreps * channels:
            raise MaceImportError(f"{p}.conv_tp_weights does not match the tensor product's {paths.num_irreps} paths")
        if not residual:
            layer["species_linear"] = {
                k: v[perm]
                for k, v in _species_linear(take(f"{p}.skip_tp.weight"), a_irreps, s, a_irreps, f"{p}.skip_tp").items()
            }
        per_channel_out = "+".join(str(ir) for _, ir in _irreps(irreps_out))
        layer["symmetric_contraction"] = _contraction_params(
            state,
            f"products.{t}.symmetric_contractions",
            str(natural_irreps(l_max)),
            per_channel_out,
            correlation[t],
            perm,
        )
        layer["linear_product"] = _channel_linear(
            take(f"products.{t}.linear.weight"), irreps_out, irreps_out, f"products.{t}.linear"
        )
        r = f"readouts.{t}"
        if last:
            w1 = take(f"{r}.linear_1.weight").reshape(channels, n_heads * mlp_hidden) / math.sqrt(channels)
            w2 = take(f"{r}.linear_2.weight").reshape(n_heads * mlp_hidden, n_heads) / math.sqrt(n_heads * mlp_hidden)
            block = slice(hi * mlp_hidden, (hi + 1) * mlp_hidden)
            layer["readout_hidden"] = {"kernel": w1[:, block]}
            layer["readout"] = {"kernel": w2[block, hi : hi + 1]}
        else:
            w = take(f"{r}.linear.weight")
            w = w.reshape(channels, n_heads) if w.size == channels * n_heads else None
            if w is None:
                raise MaceImportError(f"{r}.linear has an unexpected shape")
            layer["readout"] = {"kernel": w[:, hi : hi + 1] / math.sqrt(channels)}
        params[f"interaction_{t}"] = layer
        irreps_in = irreps_out

    # -------------------------------------------------------------- potential
    e0 = np.atleast_2d(take("atomic_energies_fn.atomic_energies"))  # [heads, S] (mace-torch: [S] for one head)
    if e0.shape[-1] != s:
        raise MaceImportError(f"atomic energies of shape {e0.shape} do not match {s} elements")
    e0 = e0[hi if e0.shape[0] > 1 else 0][perm]
    scale, shift = 1.0, 0.0
    if h["model_class"] == "ScaleShiftMACE":
        scales = np.atleast_1d(take("scale_shift.scale"))
        shifts = np.atleast_1d(take("scale_shift.shift"))
        scale = float(scales[hi if scales.size > 1 else 0])
        shift = float(shifts[hi if shifts.size > 1 else 0])
    potential = Potential(
        model=config,
        species=tuple(species),
        r_max=float(h["r_max"]),
        atomic_energies=tuple(float(e) for e in e0),
        scale=scale,
        shift=shift,
        avg_num_neighbours=avg[0],
        dtype=dtype,
    )
    np_dtype = np.float64 if dtype == "float64" else np.float32
    params = _cast({"params": params}, np_dtype)
    return potential, params


def _cast(tree: Any, dtype: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _cast(v, dtype) for k, v in tree.items()}
    return np.asarray(tree, dtype)
