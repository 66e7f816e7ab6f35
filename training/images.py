"""Image decoding and preprocessing: the one function every path (training, export, inference) uses.

Decoding handles EXIF orientation, every Pillow mode (16-bit and float greyscale are rescaled,
transparency is composited on white), and refuses decompression bombs above a pixel limit.
The preprocessing parameters come from the model config (``PreprocessConfig``), never retyped.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from training.config import PreprocessConfig
from training.errors import ImageDecodeError

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default warning threshold (~0.25 GiB of RGB24)
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
             "nearest": Image.Resampling.NEAREST}


def image_suffixes() -> frozenset[str]:
    """File name suffixes of every format Pillow can open, lower case with the dot."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def load_rgb(source: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image as upright 8-bit RGB, or raise ``ImageDecodeError``."""
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with Image.open(fp) as img:
            if img.width * img.height > max_pixels:
                raise ImageDecodeError(
                    f"image has {img.width}x{img.height} = {img.width * img.height} pixels, "
                    f"over the limit of {max_pixels} (decompression bomb?)")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError("file not found") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError("cannot identify image file (not an image or unsupported format)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageDecodeError(f"cannot decode image: {err}") from None


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


def load_image(source: str | Path | bytes, cfg: PreprocessConfig, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode and preprocess in one call: the model's input for one image."""
    return preprocess(load_rgb(source, max_pixels), cfg)
