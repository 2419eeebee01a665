"""`mergelab methods`: every merging method with its parameters, their defaults and what the paper uses.

Read from the method table (:data:`mergelab.methods.METHODS`) and the config dataclasses alone: a new method is
listed the moment it is registered. Each parameter's line is the first sentence of its ``Attributes`` entry in the
config's docstring, which states the paper's or the official scripts' value where it differs from a plain default;
methods with ``lam`` add the paper's lambda grid, searched on the validation split.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from typing import Any

import click


def attribute_docs(cls: type) -> dict[str, str]:
    """``{field: description}`` from the Google-style ``Attributes:`` sections of ``cls`` and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        text = inspect.getdoc(klass) or ""
        m = re.search(r"^Attributes:\n(.*?)(?:\n\S|\Z)", text, re.S | re.M)
        if not m:
            continue
        current = None
        for line in m.group(1).splitlines():
            hit = re.match(r"^ {4}(\w+)(?: \([^)]*\))?: (.*)$", line)
            if hit:
                current = hit.group(1)
                docs[current] = hit.group(2).strip()
            elif current and line.strip():
                docs[current] += " " + line.strip()
    return docs


def describe_methods() -> list[dict[str, Any]]:
    """One dict per registered method: name, description, paper row, lambda grid and parameters with defaults."""
    from mergelab.methods import METHODS
    from mergelab.methods.base import LAM_GRID

    out = []
    for name, spec in METHODS.items():
        cfg = spec.config_cls
        docs = attribute_docs(cfg)
        params = []
        for f in dataclasses.fields(cfg):
            default = f.default if f.default is not dataclasses.MISSING else None
            params.append({"name": f.name, "type": str(f.type), "default": default, "doc": docs.get(f.name, "")})
        out.append({"name": name, "description": spec.description, "paper_table": spec.paper,
                    "matrix_only": spec.matrix_only, "global_stats": spec.make_stats is not None,
                    "lam_grid": list(LAM_GRID) if spec.has_lam else None, "parameters": params})
    return out


@click.command("methods")
@click.argument("names", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="print the table as JSON")
def methods(names: tuple[str, ...], as_json: bool) -> None:
    """List merging methods (or only NAMES) with their parameters, defaults and the paper's values."""
    rows = describe_methods()
    if names:
        unknown = sorted(set(names) - {r["name"] for r in rows})
        if unknown:
            raise click.ClickException(f"unknown method(s) {unknown}; known: {sorted(r['name'] for r in rows)}")
        rows = [r for r in rows if r["name"] in names]
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    for r in rows:
        flags = [f for f, on in (("paper table", r["paper_table"]), ("2-D weights only", r["matrix_only"]),
                                 ("global mode: streaming statistics passes", r["global_stats"])) if on]
        click.echo(f"{r['name']}: {r['description']}" + (f"  [{'; '.join(flags)}]" if flags else ""))
        for p in r["parameters"]:
            doc = re.sub(r":\w+:`~?([^`]+)`", r"\1", p["doc"]).replace("``", "").split(". ")[0].rstrip(".")
            doc = doc if len(doc) <= 150 else doc[:149] + "…"
            click.echo(f"    {p['name']} = {p['default']!r}" + (f"  -- {doc}" if doc else ""))
        if r["lam_grid"]:
            click.echo(f"    (paper: lam searched over {r['lam_grid']} on the val split)")


COMMANDS = [methods]
