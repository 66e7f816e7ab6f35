"""Every command-line tool: ``--help`` is quick because no runtime is imported for it, and every option says what it is."""
import subprocess
import sys

import click
import pytest
import typer
from typer.testing import CliRunner

from benchmarks.cli import app as bench_app
from sat_export.cli.eval import app as eval_app
from sat_export.cli.export import app as export_app
from sat_export.cli.infer import app as infer_app
from sat_export.cli.train import app as train_app

APPS = {"sat-infer": infer_app, "sat-export": export_app, "sat-eval": eval_app, "sat-train": train_app,
        "sat-bench": bench_app}
CLI_MODULES = ("sat_export.cli.infer", "sat_export.cli.export", "sat_export.cli.eval", "sat_export.cli.train",
               "benchmarks.cli")
RUNTIMES = ("torch", "torchvision", "onnx", "onnxruntime", "openvino", "ray", "nltk", "tensorrt", "pyarrow", "fsspec",
            "s3fs")


def commands(app: typer.Typer) -> dict[str, click.Command]:
    root = typer.main.get_command(app)
    subs = getattr(root, "commands", None)
    return {name: cmd for name, cmd in subs.items()} if subs else {"": root}


@pytest.mark.parametrize("module", CLI_MODULES)
def test_importing_a_cli_imports_no_runtime(module):
    """``--help`` is built from the signatures alone, so it must not wait for torch (1.5 s) or nltk (1.4 s)."""
    code = f"import sys, {module}; print(sorted(m for m in {RUNTIMES!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


@pytest.mark.parametrize("tool", APPS)
def test_every_option_has_a_help_text_shown_whole(tool):
    runner = CliRunner()
    for name, cmd in commands(APPS[tool]).items():
        shown = " ".join(runner.invoke(APPS[tool], [name, "--help"] if name else ["--help"], env={"COLUMNS": "400"},
                                       terminal_width=400).output.split())
        for param in cmd.params:
            if isinstance(param, click.Option):
                assert param.help and param.help.strip(" ."), (tool, name, param.name)
                assert " ".join(param.help.split()) in shown, (tool, name, param.name, param.help)
