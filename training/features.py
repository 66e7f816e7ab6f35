"""A frozen-encoder feature cache: grid features extracted once, memory-mapped float16 on disk.

Layout: ``root/<key>/<images>.f16`` (raw ``(n_img, n_pix, enc_dim)`` float16) and ``<images>.json``
(shape, image list). ``key`` hashes the backbone's weights, its name, the grid and the
preprocessing, so any change to what the encoder computes lands in a new folder; ``<images>``
hashes the image paths, sizes and modification times. The ``.json`` is written last: a cache
without it is incomplete and rebuilt.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from training.data import ImageInputs
from training.model import ShowAttendTell


def cache_key(model: ShowAttendTell) -> str:
    """Hash of everything that decides the grid features: backbone weights, grid, preprocessing."""
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    h.update(json.dumps({k: cfg[k] for k in ("backbone", "grid", "preprocess")}, sort_keys=True).encode())
    for name, tensor in sorted(model.backbone.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _images_key(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = Path(p).stat()
        h.update(f"{Path(p).resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


class FeatureCache:
    """Read-only grid features by image index: ``cache[i] -> (n_pix, enc_dim)`` float32."""

    def __init__(self, meta_path: Path):
        self.meta_path = Path(meta_path)
        meta = json.loads(self.meta_path.read_text())
        self.images = meta["images"]
        self.array = np.memmap(self.meta_path.with_suffix(".f16"), dtype=np.float16, mode="r",
                               shape=tuple(meta["shape"]))  # (n_img, n_pix, enc_dim)

    def __len__(self) -> int:
        return self.array.shape[0]

    def __getitem__(self, i: int) -> Tensor:
        return torch.from_numpy(self.array[i].astype(np.float32))  # (n_pix, enc_dim)


@torch.no_grad()
def build_feature_cache(model: ShowAttendTell, paths: Sequence[Path], root: str | Path,
                        batch_size: int = 64, progress=None) -> FeatureCache:
    """Grid features of ``paths`` through ``model``'s frozen backbone, cached under ``root``.

    Reuses a complete cache with the same key and images. ``progress`` (optional) is called with
    the number of images done after each batch.
    """
    meta_path = Path(root) / cache_key(model) / f"{_images_key(paths)}.json"
    if meta_path.is_file():
        return FeatureCache(meta_path)
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    shape = (len(paths), model.config.n_pix, model.config.enc_dim)
    tmp = meta_path.with_suffix(".f16.tmp")
    array = np.memmap(tmp, dtype=np.float16, mode="w+", shape=shape)  # (n_img, n_pix, enc_dim)
    inputs = ImageInputs(paths, model.config.preprocess)
    was_training = model.backbone.training
    model.backbone.eval()
    try:
        for start in range(0, len(paths), batch_size):
            stop = min(start + batch_size, len(paths))
            images = torch.stack([inputs[i] for i in range(start, stop)])  # (n, 3, crop, crop)
            array[start:stop] = model.grid_features(images).numpy().astype(np.float16)  # (n, n_pix, enc_dim)
            if progress is not None:
                progress(stop)
    finally:
        model.backbone.train(was_training)
    array.flush()
    del array
    tmp.replace(meta_path.with_suffix(".f16"))
    meta = {"shape": list(shape), "dtype": "float16", "images": [str(p) for p in paths]}
    meta_path.write_text(json.dumps(meta) + "\n")
    return FeatureCache(meta_path)
