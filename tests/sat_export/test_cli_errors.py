"""Every CLI error is one line (``cli.common.user_errors``): a library's exception from the environment shows its
type and first line and the log file holding its traceback; SAT_EXPORT_DEBUG=1 raises it; typer exits pass."""
from __future__ import annotations

import re
import socket

import typer
from typer.testing import CliRunner

from sat_export.cli.common import new_app, user_errors
from tests.conftest import free_port

app = new_app()


@app.command()
@user_errors
def main(exit_code: int = typer.Option(None), bad: bool = typer.Option(False)):
    if exit_code is not None:
        raise typer.Exit(exit_code)
    if bad:
        raise typer.BadParameter("--bad is never right")
    socket.create_connection(("127.0.0.1", free_port()), timeout=5)  # nothing listens: refused


def test_an_environment_error_is_one_line_naming_the_log_with_its_traceback(monkeypatch):
    monkeypatch.delenv("SAT_EXPORT_DEBUG", raising=False)
    result = CliRunner().invoke(app, [])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("error: ConnectionRefusedError: [Errno 111] Connection refused (traceback in ")
    log = re.search(r"traceback in (\S+);", lines[0]).group(1)
    text = open(log).read()
    assert text.startswith("Traceback (most recent call last):") and "socket.create_connection" in text


def test_debug_shows_the_traceback_and_typer_exits_pass_through(monkeypatch):
    monkeypatch.setenv("SAT_EXPORT_DEBUG", "1")
    result = CliRunner().invoke(app, [])
    assert isinstance(result.exception, ConnectionRefusedError)
    assert CliRunner().invoke(app, ["--exit-code", "3"]).exit_code == 3


def test_typer_exits_and_usage_errors_pass_through(monkeypatch):
    monkeypatch.delenv("SAT_EXPORT_DEBUG", raising=False)
    assert CliRunner().invoke(app, ["--exit-code", "3"]).exit_code == 3
    result = CliRunner().invoke(app, ["--bad"])
    assert result.exit_code == 2 and "Invalid value: --bad is never right" in result.output, result.output
