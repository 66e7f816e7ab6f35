"""The install routes of pyproject.toml, resolved and run by pip itself (needs pip's package index; skipped
with the reason where it cannot be reached).

The GPU routes (``engines.ort.GPU_INSTALL``, and ``GPU_TRT_INSTALL`` with TensorRT) must end with exactly one
onnxruntime distribution, the GPU one, whose ``import onnxruntime`` lists ``CUDAExecutionProvider`` (it does
without a GPU: the provider is compiled in), and an onnxruntime-gpu that is new enough for the base requirement
(the int8 search's ``calibration_cache_path`` came in 1.27). The CPU route (``pip install -e .``) gets the CPU
onnxruntime alone.
"""
import json
import re
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from engines.ort import GPU_INSTALL, GPU_TRT_INSTALL

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
pytestmark = pytest.mark.slow


def _requirement(name: str, requirements: list[str]) -> Requirement:
    return next(r for r in map(Requirement, requirements) if r.name == name)


@pytest.fixture(scope="module")
def index():
    """Skip unless pip can list onnxruntime-gpu's releases (its index is reachable)."""
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "onnxruntime-gpu"], capture_output=True,
                         text=True, timeout=300)
    if out.returncode != 0:
        pytest.skip(f"pip cannot reach its package index: {out.stderr.strip().splitlines()[-1:]}")


def _resolve(target: str) -> dict[str, str]:
    """What ``pip install target`` would install into an empty environment: ``{name: version}``."""
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
                          "--report", "-", "-e", target], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(out.stdout)["install"]}


def test_cpu_install_resolves_the_cpu_onnxruntime_alone(index):
    resolved = _resolve(".")
    assert "onnxruntime" in resolved and "onnxruntime-gpu" not in resolved


def test_gpu_extra_resolves_an_onnxruntime_gpu_that_meets_the_base_requirement(index):
    resolved = _resolve(".[gpu]")
    base = _requirement("onnxruntime", PYPROJECT["project"]["dependencies"])
    assert base.specifier.contains(resolved["onnxruntime-gpu"]), (base, resolved["onnxruntime-gpu"])


def _project(tmp_path: Path) -> Path:
    """A project whose onnxruntime requirements are pyproject.toml's (the rest, torch's 6 GB included, plays no part
    in which onnxruntime is installed). Its ``trt`` extra is a local stand-in distribution: TensorRT's wheels come
    from pypi.nvidia.com, out of reach here, and which onnxruntime ends up installed depends on the base
    requirement, which every install of the project re-resolves, not on what an extra holds."""
    standin = tmp_path / "tensorrt-standin"
    (standin / "tensorrt_standin").mkdir(parents=True)
    (standin / "tensorrt_standin" / "__init__.py").write_text("")
    (standin / "pyproject.toml").write_text(_pyproject("tensorrt-standin", [], {}))
    project = tmp_path / "project"
    (project / "probe").mkdir(parents=True)
    (project / "probe" / "__init__.py").write_text("")
    base = _requirement("onnxruntime", PYPROJECT["project"]["dependencies"])
    extras = {"gpu": PYPROJECT["project"]["optional-dependencies"]["gpu"],
              "trt": [f"tensorrt-standin @ {standin.as_uri()}"]}
    (project / "pyproject.toml").write_text(_pyproject("probe", [str(base)], extras))
    return project


def _pyproject(name: str, dependencies: list[str], extras: dict[str, list[str]]) -> str:
    return ('[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n'
            f'[project]\nname = "{name}"\nversion = "0"\ndependencies = {json.dumps(dependencies)}\n'
            "[project.optional-dependencies]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in extras.items()))


def _run(command: str, bin_dir: Path, project: Path) -> list[str]:
    """Run a documented ``pip`` command with the virtualenv's pip; the onnxruntime distributions it leaves."""
    out = subprocess.run(["bash", "-c", re.sub(r"\bpip ", f"{bin_dir}/python -m pip ", command)], cwd=project,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    listed = subprocess.run([bin_dir / "python", "-m", "pip", "list", "--format", "json"], capture_output=True,
                            text=True, check=True).stdout
    return sorted(p["name"] for p in json.loads(listed) if p["name"].startswith("onnxruntime"))


def _providers(bin_dir: Path, cwd: Path) -> str:
    return subprocess.run([bin_dir / "python", "-c", "import onnxruntime; print(onnxruntime.get_available_providers())"],
                          capture_output=True, text=True, cwd=cwd, check=True).stdout


def test_the_gpu_install_commands_leave_one_onnxruntime_and_it_offers_cuda(index, tmp_path):
    """``GPU_INSTALL`` run for real in a fresh virtualenv; then TensorRT added as the docs once said
    (``pip install -e '.[trt]'``), which brings the CPU onnxruntime back beside the GPU one; then
    ``GPU_TRT_INSTALL``, which ends with the GPU one alone again, TensorRT's extra installed."""
    project = _project(tmp_path)
    venv.create(tmp_path / "env", with_pip=True)
    bin_dir = tmp_path / "env" / "bin"
    assert _run(GPU_INSTALL, bin_dir, project) == ["onnxruntime-gpu"]
    assert "CUDAExecutionProvider" in _providers(bin_dir, tmp_path)
    assert _run("pip install -e '.[trt]'", bin_dir, project) == ["onnxruntime", "onnxruntime-gpu"]
    assert _run(GPU_TRT_INSTALL, bin_dir, project) == ["onnxruntime-gpu"]
    assert "CUDAExecutionProvider" in _providers(bin_dir, tmp_path)
    installed = subprocess.run([bin_dir / "python", "-m", "pip", "show", "tensorrt-standin"], capture_output=True)
    assert installed.returncode == 0
