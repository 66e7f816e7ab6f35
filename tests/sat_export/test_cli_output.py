"""What a tool writes to a pipe or a file (CI logs, ``2> run.log``) is whole: no line cut at 80 columns."""
import os
import subprocess
import sys

from tests.sat_export.pipeline.test_infer import read_rows, write_images
from training.console import UNWRAPPED_WIDTH, make_console


def test_a_console_that_is_not_a_terminal_does_not_wrap():
    console = make_console()  # pytest captures stderr: not a terminal
    assert not console.is_terminal and console.width == UNWRAPPED_WIDTH
    with console.capture() as captured:
        console.print("✓ " + "word " * 60, highlight=False)
    assert captured.get().count("\n") == 1


def test_the_first_run_piped_to_a_file_prints_the_parity_report_one_line_per_output(tmp_path, tiny_ckpt):
    """The first run builds the checkpoint's bundle into the cache and prints its parity report."""
    names = write_images(tmp_path / "in", 3)
    env = {**os.environ, "SAT_EXPORT_CACHE": str(tmp_path / "cache"), "COLUMNS": ""}
    with open(tmp_path / "stderr.log", "w") as log:
        done = subprocess.run([sys.executable, "-m", "sat_export.cli.infer", str(tmp_path / "in"), "--out",
                               str(tmp_path / "c.jsonl"), "--model", str(tiny_ckpt)], stderr=log, env=env, timeout=600)
    lines = (tmp_path / "stderr.log").read_text(encoding="utf-8").splitlines()
    assert done.returncode == 0 and sorted(read_rows(tmp_path / "c.jsonl")) == names, lines
    parity = [line for line in lines if line.startswith(("✓", "✗"))]
    assert len(parity) >= 9 and all("max |diff|" in line or "captions" in line for line in parity), lines
    assert all(line.startswith(("✓", "✗", "~", "building ", "exported ", str(tmp_path), "busy: ", "bottleneck: "))
               for line in lines), lines  # the last two: the stage report
