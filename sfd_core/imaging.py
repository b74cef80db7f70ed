"""Image decoding, the ADM center crop, and encoding for shards. PIL and numpy only (no torch).

Decoding policy (chosen to give the same pixels as torchvision's ``ImageFolder`` loader, which the official
extractor uses, so latents match the reference pipeline):
- the format is sniffed from the bytes, never the file name (ImageNet holds a PNG named ``.JPEG``);
- every mode goes through ``convert("RGB")``: CMYK, grayscale, palette and 1-bit become RGB; an alpha channel
  is *dropped* (not composited), exactly like ``pil_loader``; 16/32-bit integer images are scaled to 8 bit first
  (PIL would clip them);
- EXIF orientation is ignored, like ``pil_loader``;
- animated images give their first frame.
A file is skipped only when it cannot be decoded; each skip carries one of the ``SKIP_*`` reasons. Images
smaller than the crop are upsampled, as ADM does; callers count them with ``needs_upscale``.
"""
from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image

SKIP_EMPTY = "empty_file"
SKIP_TRUNCATED = "truncated"
SKIP_UNDECODABLE = "undecodable"
SKIP_TOO_MANY_PIXELS = "decompression_bomb"

IMAGE_FORMATS = ("jpg", "png")
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # PIL's own bomb threshold (~89.5 Mpx)


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM's crop (guided-diffusion ``image_datasets.py``), bit for bit: BOX-halve while the short side is at
    least twice the target, BICUBIC-resize the short side to ``image_size`` (sizes rounded), center crop with
    floor offsets."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size])


def needs_upscale(size: tuple[int, int], image_size: int) -> bool:
    """True when the crop has to enlarge the image (its short side is below the target)."""
    return min(size) < image_size


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # PIL's convert clips wide integers at 255; rescale the full range to 8 bit instead.
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    return image.convert("RGB")  # alpha is dropped, as torchvision's pil_loader does


def decode_image(data: bytes, name: str = "", max_pixels: int = DEFAULT_MAX_PIXELS
                 ) -> tuple[Image.Image | None, str | None]:
    """Bytes of any PIL-readable image -> (RGB image, None), or (None, reason) when it cannot be used.

    ``name`` (the file name) is deliberately not used to pick the format: the bytes decide. The RGB image's
    ``info`` holds ``source_mode`` and ``source_format``. Images with more than ``max_pixels`` pixels are
    refused before their pixels are decoded.
    """
    if not data:
        return None, SKIP_EMPTY
    try:
        with warnings.catch_warnings():
            # Size is checked below against max_pixels; PIL's own warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.size[0] * image.size[1] > max_pixels:
                return None, SKIP_TOO_MANY_PIXELS
            image.load()
    except Image.DecompressionBombError:
        return None, SKIP_TOO_MANY_PIXELS
    except OSError as err:  # UnidentifiedImageError is an OSError too
        return None, SKIP_TRUNCATED if "truncated" in str(err).lower() else SKIP_UNDECODABLE
    except (ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error):  # garbage headers in PIL plugins
        return None, SKIP_UNDECODABLE
    source_mode, source_format = image.mode, image.format
    rgb = _to_rgb(image)
    rgb.info = {"source_mode": source_mode, "source_format": source_format}
    return rgb, None


def encode_image(image: Image.Image, image_format: str = "jpg", jpeg_quality: int = 95) -> bytes:
    """RGB image -> JPEG or lossless PNG bytes; deterministic. JPEG keeps full-resolution colour (4:4:4): the
    crops feed the encoders, and PIL's default 4:2:0 would blur colour edges of the 256 px crops."""
    buffer = io.BytesIO()
    if image_format == "jpg":
        image.save(buffer, format="JPEG", quality=int(jpeg_quality), subsampling=0)
    elif image_format == "png":
        image.save(buffer, format="PNG", compress_level=6)
    else:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    return buffer.getvalue()


def load_rgb_array(data: bytes) -> np.ndarray:
    """Stored shard image bytes -> HxWx3 uint8, writable (torch.from_numpy warns on read-only arrays)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image.convert("RGB"))
