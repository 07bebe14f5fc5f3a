"""Project hygiene: the test run's warning filters, the documents the project points to, the usage guide."""

import ast
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from diffusers import DPMSolverMultistepScheduler

from dlg_sampler import cli


def test_known_third_party_warnings_are_filtered_and_ours_are_not():
    """diffusers' schedulers raise a NumPy 2 deprecation on every set_timesteps (~200k per test run); the pytest
    config filters it by message and module, so the same warning raised from our code still shows."""
    with warnings.catch_warnings(record=True) as seen:  # the filters pytest applied from pyproject.toml
        DPMSolverMultistepScheduler().set_timesteps(10)
        assert not [w for w in seen if issubclass(w.category, DeprecationWarning)], [str(w.message) for w in seen]
        warnings.warn_explicit("__array__ implementation doesn't accept a copy keyword", DeprecationWarning,
                               "sampler.py", 1, module="dlg_sampler.sampler")
    assert [str(w.message) for w in seen] == ["__array__ implementation doesn't accept a copy keyword"]


ROOT = Path(__file__).resolve().parent.parent
#: What the project ships and documents (not the virtual environment or build outputs).
PROJECT_FILES = [ROOT / "README.md", ROOT / "pyproject.toml",
                 *(p for d in ("dlg_sampler", "adapters", "examples", "tests", "docs", "benchmarks")
                   for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".md", ".toml"))]


def test_every_document_the_project_points_to_is_in_the_project():
    """Code and examples pointed to a design document that was never part of the project."""
    shipped = {p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.md") if ".venv" not in p.parts}
    missing = set()
    for path in PROJECT_FILES:
        for name in re.findall(r"(?<![\w/.:-])([\w./-]*\w\.md)\b", path.read_text(errors="ignore")):
            local = (path.parent / name).resolve()
            if not (local.exists() or name in shipped or any(s.endswith("/" + name) for s in shipped)):
                missing.add(f"{path.relative_to(ROOT)}: {name}")
    assert not missing, sorted(missing)


@pytest.mark.parametrize("parser", [cli.sample_parser(), cli.train_classifier_parser(), cli.tune_parser()])
def test_usage_guide_explains_every_command_line_option(parser):
    guide = (ROOT / "docs" / "usage.md").read_text()
    options = [o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    assert [o for o in options if f"`{o}" not in guide and f"/ `{o}`" not in guide and f" {o}" not in guide] == []


def test_readme_says_how_to_install_torch_off_this_machine():
    """The pinned torch==2.13.0 is the CPU build only where pip reads this project's wheel cache."""
    readme = (ROOT / "README.md").read_text()
    setup = readme[readme.index("## Two commands"):readme.index("## The algorithm")]
    assert "--index-url https://download.pytorch.org/whl/cpu" in setup and "pytorch.org/get-started" in setup
    assert "docs/usage.md" in setup  # --device, threads


def test_every_markdown_table_row_has_its_header_columns():
    """An unescaped ``|`` inside a cell (``--sde vp|subvp|ve``) splits it: GitHub's renderer cuts the row there."""
    broken = []
    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        columns = None
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            cells = len(re.findall(r"(?<!\\)\|", line)) if line.startswith("|") else None
            if cells is not None and columns is not None and cells != columns:
                broken.append(f"{doc.relative_to(ROOT)}:{number}: {line[:60]}")
            columns = cells if columns is None or cells is None else columns
    assert broken == []


def _imports(path: Path, module: str) -> set[str]:
    """The package modules ``module`` (file ``path``) imports, at the top or inside functions; imports under
    ``if TYPE_CHECKING:`` are annotations only and left out."""
    tree = ast.parse(path.read_text())
    hidden = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
              for child in node.body for n in ast.walk(child)}
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level and id(node) not in hidden:
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in PACKAGE_MODULES else base
                      for alias in node.names}
    return found & set(PACKAGE_MODULES) - {module}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    parts = ["dlg_sampler", *parts] if parts[0] == "adapters" else parts  # installed as dlg_sampler.adapters
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


PACKAGE_MODULES = {_module_name(p): p for d in ("dlg_sampler", "adapters") for p in (ROOT / d).rglob("*.py")}


def test_no_two_modules_import_each_other():
    """Four circles (bench reference/runs/workloads, integrators/schedulers, models/pipelines, sampler/tuning) were
    held apart by imports inside functions; what both sides needed now sits one level down."""
    graph = {m: _imports(p, m) for m, p in PACKAGE_MODULES.items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            if m == goal:
                return True
            if m not in seen:
                seen.add(m)
                todo.extend(graph[m])
        return False

    assert sorted(f"{a} -> {b}" for a in graph for b in graph[a] if reaches(b, a)) == []


CIRCLES = ["dlg_sampler.bench.reference", "dlg_sampler.bench.runs", "dlg_sampler.bench.workloads",
           "dlg_sampler.integrators", "dlg_sampler.schedulers", "dlg_sampler.models", "dlg_sampler.pipelines",
           "dlg_sampler.sampler", "dlg_sampler.tuning"]


def test_each_module_imports_first_and_keeps_its_names():
    """Each module of the former circles imports on its own, first, and the names moved down are still where
    they were imported from."""
    code = f"""
import importlib, sys
for name in {CIRCLES!r}:
    for loaded in [m for m in sys.modules if m.startswith("dlg_sampler")]:
        del sys.modules[loaded]
    importlib.import_module(name)
from dlg_sampler.integrators import CountedScore, Score, append_dims, check_sigma_start, check_steps, randn_like
from dlg_sampler.restart import RESTART_SCALE, _data_scale, restart_rule
from dlg_sampler.models import CLASSIFIER_FILES, load_classifier
from dlg_sampler.bench.runs import make_scheduler, write_json
from dlg_sampler.bench.workloads import class_proportions
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
