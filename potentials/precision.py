"""JAX's 64-bit types for a float64 model: switched on where that is safe, a clear error where it is not.

JAX runs with 32-bit types unless ``jax_enable_x64`` is set, and a float64 potential would then silently compute
in float32. The switch is global and meant for start-up: arrays made before it stay 32-bit, and every array made
after it defaults to 64 bits, so flipping it under a program that already holds JAX arrays changes that program's
numbers. :func:`enable_x64` therefore switches it on only while this process holds no JAX array of its own (the
constant arrays jax-md builds when it is imported do not count: they are the library's, and the same in every
process), and otherwise raises the clear error of :meth:`~equiforce.potentials.Potential.check_precision`, saying
what exists and what to do. A float64 model file thus just works in a fresh program (the ASE calculator,
``run_md``, the command line) without the user setting anything.
"""

from __future__ import annotations

import sys
import types

import jax

__all__ = ["enable_x64", "user_arrays"]

#: libraries that make JAX arrays when imported (jax-md: the example shapes of ``jax_md.rigid_body``)
_LIBRARIES_WITH_CONSTANTS = ("jax_md",)


def _library_constants() -> set[int]:
    """``id`` of every JAX array held at module level (directly or in a pytree) by the modules of
    :data:`_LIBRARIES_WITH_CONSTANTS`."""
    ids: set[int] = set()
    for name, module in list(sys.modules.items()):
        if module is None or name.split(".")[0] not in _LIBRARIES_WITH_CONSTANTS:
            continue
        for value in list(vars(module).values()):
            if isinstance(value, type | types.ModuleType | types.FunctionType | types.BuiltinFunctionType):
                continue
            try:
                leaves = jax.tree.leaves(value)
            except Exception:  # an object jax cannot flatten holds no array of interest
                continue
            ids.update(id(leaf) for leaf in leaves if isinstance(leaf, jax.Array))
    return ids


def _backend_started() -> bool:
    """Whether JAX has started its backends (no array can exist before); True where JAX does not say."""
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # pragma: no cover - a JAX without the probe: ask live_arrays
        return True


def user_arrays() -> list[jax.Array]:
    """The JAX arrays alive in this process, less the constants libraries make when imported.

    Returns:
      A list of ``jax.Array`` (empty before JAX's backends start: nothing is started here to find out).
    """
    if not _backend_started():
        return []
    known = _library_constants()
    return [a for a in jax.live_arrays() if id(a) not in known]


def enable_x64(reason: str) -> None:
    """Switch on JAX's 64-bit types (``jax_enable_x64``) for ``reason`` if they are off and that is safe.

    Safe means that this process holds no JAX array yet (:func:`user_arrays` is empty): nothing made in 32 bits
    can then mix with what follows. Nothing happens when the types are on already.

    Args:
      reason: what needs them, the start of the error message (e.g. ``"model.eqf holds a float64 potential"``).

    Raises:
      RuntimeError: the types are off and JAX arrays exist already; the message names how many and their
        dtypes and shapes, and says to set ``jax_enable_x64`` at start-up (or ``JAX_ENABLE_X64=1``) or to use a
        float32 model.
    """
    if jax.config.jax_enable_x64:
        return
    arrays = user_arrays()
    if arrays:
        kinds = sorted({f"{a.dtype}{list(a.shape)}" for a in arrays[:20]})
        raise RuntimeError(
            f"{reason}, which needs JAX's 64-bit types; they are off (every array would silently become float32), "
            f"and this program already holds {len(arrays)} JAX array(s) ({', '.join(kinds[:3])}"
            f"{', ...' if len(kinds) > 3 else ''}), so they cannot be switched on safely now: call "
            "jax.config.update('jax_enable_x64', True) at start-up, before any JAX array is made (or set "
            "JAX_ENABLE_X64=1 in the environment), or use a float32 model"
        )
    jax.config.update("jax_enable_x64", True)
