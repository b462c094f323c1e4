"""The configuration reference, generated from the config classes themselves (for the documentation site).

Every key of a training YAML file (:class:`~equiforce.training.config.TrainConfig` and its sections),
every model's hyperparameters (the registered :class:`~equiforce.potentials.registry.ModelConfig` classes)
every MD setting (:class:`~equiforce.md.engine.MDConfig`) and every key of an active-learning file
(:class:`~equiforce.learning.config.LearnConfig`) is listed with its type, its default and the
description from the class's ``Attributes:`` docstring section. The documentation build calls
:func:`config_reference_markdown`, and a test checks that every field has a description, so the reference
cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any

__all__ = ["attribute_docs", "config_reference_markdown", "dataclass_table", "undocumented_fields"]


def _split_docstring(doc: str) -> tuple[str, str]:
    """``(prose without the Attributes section, the Attributes section's body)``."""
    lines = (doc or "").expandtabs().splitlines()
    if not lines:
        return "", ""
    # dedent everything after the first line (the usual docstring layout)
    rest = [line for line in lines[1:] if line.strip()]
    indent = min((len(line) - len(line.lstrip()) for line in rest), default=0)
    lines = [lines[0].strip()] + [line[indent:] for line in lines[1:]]
    prose, attrs, in_attrs, attr_indent = [], [], False, 0
    for line in lines:
        if line.strip() == "Attributes:":
            in_attrs, attr_indent = True, len(line) - len(line.lstrip())
            continue
        if in_attrs and line.strip() and len(line) - len(line.lstrip()) <= attr_indent:
            in_attrs = False  # the section ended: back to prose (or another section)
        (attrs if in_attrs else prose).append(line)
    return "\n".join(prose).strip(), "\n".join(attrs)


def attribute_docs(cls: type) -> dict[str, str]:
    """Field name → description from the class docstring's Google-style ``Attributes:`` section.

    An entry ``a, b: text`` documents both ``a`` and ``b``; continuation lines are joined with spaces.
    """
    _, body = _split_docstring(cls.__doc__ or "")
    entries: dict[str, str] = {}
    current: list[str] = []
    base = None
    for line in body.splitlines():
        if not line.strip():
            continue
        ind = len(line) - len(line.lstrip())
        if base is None:
            base = ind
        m = re.match(r"\s*([A-Za-z_][\w, ]*):\s*(.*)$", line)
        if ind == base and m:
            current = [n.strip() for n in m.group(1).split(",")]
            for name in current:
                entries[name] = m.group(2).strip()
        elif current:
            for name in current:
                entries[name] = (entries[name] + " " + line.strip()).strip()
    return entries


def _rst_to_md(text: str) -> str:
    """The reST of our docstrings as Markdown: ``code`` → `code`, :role:`~a.b` → `b`, :role:`a.b` → `a.b`."""
    text = re.sub(r":\w+:`~[\w.]*?\.?(\w+)`", r"`\1`", text)
    text = re.sub(r":\w+:`([^`]+)`", r"`\1`", text)
    text = re.sub(r"``([^`]+)``", r"`\1`", text)
    return text


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is not None:
        args = typing.get_args(hint)
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if hint is type(None):
        return "None"
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):
            return "(section)"
    else:
        return "(required)"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        value = list(value)
    return f"`{value!r}`" if not isinstance(value, str) else f'`"{value}"`'


def undocumented_fields(cls: type) -> list[str]:
    """The dataclass fields of ``cls`` without a description in its ``Attributes:`` section."""
    docs = attribute_docs(cls)
    return [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]


def _allowed(f: dataclasses.Field, hint: Any, prefix: str) -> str:
    """The field's declared range (``metadata["range"]``, see :class:`~equiforce.training.config.Range`) as
    table text (``each`` for the entries of a tuple), with the field that switches it off
    (``metadata["unless"]``); empty when none is declared."""
    allowed = f.metadata.get("range")
    if allowed is None:
        return ""
    unless = f.metadata.get("unless")
    each = "each " if "tuple" in _type_name(hint) else ""
    return f"{each}{allowed}" + (f" (when `{prefix}{unless}` is not given)" if unless else "")


def dataclass_table(cls: type, *, prefix: str = "") -> str:
    """A Markdown table of ``cls``'s fields: key (with ``prefix``), type, default, description; and, when a
    field of ``cls`` declares the range of its values (``metadata["range"]``), an "allowed" column after the
    default (what :class:`~equiforce.training.config.TrainConfig` enforces)."""
    hints = typing.get_type_hints(cls)
    docs = attribute_docs(cls)
    ranges = any("range" in f.metadata for f in dataclasses.fields(cls))
    head = ["key", "type", "default", *(["allowed"] if ranges else []), "description"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in dataclasses.fields(cls):
        desc = _rst_to_md(docs.get(f.name, ""))
        type_name = _type_name(hints[f.name])
        allowed = [_allowed(f, hints[f.name], prefix)] if ranges else []
        cells = [f"`{prefix}{f.name}`", type_name, _default(f), *allowed, desc]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


def _section(title: str, cls: type, prefix: str, level: str = "###") -> list[str]:
    prose, _ = _split_docstring(cls.__doc__ or "")
    out = [f"{level} {title}", ""]
    if prose:
        out += [_rst_to_md(prose), ""]
    out += [dataclass_table(cls, prefix=prefix), ""]
    return out


def config_reference_markdown() -> str:
    """The whole configuration reference as Markdown (training sections, model hyperparameters, MD)."""
    from equiforce.md.engine import MDConfig
    from equiforce.potentials.registry import MODELS
    from equiforce.training.config import TrainConfig

    out = [
        "## Training configuration",
        "",
        "The keys of a training YAML file (`equiforce train CONFIG.yaml`, `load_config`). Every key can also be "
        "given on the command line as `section.key=value` (a YAML value: `optim.learning_rate=1e-3`, "
        "`md_check.supercell=[2, 2, 2]`). Unknown keys, wrong types, NaN/inf and numbers outside the "
        '"allowed" range are a `ConfigError` that names the key (and, for a number out of range, the value and '
        "the range).",
        "",
    ]
    out += _config_sections(TrainConfig)
    out += [
        "## Model hyperparameters",
        "",
        "The keys of `model.hyperparameters` for each `model.name`; the model file stores them with the weights.",
        "",
    ]
    for name in sorted(MODELS):
        out += _section(f"`{name}` ({MODELS[name].__name__})", MODELS[name], "")
    out += [
        "## Molecular dynamics",
        "",
        "The settings of one MD run: `MDConfig` (the keyword arguments of `run_md` and the flags of "
        "`equiforce md` map onto them).",
        "",
    ]
    out += _section("MDConfig", MDConfig, "")
    out += _learning_sections()
    return "\n".join(out)


def _config_sections(cls: type) -> list[str]:
    """The reference of a config dataclass: its top-level keys, then one section per nested dataclass."""
    out = _section("Top level", cls, "")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        sub = hints[f.name]
        if dataclasses.is_dataclass(sub):
            out += _section(f"`{f.name}` ({sub.__name__})", sub, f"{f.name}.")
    return out


def _learning_sections() -> list[str]:
    """The keys of an active-learning YAML file (``equiforce learn``)."""
    from equiforce.learning.config import Condition, LearnConfig

    out = [
        "## Active learning",
        "",
        "The keys of an active-learning YAML file (`equiforce learn CONFIG.yaml`, `run_active_learning`; see "
        "the active-learning page). `training.config` is a training configuration (above) without `output_dir`, "
        "`data.train`, `data.valid`, `data.test` and `model.init_from`, which the loop sets.",
        "",
    ]
    out += _config_sections(LearnConfig)
    out += _section("`md.conditions[]` (Condition)", Condition, "md.conditions[].")
    return out
