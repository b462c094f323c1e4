"""The documentation's generated parts cannot drift: every config field is described, every included script is run.

The site itself is built (``mkdocs build --strict``) and its scripts executed (``docs/run_tutorials.py``) by
the second CI target in ``.ci/run``; these checks need neither mkdocs nor a run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest

from equiforce.config_reference import (
    attribute_docs,
    config_reference_markdown,
    dataclass_table,
    undocumented_fields,
)
from equiforce.md.engine import MDConfig
from equiforce.potentials.registry import MODELS
from equiforce.training import config as train_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG_CLASSES = [
    train_config.TrainConfig,
    train_config.DataConfig,
    train_config.ModelSection,
    train_config.LossConfig,
    train_config.OptimConfig,
    train_config.MDCheckConfig,
    train_config.FinetuneConfig,
    train_config.ParallelConfig,
    MDConfig,
    *MODELS.values(),
]


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=lambda c: c.__name__)
def test_every_config_field_is_described(cls):
    assert undocumented_fields(cls) == []
    docs = attribute_docs(cls)
    assert not set(docs) - {f.name for f in dataclasses.fields(cls)}, "a described field that does not exist"


def test_reference_lists_every_key_with_its_default():
    md = config_reference_markdown()
    for f in dataclasses.fields(train_config.OptimConfig):
        assert f"| `optim.{f.name}` |" in md
    assert "| `md_check.supercell` | tuple[int, ...] \\| None | `null` |" in md
    assert "| `loss.stress_weight` | float | `0.0` |" in md
    for name, cls in MODELS.items():
        assert f"`{name}` ({cls.__name__})" in md
    assert '| `ensemble` | str | `"nve"` |' in md
    assert ":func:" not in md and "``" not in md  # reST converted to Markdown


def test_reference_lists_the_allowed_range_of_numeric_keys():
    """The "allowed" column shows the range TrainConfig enforces (issue 27): written out here, not read back."""
    md = config_reference_markdown()
    for row in (
        "| `optim.plateau_factor` | float | `0.8` | in (0, 1) |",
        "| `optim.max_epochs` | int | `100` | >= 1 |",
        "| `loss.energy_weight` | float | `1.0` | >= 0 |",
        "| `md_check.supercell` | tuple[int, ...] \\| None | `null` | each >= 1 |",
        "| `data.valid_fraction` | float | `0.05` | in (0, 1) (when `data.valid` is not given) |",
        "| `seed` | int | `0` | in [0, 2^63 - 1] |",
        '| `optim.optimizer` | str | `"amsgrad"` |  |',  # not numeric: no range
    ):
        assert row in md, row
    assert "| key | type | default | description |" in md  # the model and MD tables declare no ranges: no column


def test_attribute_parser_handles_continuations_and_shared_entries():
    @dataclasses.dataclass
    class Example:
        """Prose.

        Attributes:
          a, b: shared text
            continued here.
          c: alone.

        More prose after the section.
        """

        a: int = 1
        b: float = 2.0
        c: str | None = None

    docs = attribute_docs(Example)
    assert docs == {"a": "shared text continued here.", "b": "shared text continued here.", "c": "alone."}
    table = dataclass_table(Example, prefix="x.")
    assert "| `x.c` | str \\| None | `null` | alone. |" in table


def test_every_script_a_page_includes_is_run_by_the_tutorial_runner():
    spec = importlib.util.spec_from_file_location("run_tutorials", ROOT / "docs" / "run_tutorials.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    runs = runner.tutorial_runs(Path("/tmp/x"))
    names = {name for name, _ in runs}
    assert runner.check_pages(names) == []
    included = set().union(*runner.included_scripts().values())
    assert included == names  # every script the runner runs is shown on a page, and every shown one runs
    for name in names:
        assert (ROOT / "examples" / f"{name}.py").is_file()
    # and every tutorial page in the navigation exists
    nav = re.findall(r":\s+([\w/-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), flags=re.M)
    assert len(nav) >= 15
    for page in nav:
        assert (ROOT / "docs" / page).is_file(), page
