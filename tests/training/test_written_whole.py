"""Files written whole (``training.files``): a link or FIFO planted where a fixed temporary name would be is never
followed or opened, a failed write leaves nothing, and checkpoints and bundle manifests are written this way."""
from __future__ import annotations

import os
import stat

import pytest

from sat_export.bundle.format import read_manifest, write_manifest
from tests.conftest import tiny_model
from training.checkpoint import load_checkpoint, save_checkpoint
from training.files import UMASK, write_atomically


def plant(path, victim):
    """Links (and a FIFO) at the temporary names a writer of ``path`` used to use or might use."""
    victim.write_bytes(b"keep me")
    os.symlink(victim, path.with_name(path.name + ".tmp"))
    os.mkfifo(path.with_name("." + path.name + ".tmp"))


def test_a_write_replaces_the_file_whole_with_normal_permissions_and_a_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out.bin"
    plant(target, tmp_path / "victim")
    write_atomically(target, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new" and (tmp_path / "victim").read_bytes() == b"keep me"
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~UMASK
    before = sorted(os.listdir(tmp_path))

    def fail(f):
        f.write(b"half")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        write_atomically(target, fail)
    assert sorted(os.listdir(tmp_path)) == before and target.read_bytes() == b"new"


def test_checkpoints_and_manifests_never_follow_a_link_at_their_old_temporary_name(tmp_path, vocab, tiny_bundle):
    ckpt = tmp_path / "model.pth"
    plant(ckpt, tmp_path / "victim")
    save_checkpoint(ckpt, tiny_model(), vocab)
    assert (tmp_path / "victim").read_bytes() == b"keep me" and len(load_checkpoint(ckpt).vocab) == len(vocab)

    manifest = read_manifest(tiny_bundle)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for name in manifest["files"]:
        (bundle / name).write_bytes((tiny_bundle / name).read_bytes())
    plant(bundle / "manifest.json", tmp_path / "victim2")
    write_manifest(bundle, {k: v for k, v in manifest.items() if k not in ("files",)})
    assert (tmp_path / "victim2").read_bytes() == b"keep me"
    for planted in bundle.glob("*manifest.json.tmp"):  # a bundle holding links is refused when read
        planted.unlink()
    assert read_manifest(bundle)["files"] == manifest["files"]
