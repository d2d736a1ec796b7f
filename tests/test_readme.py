"""The README and the documentation site: the site builds with --strict, and every command and code
block the pages show runs.

What a fenced block is, by its language:
- ``python``: run. A page's Python blocks run in order in one namespace, in a fresh folder holding a
  copy of ``recipes/`` (so paths read as from the repository root). Every page runs all its blocks,
  whatever order the pages run in (the README's example, shown again on docs/python.md, runs twice).
- ``yaml``: a recipe. With ``# file: NAME`` as its first line it is written into the page's folder for
  the commands and recipes after it, which read (and so check) it, and one of them must name it; any other is
  loaded and validated (as a search space when it has a ``search:`` block).
- ``sh``: commands, one a line (``\\`` continues a line, ``#`` starts a comment, and ``# exits N``
  says the command exits with N, otherwise 0), run in the page's folder after the blocks above them.
- ``text``: what a command prints, a synopsis or a file tree: shown, not run.
Any other language fails the test, so nothing new slips past these rules.

A command that would take minutes is not run in full (the suite's budget is about 15 minutes):
``LONG`` below names each kind and why. Such a command is parsed by the parser that would run it
(the benchmark's own argparse parser, the edgecompress CLI's click parser, ``make -n``) and the
recipe it names is loaded and validated; only the work itself is not started. Every entry of
``LONG`` must match a command the pages show, so none outlives its use.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import edgecompress as ec

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)
LANGUAGES = {"python", "yaml", "sh", "text"}

LONG = [
    (r"^make (demo|test|docs|bench|test-portable)$",
     "make test is this suite, demo and docs are covered by this file's own runs, bench takes hours: "
     "dry-run with make -n"),
    (r"^python -m bench\.", "a benchmark: minutes to an hour each (bench/ is comparisons, not tests)"),
    (r"^edgecompress demo$", "Deep Compression with a sensitivity scan and 26 epochs of fine-tune: minutes"),
    (r"^edgecompress run recipes/",
     "a shipped recipe: tens of seconds to 20 minutes each; python -m bench.snapshot runs them all"),
    (r"^edgecompress run rpi4\.yaml$",
     "compiles TVM libraries for two targets and lowers ExecuTorch programs: minutes"),
    (r"^edgecompress run search-m4/best\.yaml$", "the best recipe of the search above, which is not run"),
    (r"^edgecompress search ", "a search trains tens of models"),
    (r"^pip install ", "installs from a registry: the extra it names must exist in pyproject.toml"),
]
EXPECTED_FILES = {  # what a page's code leaves behind, beyond exiting cleanly
    "README.md": lambda d: (d / "edgecompress-out" / "lenet300-pruned.onnx").stat().st_size > 1_000_000,
    "docs/cli.md": lambda d: {"model.onnx", "model.ecz", "report.json", "unpacked.onnx", "again.html"}
    <= {p.name for p in (d / "out").iterdir()},
    "docs/export/ecz.md": lambda d: (d / "model.ecz").stat().st_size > 0,
}


def blocks(page: Path) -> list[tuple[str, str]]:
    return [(lang, body) for lang, body in FENCE.findall(page.read_text())]


def commands(body: str) -> list[tuple[str, int]]:
    """(command, expected exit code) of each command line of an sh block."""
    out = []
    for line in body.replace("\\\n", " ").splitlines():
        line = line.strip()
        exits = re.search(r"#\s*exits (\d+)\s*$", line)
        line = line.split(" #")[0].strip() if not line.startswith("#") else ""
        if line:
            out.append((re.sub(r"\s+", " ", line), int(exits.group(1)) if exits else 0))
    return out


def long_reason(command: str) -> str | None:
    bare = re.sub(r"^(\w+=\S+ )+", "", command)  # an environment prefix: OMP_NUM_THREADS=1 ...
    return next((why for pattern, why in LONG if re.search(pattern, bare)), None)


def all_commands() -> list[str]:
    return [c for page in PAGES for lang, body in blocks(page) if lang == "sh" for c, _ in commands(body)]


def check_recipe(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    if isinstance(data, dict) and "search" in data:
        importlib.import_module("edgecompress.search").Space.from_yaml(path)
    else:
        ec.Recipe.from_yaml(path)


class _Parsed(Exception):
    pass


def parse_only(command: str, folder: Path, monkeypatch) -> None:
    """Parse a long command as the program that runs it would, and check what it names."""
    argv = shlex.split(re.sub(r"^(\w+=\S+ )+", "", command))
    if argv[0] == "make":
        r = subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, f"{command}: {r.stderr}"
    elif argv[:2] == ["python", "-m"]:
        module, real = argv[2], argparse.ArgumentParser.parse_args

        def intercept(self, args=None, namespace=None):
            raise _Parsed(real(self, args, namespace))

        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", intercept)
        monkeypatch.setattr(sys, "argv", [module, *argv[3:]])
        with pytest.raises(_Parsed):
            importlib.import_module(module).main()
        monkeypatch.undo()
    elif argv[0] == "edgecompress":
        import typer

        from edgecompress.cli import app

        group = typer.main.get_command(app)
        ctx = group.make_context("edgecompress", argv[1:])
        name, sub, rest = group.resolve_command(ctx, [*getattr(ctx, "_protected_args", []), *ctx.args])
        with sub.make_context(name, rest, parent=ctx) as sub_ctx:
            recipe = sub_ctx.params.get("recipe")
        if recipe is not None and (folder / recipe).exists():
            check_recipe(folder / recipe)
        elif recipe is not None:  # only a file an earlier command on the page writes (a search's best.yaml)
            assert Path(recipe).parts[0] in re.findall(r" -o (\S+)", " ".join(all_commands())), command
    elif argv[:2] == ["pip", "install"]:
        extras = re.findall(r"\[(\w+)\]", command)
        declared = re.search(r"\[project\.optional-dependencies\](.*?)\n\[", (ROOT / "pyproject.toml").read_text(),
                             re.S).group(1)
        assert extras and all(re.search(rf"^{e} = ", declared, re.M) for e in extras), command
    else:
        raise AssertionError(f"{command}: LONG names it but nothing here knows how to parse it")


def run_command(command: str, exits: int, folder: Path) -> None:
    argv = shlex.split(command)
    if argv[0] == "edgecompress":
        from typer.testing import CliRunner

        from edgecompress.cli import app

        r = CliRunner().invoke(app, argv[1:])
        assert r.exit_code == exits, f"{command}: exit {r.exit_code}\n{r.output}\n{r.exception!r}"
    else:
        r = subprocess.run(["bash", "-c", command], cwd=folder, capture_output=True, text=True, timeout=120)
        assert r.returncode == exits, f"{command}: exit {r.returncode}\n{r.stderr}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_block_of_the_page_runs(page, tmp_path, monkeypatch):
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    written, named = set(), " ".join(all_commands()) + re.sub(r"# file: \S+\n", "", page.read_text())
    for lang, body in blocks(page):
        assert lang in LANGUAGES, f"{page.name}: a ```{lang or '(no language)'} block: use one of {sorted(LANGUAGES)}"
        if lang == "python":
            exec(compile(body, str(page), "exec"), namespace)
        elif lang == "yaml":
            file = re.match(r"# file: (\S+)\n", body)
            target = tmp_path / (file.group(1) if file else "block.yaml")
            target.write_text(body)
            if file:
                written.add(file.group(1))
            else:
                check_recipe(target)
        elif lang == "sh":
            for command, exits in commands(body):
                if long_reason(command):
                    parse_only(command, tmp_path, monkeypatch)
                    monkeypatch.chdir(tmp_path)
                else:
                    run_command(command, exits, tmp_path)
    assert all(name in named for name in written), f"{page.name}: a # file: block no command reads"
    check = EXPECTED_FILES.get(str(page.relative_to(ROOT)))
    assert check is None or check(tmp_path)


def test_every_long_entry_is_used():
    shown = all_commands()
    for pattern, why in LONG:
        assert any(re.search(pattern, re.sub(r"^(\w+=\S+ )+", "", c)) for c in shown), f"unused: {pattern} ({why})"


def test_the_site_builds_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
    for name in ec.__all__:
        assert name == "__version__" or f'id="edgecompress.{name}"' in api, f"API reference misses {name}"


def test_the_api_reference_names_public_objects_only():
    names = re.findall(r"^::: (\S+)$", (DOCS / "reference" / "api.md").read_text(), re.M)
    assert names and all(n.count(".") == 1 and n.split(".")[1] in ec.__all__ for n in names), names
    directives = [line for p in DOCS.rglob("*.md") for line in p.read_text().splitlines() if line.startswith(":::")]
    assert len(directives) == len(names), "mkdocstrings directives belong on reference/api.md, public names only"


def test_every_recipe_key_is_on_the_keys_page():
    page = (DOCS / "reference" / "recipe-keys.md").read_text()
    schema = json.loads((ROOT / "recipe.schema.json").read_text())
    for section in [schema, *schema["$defs"].values()]:
        for key in section.get("properties", {}):
            assert f"| `{key}` |" in page, f"recipe key {key} is not on docs/reference/recipe-keys.md"


def test_the_readme_is_short_and_its_recipe_is_the_shipped_one():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    recipe = next(body for lang, body in blocks(ROOT / "README.md") if lang == "yaml")
    shipped = re.search(r"This is (recipes/\S+\.yaml)", recipe).group(1)
    assert yaml.safe_load(recipe) == yaml.safe_load((ROOT / shipped).read_text())
    assert "docs/report.png" in text or "report.png" in (DOCS / "report.md").read_text()
