from typer.testing import CliRunner

from sat_export.cli.export import app


def test_info_prints_config_for_good_checkpoint(tiny_ckpt):
    result = CliRunner().invoke(app, ["info", str(tiny_ckpt)])
    assert result.exit_code == 0, result.output
    assert "mobilenet_v3_small_s16" in result.output


def test_bad_checkpoint_exits_non_zero_with_one_line_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00" * 100)
    result = CliRunner().invoke(app, ["info", str(bad)])
    assert result.exit_code == 1
    assert "error:" in result.output and "bad.pth" in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
