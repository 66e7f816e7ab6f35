"""Checkpoints as untrusted input: every field of a valid checkpoint dict mutated, names that would rewrite the
terminal, training records of any size. `sat-export info` answers each with its summary or one line."""
from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from sat_export.cli.export import SHOWN_CHARS, app
from tests.conftest import one_line_error
from tests.sat_export.bundle.test_hostile_bundles import field, json_values, mutate, paths_of, same_kind
from training.checkpoint import FORMAT


def info(path):
    return CliRunner().invoke(app, ["info", str(path)])


@pytest.fixture(scope="module")
def payload(tiny_ckpt) -> dict:
    return torch.load(tiny_ckpt, weights_only=True)


def odd_values(original) -> st.SearchStrategy:
    """What a crafted checkpoint may hold instead: another JSON value, a tensor of another shape or with NaNs,
    a string no UTF-8 encodes, a very long one."""
    tensors = st.sampled_from([torch.zeros(2, 3), torch.tensor(7), torch.full((1,), float("nan"))])
    if isinstance(original, torch.Tensor):
        tensors |= st.just(torch.full_like(original, float("nan")) if original.is_floating_point() else original + 1)
    return st.one_of(same_kind(original), json_values, tensors, st.sampled_from(["\udcff", "w" * 100_000, b"bytes"]))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), delete=st.booleans())
def test_every_checkpoint_field_mutated_gives_its_summary_or_one_line(payload, tmp_path_factory, data, delete):
    mutated = copy.deepcopy(payload)
    path = data.draw(st.sampled_from(paths_of(mutated)), label="field")
    value = data.draw(odd_values(field(mutated, path)), label="value")
    mutate(mutated, path, value, delete)
    ckpt = tmp_path_factory.mktemp("ckpt") / "mutated.pth"
    torch.save(mutated, ckpt)
    result = info(ckpt)
    if result.exit_code == 0:
        event("accepted")
        assert "vocab_size" in result.output and len(result.output) < 4000
    else:
        event("refused")
        one_line_error(result, str(ckpt))


def test_a_vocabulary_word_that_is_not_utf8_is_refused_when_the_checkpoint_is_loaded(payload, tmp_path):
    ckpt, out = tmp_path / "ck.pth", tmp_path / "bundle"
    torch.save({**payload, "vocab": {"itos": [*payload["vocab"]["itos"][:5], "caf\udce9", *payload["vocab"]["itos"][6:]]}},
               ckpt)
    one_line_error(info(ckpt), str(ckpt), "vocabulary word 5 is not valid UTF-8")
    one_line_error(CliRunner().invoke(app, ["build", "--ckpt", str(ckpt), "--out", str(out)]), str(ckpt))
    assert not out.exists()  # refused before the export, not after it


def test_a_pickled_global_named_with_control_characters_is_shown_escaped(tmp_path, monkeypatch):
    module = types.ModuleType("\x1b[2J\x1b[H")
    trick = type("ALL_CHECKS_PASSED", (), {"__module__": module.__name__})
    module.ALL_CHECKS_PASSED = trick
    monkeypatch.setitem(sys.modules, module.__name__, module)
    ckpt = tmp_path / "crafted.pth"
    torch.save({"format": FORMAT, "x": trick()}, ckpt)
    line = one_line_error(info(ckpt), str(ckpt), "pickles Python objects", "\\x1b[2J")
    assert "\x1b" not in line


def test_info_prints_a_bounded_part_of_any_training_record(payload, tmp_path):
    deep: list = []
    for _ in range(400):  # deeper than json.dumps recursed
        deep = [deep]
    ckpt = tmp_path / "big.pth"
    torch.save({**payload, "train": {"history": [[i, [float(i), [str(i)]]] for i in range(50_000)], "deep": deep,
                                     "note": "n" * 10_000, "weights": torch.zeros(1000)}}, ckpt)
    result = info(ckpt)
    assert result.exit_code == 0, result.output
    assert len(result.output) < 3000 and "49992 more" in result.output and f"{10_000} characters" in result.output
    assert "n" * (SHOWN_CHARS + 1) not in result.output and "<tensor [1000] float32>" in result.output
