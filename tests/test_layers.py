"""The layers contract (pyproject ``[tool.importlinter]``): benchmarks -> sat_export -> engines -> training."""
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("benchmarks", "sat_export", "engines", "training")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(lint), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(root), "PATH": str(lint.parent)})


def test_every_import_points_down_the_layers():
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 kept, 0 broken" in done.stdout


def test_an_import_to_the_left_inside_a_function_breaks_the_contract(tmp_path):
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("*.pth", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / "training" / "vocab.py", "a") as f:
        f.write("\n\ndef _late():\n    from sat_export.bundle import load_bundle  # noqa: F401\n")
    done = lint_imports(tmp_path)
    assert done.returncode == 1 and "training.vocab -> sat_export.bundle" in done.stdout, done.stdout + done.stderr
