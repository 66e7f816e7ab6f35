import io

import numpy as np
import pytest
import torchvision.transforms as T
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from training.config import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig
from training.images import ImageDecodeError, load_image, load_rgb, preprocess, to_rgb

CFG = PreprocessConfig(resize=40, crop=32)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gradient(mode: str, size=(60, 45)) -> Image.Image:
    x = np.linspace(0, 1, size[0])[None, :] * np.ones((size[1], 1))
    if mode == "I;16":
        return Image.fromarray((x * 65535).astype("<u2"))
    if mode == "I":
        return Image.fromarray((x * 1e6).astype(np.int32))
    if mode == "F":
        return Image.fromarray(x.astype(np.float32))
    rgb = Image.fromarray((np.stack([x, 1 - x, x * 0.5], -1) * 255).astype(np.uint8))
    return rgb.convert(mode)


MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I", "F", "RGBa", "HSV", "LAB"]
SAVABLE = {"1": "PNG", "L": "PNG", "LA": "PNG", "P": "PNG", "RGB": "JPEG", "RGBA": "PNG", "CMYK": "JPEG",
           "I;16": "PNG", "I": "TIFF", "F": "TIFF"}


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_gives_3xHxW_float32(mode):
    img = _gradient(mode)
    assert img.mode == mode
    out = preprocess(to_rgb(img), CFG)
    assert out.shape == (3, 32, 32) and out.dtype == np.float32
    assert np.isfinite(out).all()
    assert out.std() > 0.05, "the gradient survived conversion"


@pytest.mark.parametrize("mode", sorted(SAVABLE))
def test_every_savable_mode_decodes_from_file(mode, tmp_path):
    path = tmp_path / f"img.{SAVABLE[mode].lower()}"
    _gradient(mode).save(path, format=SAVABLE[mode])
    out = load_image(path, CFG)
    assert out.shape == (3, 32, 32) and out.dtype == np.float32 and out.std() > 0.05


def test_16_bit_greyscale_is_rescaled_not_clipped_to_white():
    rgb = load_rgb(_encode(_gradient("I;16"), "PNG"))
    arr = np.asarray(rgb)
    assert arr.min() < 10 and arr.max() > 245


def test_transparency_composited_on_white():
    img = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    assert np.asarray(load_rgb(_encode(img, "PNG")))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    upright = load_rgb(_encode(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert upright.size == (20, 40)
    arr = np.asarray(upright).mean(axis=(1, 2))
    assert arr[:20].mean() > 200 > 50 > arr[20:].mean()  # white half now on top


def test_resize_short_side_then_centre_crop_and_normalise():
    img = Image.new("RGB", (80, 40), (124, 116, 104))  # ImageNet mean colour
    out = preprocess(img, CFG)
    assert out.shape == (3, 32, 32)
    np.testing.assert_allclose(out, 0.0, atol=0.01)


def _photo(size) -> Image.Image:
    """A noisy gradient: every resampling difference shows."""
    w, h = size
    rng = np.random.default_rng(w * 7919 + h)
    x = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3)) * [1.0, 0.5, 0.2]
    return Image.fromarray(np.clip(x + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8))


def _normalise(img: Image.Image) -> np.ndarray:  # (3, h, w), as every mode ends
    return T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(img).numpy()


@pytest.mark.parametrize("size", [(90, 60), (60, 90), (1600, 1000), (700, 1700)])
def test_squash_is_the_whole_image_resized_then_centre_cropped(size):
    img = _photo(size)
    exact = PreprocessConfig(resize=48, crop=48, resize_mode="squash", reducing_gap=None)
    np.testing.assert_array_equal(preprocess(img, exact), _normalise(img.resize((48, 48), Image.Resampling.BILINEAR)))
    squash_crop = PreprocessConfig(resize=48, crop=40, resize_mode="squash", reducing_gap=None)
    np.testing.assert_array_equal(preprocess(img, squash_crop), preprocess(img, exact)[:, 4:44, 4:44])
    if max(size) >= 3 * 2 * 48:  # Pillow reduces by an integer factor first: close, not equal
        fast = preprocess(img, PreprocessConfig(resize=48, crop=48, resize_mode="squash"))
        assert 0 < np.abs(fast - preprocess(img, exact)).max() < 0.2


@settings(max_examples=60, deadline=None)
@given(st.integers(31, 160), st.integers(31, 160), st.integers(31, 48))
def test_torchvision_mode_equals_resize_centercrop_totensor_normalize(w, h, crop):
    img = _photo((w, h))
    cfg = PreprocessConfig(resize=48, crop=crop, resize_mode="torchvision", reducing_gap=None)
    expected = _normalise(T.CenterCrop(crop)(T.Resize(48)(img)))
    np.testing.assert_array_equal(preprocess(img, cfg), expected)


def test_preprocess_config_refuses_unknown_modes_and_gaps():
    with pytest.raises(ValueError, match="resize_mode must be one of shorter_side, squash, torchvision"):
        PreprocessConfig(resize_mode="stretch")
    with pytest.raises(ValueError, match="reducing_gap must be None or at least 1.0"):
        PreprocessConfig(reducing_gap=0.5)


@pytest.mark.parametrize("data,message", [
    (b"", "cannot identify"),
    (b"not an image at all", "cannot identify"),
])
def test_bad_bytes_raise_image_decode_error(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        load_rgb(data)


def test_truncated_and_bomb_images_are_refused(tmp_path):
    png = _encode(_gradient("RGB", (300, 300)), "PNG")
    with pytest.raises(ImageDecodeError, match="decode"):
        load_rgb(png[: len(png) // 2])
    with pytest.raises(ImageDecodeError, match="over the limit of 1000"):
        load_rgb(png, max_pixels=1000)
    with pytest.raises(ImageDecodeError, match="not found"):
        load_image(tmp_path / "missing.jpg", CFG)


def _large_photo(size=(2400, 1800), seed=0) -> Image.Image:
    """A smooth photo-like picture with some texture, big enough for reduced-size JPEG decoding."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    noise = rng.normal(0, 6, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(small, np.float64) + noise, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("short_side,decoded", [(None, (2400, 1800)), (1000, (2400, 1800)), (900, (1200, 900)),
                                                (450, (600, 450)), (100, (300, 225))])
def test_a_jpeg_is_decoded_at_the_smallest_scale_that_keeps_the_short_side(short_side, decoded):
    jpeg = _encode(_large_photo(), "JPEG", quality=90)
    assert load_rgb(jpeg, short_side=short_side).size == decoded
    assert load_rgb(_encode(_large_photo(), "PNG"), short_side=100).size == (2400, 1800)  # other formats: every pixel
    with pytest.raises(ImageDecodeError, match="2400x1800 = 4320000 pixels"):  # the limit is on the full image
        load_rgb(jpeg, max_pixels=4_000_000, short_side=100)


def test_reduced_size_decoding_follows_exif_rotation():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    jpeg = _encode(_large_photo((2400, 1800)), "JPEG", quality=90, exif=exif)
    assert load_rgb(jpeg, short_side=450).size == (450, 600) and load_rgb(jpeg).size == (1800, 2400)


def test_compare_reduced_size_vs_full_decoding_of_what_the_model_sees():
    cfg = PreprocessConfig(resize=128, crop=128)
    assert cfg.draft_short_side == 256 and PreprocessConfig(draft_margin=None).draft_short_side is None
    jpeg = _encode(_large_photo(), "JPEG", quality=90)
    full = preprocess(load_rgb(jpeg), cfg)
    drafted = load_image(jpeg, cfg)  # decoded at 1/4: 600x450, still >= 2 x 128 on the short side
    assert load_rgb(jpeg, short_side=cfg.draft_short_side).size == (600, 450)
    diff = np.abs(full - drafted) * np.asarray(IMAGENET_STD, np.float32)[:, None, None] * 255  # in grey levels
    assert diff.max() <= 6 and diff.mean() <= 0.5 and not np.array_equal(full, drafted)


def test_heic_photos_are_read_through_the_plugin_and_their_suffixes_are_listed(tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif", reason="the [heic] extra (pillow-heif) is not installed")
    from training.images import HEIF_PLUGIN, image_suffixes

    pillow_heif.register_heif_opener()
    _large_photo((64, 48)).save(tmp_path / "a.heic", format="HEIF", quality=90)
    assert HEIF_PLUGIN and {".heic", ".heif"} <= image_suffixes()
    assert load_rgb(tmp_path / "a.heic").size == (64, 48)
    assert load_image(tmp_path / "a.heic", CFG).shape == (3, 32, 32)


def test_without_the_plugin_a_heic_photo_is_refused_naming_the_extra(tmp_path):
    import subprocess
    import sys

    pillow_heif = pytest.importorskip("pillow_heif", reason="writing the HEIC test file needs pillow-heif")
    pillow_heif.register_heif_opener()
    _large_photo((64, 48)).save(tmp_path / "a.heic", format="HEIF")
    script = ("import sys; sys.modules['pillow_heif'] = None\n"  # as without the extra
              "from training.images import image_suffixes, load_rgb\n"
              "assert '.heic' in image_suffixes()\n"
              f"load_rgb({str(tmp_path / 'a.heic')!r})\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "pip install 'sat-export[heic]'" in done.stderr and "HEIC/HEIF image" in done.stderr
