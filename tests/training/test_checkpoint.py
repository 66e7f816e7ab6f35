import os
import pickle

import pytest
import torch

from tests.conftest import tiny_model
from training.checkpoint import FORMAT, load_checkpoint, read_payload, save_checkpoint
from training.errors import CheckpointError


def test_round_trip_gives_bit_identical_outputs(tiny_ckpt):
    ck = load_checkpoint(tiny_ckpt)
    model = ck.build_model()
    reference = tiny_model()  # same seed as the fixture
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(model.encode(images), reference.encode(images)):
            assert torch.equal(a, b)
        f, p, h, c = model.encode(images)
        tokens, h, c = torch.tensor([[1], [4], [5]]), h.unsqueeze(1), c.unsqueeze(1)
        for a, b in zip(model.step(tokens, h, c, f, p), reference.step(tokens, h, c, f, p)):
            assert torch.equal(a, b)
    assert ck.config == reference.config
    assert ck.train == {"epoch": 0}


def test_a_checkpoint_from_before_resize_modes_loads_with_todays_preprocessing(tiny_ckpt, tmp_path):
    payload = torch.load(tiny_ckpt, weights_only=True)
    del payload["config"]["preprocess"]["resize_mode"], payload["config"]["preprocess"]["reducing_gap"]
    torch.save(payload, tmp_path / "old.pth")
    assert load_checkpoint(tmp_path / "old.pth").config == load_checkpoint(tiny_ckpt).config


def _payload(tiny_ckpt):
    return torch.load(tiny_ckpt, weights_only=True)


def _write(tmp_path, name, obj=None, raw=None):
    path = tmp_path / name
    if raw is not None:
        path.write_bytes(raw)
    else:
        torch.save(obj, path)
    return path


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _cases(tiny_ckpt, tmp_path):
    good = tiny_ckpt.read_bytes()
    p = _payload(tiny_ckpt)
    wrong_shape = {**p, "state_dict": {**p["state_dict"], "fc.weight": torch.zeros(3, 3)}}
    missing_key = {**p, "state_dict": {k: v for k, v in p["state_dict"].items() if k != "fc.bias"}}
    return {
        "zero-byte": (_write(tmp_path, "empty.pth", raw=b""), "empty file"),
        "garbage": (_write(tmp_path, "garbage.pth", raw=os.urandom(4096)), "corrupt"),
        "truncated": (_write(tmp_path, "trunc.pth", raw=good[: len(good) // 2]), "truncated checkpoint (PytorchStreamReader"),
        "text": (_write(tmp_path, "notes.pth", raw=b"hello, not a checkpoint\n"), "corrupt"),
        "code-pickling": (_write(tmp_path, "evil.pth", {"format": FORMAT, "x": Evil()}), "pickles Python objects"),
        "raw-pickle": (_write(tmp_path, "raw.pkl", raw=pickle.dumps(Evil())), "corrupt"),
        "bare state_dict": (_write(tmp_path, "bare.pth", p["state_dict"]), "sat-export import"),
        "wrong format": (_write(tmp_path, "other.pth", {**p, "format": "something-else"}), "not a sat-export"),
        "future version": (_write(tmp_path, "v9.pth", {**p, "version": 9}), "version 9"),
        "not a dict": (_write(tmp_path, "list.pth", [1, 2]), "holds a list"),
        "missing key": (_write(tmp_path, "novocab.pth", {k: v for k, v in p.items() if k != "vocab"}), "missing keys"),
        "vocab a tensor": (_write(tmp_path, "tvocab.pth", {**p, "vocab": torch.zeros(2, 3)}), "invalid vocabulary"),
        "itos a string": (_write(tmp_path, "svocab.pth", {**p, "vocab": {"itos": "abc"}}), "invalid vocabulary"),
        "huge layer": (_write(tmp_path, "huge.pth", {**p, "config": {**p["config"], "att_dim": 10**30}}), "att_dim must be in"),
        "train a tensor": (_write(tmp_path, "ttrain.pth", {**p, "train": torch.zeros(2, 3)}), "training record is a Tensor"),
        "unknown config key": (_write(tmp_path, "cfg.pth", {**p, "config": {**p["config"], "colour": 1}}), "unknown config"),
        "wrong shape": (_write(tmp_path, "shape.pth", wrong_shape), "'fc.weight' has shape (3, 3)"),
        "missing tensor": (_write(tmp_path, "miss.pth", missing_key), "missing fc.bias"),
        "not found": (tmp_path / "nope.pth", "not found"),
    }


def test_every_bad_checkpoint_kind_is_refused_with_its_message(tiny_ckpt, tmp_path, capfd):
    for kind, (path, message) in _cases(tiny_ckpt, tmp_path).items():
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        text = str(info.value)
        assert str(path) in text, kind
        assert message in text, f"{kind}: {text}"
        assert "\n" not in text, kind
    assert "pwned" not in capfd.readouterr().out  # the pickled code never ran


def test_read_payload_never_uses_unsafe_unpickling(tiny_ckpt, tmp_path, monkeypatch):
    seen = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k.get("weights_only")) or real(*a, **k))
    read_payload(tiny_ckpt)
    assert seen == [True]


def test_save_refuses_vocab_size_mismatch(tmp_path):
    from training.vocab import Vocab
    with pytest.raises(ValueError, match="vocab"):
        save_checkpoint(tmp_path / "x.pth", tiny_model(), Vocab.build([["only"]]))


def test_a_pickle_cut_anywhere_is_truncated_not_corrupt():
    """Cut between two opcodes, pickle runs out of input; inside an opcode's argument (a string, a list of
    numbers) it says its data was truncated: both are a file that ends early."""
    from training.checkpoint import is_truncated

    data = pickle.dumps({"weights": list(range(300)), "name": "x" * 200}, protocol=2)
    kinds = set()
    for cut in range(1, len(data) - 1):
        with pytest.raises(Exception) as caught:
            pickle.loads(data[:cut])
        kinds.add(str(caught.value))
        assert is_truncated(caught.value), (cut, caught.value)
    assert {"Ran out of input", "pickle data was truncated"} <= kinds
