"""The package's layers (pyproject.toml's import-linter contracts) hold, and an import against them fails them;
no module reaches another's private names."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    """`lint-imports` over the package in `tree` (its own copy of pyproject.toml and mta/)."""
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=tree, capture_output=True, text=True, timeout=120,
                          env={"PATH": str(LINT_IMPORTS.parent), "PYTHONPATH": str(tree)})


@pytest.fixture()
def package_copy(tmp_path):
    if not LINT_IMPORTS.exists():
        pytest.skip("import-linter is not installed (make install)")
    shutil.copytree(ROOT / "mta", tmp_path / "mta", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


@pytest.mark.parametrize(("module", "line", "contract"), [
    (None, None, None),
    ("models/llama.py", "from mta.run import pipeline", "layers"),  # a model that knows the pipeline
    ("peft/multi_lora.py", "from mta.baselines.proper import MixtureLinear", "no generic layer imports a baseline"),
    ("baselines/perpcs.py", "from mta.baselines import proper", "the baselines are independent of each other"),
    ("stages/engine.py", "import transformers", "test oracles stay out of the library"),
])
def test_an_import_against_the_layers_breaks_a_contract(package_copy, module, line, contract):
    if module is not None:
        path = package_copy / "mta" / module
        path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    result = lint_imports(package_copy)
    if module is None:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "0 broken" in result.stdout
    else:
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"{contract} BROKEN" in result.stdout


def private_names_reached(path: Path) -> list[str]:
    """`from mta.x import _name`, or `mod._name` on a module imported from mta, in one file."""
    tree, found, modules = ast.parse(path.read_text()), [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mta"):
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
            modules |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            modules |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("mta")}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules \
                and node.attr.startswith("_") and not node.attr.startswith("__"):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def test_no_private_name_crosses_a_module():
    reached = {str(p.relative_to(ROOT)): names for p in sorted((ROOT / "mta").rglob("*.py"))
               if (names := private_names_reached(p))}
    assert reached == {}


def test_the_private_name_check_sees_both_forms(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from mta.peft.fusion import _linears\nfrom mta.stages import kmeans\nkmeans._update_centers\n")
    assert private_names_reached(bad) == ["mta.peft.fusion._linears", "kmeans._update_centers"]
