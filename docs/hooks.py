"""MkDocs hooks of the documentation site (``mkdocs.yml``: ``hooks: [docs/hooks.py]``).

* The installed layout of the package for the API reference: ``equiforce.data``, ``equiforce.potentials`` and
  ``equiforce.md`` live in ``data/``, ``potentials/`` and ``md/`` at the repository root (setuptools
  ``package-dir``), which griffe cannot follow; ``build/apidocs/equiforce`` mirrors the installed package with
  symbolic links, made when this module is loaded (before mkdocstrings reads its ``paths``).
* Generated pages: ``<!-- equiforce:config-reference -->`` becomes the configuration reference
  (:func:`equiforce.config_reference.config_reference_markdown`, from the config classes) and
  ``<!-- equiforce:cli-reference -->`` the ``--help`` of every command (from the argparse parser), so
  neither can drift from the code.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "build" / "apidocs" / "equiforce"


def _mirror_package() -> None:
    if API.exists():
        shutil.rmtree(API)
    API.mkdir(parents=True)
    for entry in (ROOT / "src" / "equiforce").iterdir():
        if entry.name != "__pycache__":
            os.symlink(entry, API / entry.name)
    for name in ("data", "potentials", "md"):
        os.symlink(ROOT / name, API / name)


_mirror_package()


def _cli_reference() -> str:
    from equiforce.cli import build_parser

    parser = build_parser()
    out = [
        "Every command and its flags, as `equiforce COMMAND --help` prints them (flags may come anywhere, also "
        "between positionals).",
        "",
    ]

    def walk(p: argparse.ArgumentParser, name: str) -> None:
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if name:
            out.extend([f"## `{name}`", "", "```text", p.format_help().rstrip(), "```", ""])
        for action in subs:
            for sub_name, sub in action.choices.items():
                walk(sub, f"{name} {sub_name}".strip())

    walk(parser, "")
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if "<!-- equiforce:config-reference -->" in markdown:
        from equiforce.config_reference import config_reference_markdown

        markdown = markdown.replace("<!-- equiforce:config-reference -->", config_reference_markdown())
    if "<!-- equiforce:cli-reference -->" in markdown:
        markdown = markdown.replace("<!-- equiforce:cli-reference -->", _cli_reference())
    return markdown
