"""Image decoding and preprocessing: the one function every path (training, export, inference) uses.

Decoding handles EXIF orientation, every Pillow mode (16-bit and float greyscale are rescaled,
transparency is composited on white), and refuses decompression bombs above a pixel limit (of the
full image, whatever size it is then decoded at). The preprocessing parameters come from the model
config (``PreprocessConfig``), never retyped; ``load_image`` decodes a large JPEG at reduced size
(``PreprocessConfig.draft_margin``), since libjpeg can skip most of the work for pixels the model's
resize would average away anyway.

HEIC/HEIF photos (iPhones) are read through the ``pillow-heif`` plugin, the ``[heic]`` extra, when
it is installed; without it such a file is refused with a message naming the extra. AVIF is read
by Pillow itself.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from training.config import PreprocessConfig
from training.errors import ImageDecodeError, first_line

try:  # the [heic] extra: registering the plugin is what lets Pillow open HEIC/HEIF
    import pillow_heif
except ImportError:
    HEIF_PLUGIN = False
else:
    pillow_heif.register_heif_opener()
    HEIF_PLUGIN = True

HEIF_SUFFIXES = frozenset({".heic", ".heif", ".hif"})  # listed even without the plugin: their rows say what to install
HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default warning threshold (~0.25 GiB of RGB24)
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
             "nearest": Image.Resampling.NEAREST}


def image_suffixes() -> frozenset[str]:
    """File name suffixes of every format Pillow can open, lower case with the dot, and HEIC/HEIF's."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN) | HEIF_SUFFIXES


def load_rgb(source: str | Path | bytes | BinaryIO, max_pixels: int = DEFAULT_MAX_PIXELS,
             short_side: int | None = None) -> Image.Image:
    """Open and decode an image as upright 8-bit RGB, or raise ``ImageDecodeError``.

    ``short_side``: a JPEG may be decoded at the smallest DCT scale (1/2, 1/4, 1/8) that leaves at
    least this many pixels on its short side (``PreprocessConfig.draft_short_side``); other formats,
    and None, decode every pixel. The pixel limit always applies to the full image.
    """
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with Image.open(fp) as img:
            if img.width * img.height > max_pixels:
                raise ImageDecodeError(
                    f"image has {img.width}x{img.height} = {img.width * img.height} pixels, "
                    f"over the limit of {max_pixels} (decompression bomb?)")
            if short_side is not None:
                _draft(img, short_side)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img.load()
            ImageOps.exif_transpose(img, in_place=True)  # the default copies even an upright image
            return img if img.mode == "RGB" else to_rgb(img)  # convert() would copy an RGB image
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError("file not found") from None
    except Image.UnidentifiedImageError:
        if not HEIF_PLUGIN and _is_heif(fp):
            raise ImageDecodeError("HEIC/HEIF image: reading it needs the [heic] extra "
                                   "(pip install 'sat-export[heic]')") from None
        raise ImageDecodeError("cannot identify image file (not an image or unsupported format)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageDecodeError(f"cannot decode image: {first_line(err)}") from None


def _draft(img: Image.Image, short_side: int) -> None:
    """Ask a JPEG decoder for the smallest scale leaving ``short_side`` pixels (a no-op for other formats).

    On the stored orientation (EXIF is applied after decoding); requesting exactly ``floor(w / s)``
    by ``floor(h / s)`` makes Pillow choose the scale ``s``.
    """
    w, h = img.size
    scale = next((s for s in (8, 4, 2) if min(w, h) >= s * short_side), None)
    if scale is not None:
        img.draft(img.mode, (w // scale, h // scale))


def _is_heif(fp) -> bool:
    """An ISO base-media file whose brand is HEIC/HEIF (bytes 4-12: ``ftyp`` and the brand)."""
    try:
        if isinstance(fp, (str, Path)):
            with open(fp, "rb") as f:
                head = f.read(12)
        else:
            fp.seek(0)
            head = fp.read(12)
    except OSError:
        return False
    return head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (16-bit/int/float greyscale rescaled, alpha composited on white)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise ImageDecodeError("image has NaN or infinite pixel values")
        lo, hi = (0.0, 65535.0) if img.mode.startswith("I;16") else (arr.min(), arr.max())
        arr = np.clip((arr - lo) / max(hi - lo, 1e-12) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)  # mode L
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def preprocess(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """RGB image -> normalised ``(3, crop, crop)`` float32: resize and centre crop as
    ``cfg.placement`` says (``cfg.resize_mode``), then mean/std."""
    size, (left, top) = cfg.placement(img.size)
    img = img.resize(size, _RESAMPLE[cfg.interpolation], reducing_gap=cfg.reducing_gap)
    img = img.crop((left, top, left + cfg.crop, top + cfg.crop))
    arr = np.asarray(img, dtype=np.float32) / 255.0  # (crop, crop, 3)
    arr = (arr - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))  # (3, crop, crop)


def load_image(source: str | Path | bytes | BinaryIO, cfg: PreprocessConfig,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode (at reduced size where ``cfg`` allows) and preprocess: the model's input for one image."""
    return preprocess(load_rgb(source, max_pixels, cfg.draft_short_side), cfg)
