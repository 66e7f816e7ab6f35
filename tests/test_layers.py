"""The layers contracts (pyproject ``[tool.importlinter]``): benchmarks -> sat_export -> engines -> training, and the
sub-packages of sat_export; and no two modules importing each other in a loop."""
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("benchmarks", "sat_export", "engines", "training")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(lint), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(root), "PATH": str(lint.parent)})


def test_every_import_points_down_the_layers():
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 kept, 0 broken" in done.stdout


def test_an_import_to_the_left_inside_a_function_breaks_the_contract(tmp_path):
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("*.pth", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / "training" / "vocab.py", "a") as f:
        f.write("\n\ndef _late():\n    from sat_export.bundle.format import load_bundle  # noqa: F401\n")
    done = lint_imports(tmp_path)
    assert done.returncode == 1 and "training.vocab -> sat_export.bundle.format" in done.stdout, done.stdout + done.stderr


def test_no_modules_import_each_other_in_a_loop():
    graph = grimp.build_graph(*PACKAGES)
    loops = [(a, b) for a in sorted(graph.modules) for b in sorted(graph.find_modules_directly_imported_by(a))
             if graph.find_shortest_chain(importer=b, imported=a)]
    assert not loops, loops


BUILD_OUTPUT_NAMES = {"build", "dist", "out", "target"}


def test_no_source_or_test_folder_is_named_like_a_build_output():
    """pytest's default norecursedirs, Python .gitignore templates and code tools skip folders named build or dist:
    a package of that name silently loses its tests (34 of them until sat_export.build became sat_export.bundler)."""
    folders = [p.relative_to(ROOT) for top in (*PACKAGES, "tests") for p in (ROOT / top).rglob("*")
               if p.is_dir() and p.name in BUILD_OUTPUT_NAMES]
    assert not folders, folders
