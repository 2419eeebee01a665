"""Every YAML and command snippet the documentation shows runs: README.md, docs/*.md and examples/.

- A YAML block is written to a file (beside a link to the repository's ``mergelab/`` so the relative zoo paths
  resolve as they do from the repository root) and validated by the command that reads it with ``--dry-run``:
  ``mergelab campaign`` for a campaign, ``mergelab merge`` for a merge recipe (mergekit YAML included). Paths of
  real checkpoints (``/ckpt/...``, ``/adapters/...``) are mapped to the shipped zoo's checkpoints of the same kind
  (base, full fine-tune or LoRA adapter of the task the name mentions), so the dry run's checks really run.
- A command line: ``mergelab merge/campaign/worker`` run with ``--dry-run`` on the file it names (the snippet
  whose first line names it, e.g. ``# campaign.yaml``, else the last YAML block before it in the same document,
  else the repository's file); every other ``mergelab`` command line is parsed by the CLI (command and
  options exist, arguments fit); ``make X`` needs the Makefile target; ``python benchmarks/X.py`` needs the
  script to compile.
- Not run: docker, shell housekeeping (``cp``, ``mkdir``, ``export``) and the MLflow server command of
  docs/scale-out.md, which need a compose stack (its own tests cover it); the ``mlflow models serve`` line of
  docs/ui.md starts a server: tests/test_serve_vlm.py runs it.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
ZOO = REPO / "mergelab" / "bench" / "zoo" / "seed0"
TASKS = ("vqa", "geometry", "chart", "ocr", "grounding")


def _stand_in(match: re.Match[str]) -> str:
    """The zoo checkpoint standing in for a real one the docs name: an adapter, a task's expert, else the base."""
    path = match.group(0)
    task = next((t for t in TASKS if t in path.lower()), None)
    if task is None:
        return str(ZOO / "base")
    return str(ZOO / ("lora" if path.startswith("/adapters/") else "full") / task)


#: Leading words of command lines that are not run here, and why.
NOT_RUN = {"docker": "needs the compose stack (docs/scale-out.md; tests/test_scaleout.py)",
           "cp": "shell housekeeping", "mkdir": "shell housekeeping", "export": "shell environment",
           "mlflow": "an MLflow server on PostgreSQL (tests/test_scaleout.py)",
           ".venv/bin/mlflow": "serves a registered version; tests/test_serve_vlm.py runs the line docs/ui.md shows"}


@dataclass
class Snippet:
    """One fenced block (or an example file's header commands)."""

    where: str
    lang: str
    text: str


def _blocks(path: Path) -> list[Snippet]:
    out, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if m:
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            out.append(Snippet(f"{path.relative_to(REPO)}:{i + 1}", m.group(1), "\n".join(lines[i + 1:j])))
            i = j
        i += 1
    return out


def _snippets() -> list[Snippet]:
    found = [s for p in DOCS for s in _blocks(p) if s.lang in ("yaml", "bash")]
    for ex in EXAMPLES:
        found.append(Snippet(str(ex.relative_to(REPO)), "yaml-file", ex.read_text()))
        cmds = [ln.lstrip("#").strip() for ln in ex.read_text().splitlines() if re.match(r"#\s+\.venv/bin/", ln)]
        if cmds:
            found.append(Snippet(f"{ex.relative_to(REPO)} (commands)", "bash", "\n".join(cmds)))
    return found


SNIPPETS = _snippets()


def _cli(args: list[str]) -> str:
    from mergelab.platform.cli import main

    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, f"mergelab {' '.join(args)} -> {res.exit_code}\n{res.output}"
    return res.output


def _parse_only(args: list[str]) -> None:
    """The command exists and its options and arguments parse (nothing runs)."""
    from mergelab.platform.cli import main

    cmd = main
    while isinstance(cmd, type(main)) and args:
        name, args = args[0], args[1:]
        sub = cmd.get_command(None, name)  # type: ignore[arg-type]
        assert sub is not None, f"no command {name!r}"
        cmd = sub
    ctx = cmd.make_context(cmd.name, list(args))
    ctx.close()


def _write_yaml(text: str, tmp: Path, name: str) -> Path:
    """Write a YAML snippet where its relative paths resolve as from the repository root."""
    link = tmp / "mergelab"
    if not link.exists():
        link.symlink_to(REPO / "mergelab")
    text = re.sub(r"/(?:ckpt|adapters)/[\w.\-]+", _stand_in, text)
    path = tmp / name
    path.write_text(text)
    return path


def _check_yaml(text: str, tmp: Path, name: str) -> str:
    data = yaml.safe_load(text)
    assert isinstance(data, dict), "a config snippet must be a mapping"
    path = _write_yaml(text, tmp, name)
    if "search_space" in data or "budget" in data or "name" in data:
        out = _cli(["campaign", str(path), "--dry-run"])
        assert "template digest: " in out
    else:
        out = _cli(["merge", str(path), "--out", str(tmp / "out"), "--dry-run"])
        assert not (tmp / "out").exists()
    return out


def _words(line: str) -> list[str]:
    line = line.split(" #", 1)[0].strip()
    line = re.sub(r"\[([^\]]*)\]", r"\1", line)  # optional parts shown in brackets: check them too
    return shlex.split(line)


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.where for s in SNIPPETS])
def test_documented_snippet_runs(snippet: Snippet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERGELAB_ROOT", str(tmp_path / "mlruns"))
    if snippet.lang == "yaml-file":
        _cli(["campaign" if "search_space" in snippet.text else "merge", str(REPO / snippet.where), "--dry-run",
              *([] if "search_space" in snippet.text else ["--out", str(tmp_path / "out")])])
        return
    if snippet.lang == "yaml":
        first = snippet.text.splitlines()[0]
        name = first.lstrip("# ").strip() if first.startswith("#") else "snippet.yaml"
        _check_yaml(snippet.text, tmp_path, name)
        return
    # a bash block: the YAML files it names are snippets (see the module docstring) or repository files
    named = {s.text.splitlines()[0].lstrip("# ").strip(): s for s in SNIPPETS
             if s.lang == "yaml" and s.text.startswith("# ") and s.text.splitlines()[0].endswith(".yaml")}
    doc, line = snippet.where.split(":")[0], int(snippet.where.split(":")[1]) if ":" in snippet.where else 0
    before = [s for s in SNIPPETS if s.lang == "yaml" and s.where.split(":")[0] == doc
              and int(s.where.split(":")[1]) < line]
    skipped = []
    for raw in snippet.text.splitlines():
        if not raw.strip() or raw.lstrip().startswith("#") or raw.startswith(" "):
            continue  # comments and continuation lines of comments
        head = raw.split()[0]
        if head in NOT_RUN:
            skipped.append(f"{raw.strip()}: {NOT_RUN[head]}")
            continue
        words = _words(raw)
        if head == "make":
            targets = re.findall(r"^([a-z][\w-]*):", (REPO / "Makefile").read_text(), re.M)
            assert words[1] in targets, f"{raw}: no Makefile target {words[1]!r}"
            continue
        if head.endswith("python"):
            script = REPO / words[1]
            assert script.is_file(), f"{raw}: no {words[1]}"
            compile(script.read_text(), str(script), "exec")
            continue
        assert head.endswith("mergelab"), f"{snippet.where}: unknown command line {raw!r}"
        args = words[1:]
        if args[0] in ("merge", "campaign", "worker"):
            src = args[1]
            if src in named:
                cfg = _write_yaml(named[src].text, tmp_path, src)
            elif before and not (REPO / src).is_file():
                cfg = _write_yaml(before[-1].text, tmp_path, src)
            else:
                cfg = REPO / src
                assert cfg.is_file(), f"{raw}: no {src}"
            extra = ["--out", str(tmp_path / "out")] if args[0] == "merge" else []
            _cli([args[0], str(cfg), "--dry-run", *extra])
        else:
            _parse_only(args)
    if skipped:
        print("not run here:\n  " + "\n  ".join(skipped))


def test_every_documented_config_is_found() -> None:
    """The collector sees the snippets this module promises to run (a renamed fence would hide one)."""
    wheres = {s.where.split(":")[0] for s in SNIPPETS}
    assert {"README.md", "docs/platform.md", "docs/scale-out.md"} <= wheres
    assert {s.where for s in SNIPPETS if s.lang == "yaml-file"} == {str(p.relative_to(REPO)) for p in EXAMPLES}
    assert sum(s.lang == "yaml" for s in SNIPPETS) >= 2
