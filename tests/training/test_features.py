import os

import pytest
import torch

from tests.conftest import tiny_model
from training.data import ImageInputs
from training.features import build_feature_cache, cache_key
from training.options import TrainConfig
from training.shapes import make_shapes
from training.train import train


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes") / "s", 24, seed=11, size=64)


def test_cached_features_equal_the_backbone_output_in_float16(shapes, tmp_path):
    model = tiny_model()
    paths = sorted((shapes / "images").glob("*.jpg"))[:10]
    cache = build_feature_cache(model, paths, tmp_path, batch_size=4)
    images = torch.stack([ImageInputs(paths, model.config.preprocess)[i] for i in range(10)])
    with torch.no_grad():
        expected = model.grid_features(images)  # (10, 16, 48)
    assert len(cache) == 10 and cache[3].shape == (16, 48) and cache[3].dtype == torch.float32
    torch.testing.assert_close(torch.stack([cache[i] for i in range(10)]), expected, rtol=2e-3, atol=2e-3)
    assert cache.array.dtype == "float16" and cache.meta_path.with_suffix(".f16").stat().st_size == 10 * 16 * 48 * 2


def test_cache_is_reused_and_keyed_by_weights_preprocessing_and_images(shapes, tmp_path):
    model = tiny_model()
    paths = sorted((shapes / "images").glob("*.jpg"))[:4]
    first = build_feature_cache(model, paths, tmp_path)
    stamp = os.stat(first.meta_path.with_suffix(".f16")).st_mtime_ns
    again = build_feature_cache(model, paths, tmp_path)
    assert again.meta_path == first.meta_path and os.stat(again.meta_path.with_suffix(".f16")).st_mtime_ns == stamp
    assert build_feature_cache(model, paths[:3], tmp_path).meta_path != first.meta_path  # other images
    other_weights = tiny_model(seed=1)
    other_grid = tiny_model(grid=2)
    keys = {cache_key(model), cache_key(other_weights), cache_key(other_grid)}
    assert len(keys) == 3
    with torch.no_grad():
        model.backbone[0][0].weight[0, 0, 0, 0] += 1e-3
    assert cache_key(model) != first.meta_path.parent.name


def test_training_from_the_cache_gives_the_loss_of_encoding_on_the_fly(shapes, tmp_path):
    common = dict(data=str(shapes), backbone="mobilenet_v3_small_s16", grid=4, resize=64, crop=64, epochs=2,
                  batch_size=8, val_frac=0.25, test_frac=0.0, dropout=0.0, lr=3e-3, cache_dir=str(tmp_path / "c"),
                  threads=1)
    cached = train(TrainConfig(out=str(tmp_path / "a"), cache=True, **common))
    assert len(list((tmp_path / "c").rglob("*.f16"))) == 1
    on_the_fly = train(TrainConfig(out=str(tmp_path / "b"), cache=False, **common))
    assert len(list((tmp_path / "c").rglob("*.f16"))) == 1  # no cache written when encoding on the fly
    for key in ("train_nll", "val_loss"):
        assert cached[key] == pytest.approx(on_the_fly[key], rel=2e-3)
