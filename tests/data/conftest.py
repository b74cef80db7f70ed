"""Fixtures of the data tests: an ImageNet-style folder with planted bad files, and shard readers."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = ["n00000001", "n00000002", "n00000003"]


def photo(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth random colours (JPEG-friendly, so crops are not all noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size (PIL refuses it as a decompression bomb before decoding)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def write_planted_folder(root: Path) -> dict:
    """Three classes; every bad-file kind once. Returns what a correct sharder must report."""
    for c in CLASSES:
        (root / c).mkdir(parents=True)
    good = {
        # class 0: plain JPEGs, one big enough for ADM's BOX halving at the test resolution, one tiny (upscaled)
        "n00000001/n00000001_1.JPEG": encoded(Image.fromarray(photo(90, 120, 1)), "JPEG", quality=92),
        "n00000001/n00000001_2.JPEG": encoded(Image.fromarray(photo(200, 150, 2)), "JPEG", quality=92),
        "n00000001/n00000001_3.JPEG": encoded(Image.fromarray(photo(9, 13, 3)), "JPEG", quality=92),
        # class 1: colour modes
        "n00000002/n00000002_1.JPEG": encoded(Image.fromarray(photo(70, 60, 4)).convert("CMYK"), "JPEG"),
        "n00000002/n00000002_2.JPEG": encoded(Image.fromarray(photo(64, 80, 5)).convert("L"), "JPEG"),
        "n00000002/n00000002_3.png": encoded(Image.fromarray(photo(48, 64, 6)).quantize(16), "PNG"),
        "n00000002/n00000002_4.png": encoded(Image.fromarray(
            np.dstack([photo(50, 50, 7), photo(50, 50, 8)[..., :1]])), "PNG"),
        # class 2: a PNG named .JPEG (as in ImageNet), 16-bit grayscale, a non-ImageNet name
        "n00000003/n00000003_1.JPEG": encoded(Image.fromarray(photo(40, 56, 9)), "PNG"),
        "n00000003/n00000003_2.png": encoded(Image.fromarray(photo(40, 40, 10)[..., 0].astype(np.uint16) * 257),
                                             "PNG"),
        "n00000003/cat.photo.jpg": encoded(Image.fromarray(photo(36, 36, 11)), "JPEG"),
    }
    truncated_source = encoded(Image.fromarray(photo(64, 64, 12)), "JPEG")
    rng = np.random.default_rng(13)
    bad = {
        "n00000001/n00000001_4.JPEG": ("truncated", truncated_source[: len(truncated_source) // 2]),
        "n00000001/n00000001_5.JPEG": ("undecodable", rng.bytes(700)),
        "n00000002/n00000002_5.JPEG": ("empty_file", b""),
        "n00000003/n00000003_3.png": ("decompression_bomb", png_claiming_size(30000, 30000)),
        "n00000003/notes.txt": ("unsupported_extension", b"not an image"),
    }
    for rel, data in good.items():
        (root / rel).write_bytes(data)
    for rel, (_, data) in bad.items():
        (root / rel).write_bytes(data)
    return {
        "good": sorted(good),
        "skipped": {rel: reason for rel, (reason, _) in bad.items()},
        "keys": {"n00000001/n00000001_1.JPEG": "n00000001_1", "n00000003/cat.photo.jpg": "n00000003_cat_photo"},
        "modes": {"n00000002/n00000002_1.JPEG": "CMYK", "n00000002/n00000002_2.JPEG": "L",
                  "n00000002/n00000002_3.png": "P", "n00000002/n00000002_4.png": "RGBA",
                  "n00000003/n00000003_2.png": "I;16"},
        "upscaled": ["n00000001/n00000001_3.JPEG"],
    }


@pytest.fixture
def planted(tmp_path):
    root = tmp_path / "imagenet"
    expected = write_planted_folder(root)
    return root, expected


def _read_samples(manifest: dict) -> list[dict]:
    from storage.shards import iter_shard

    samples = []
    for url, count in zip(manifest["artifacts"]["shards"], manifest["counts"]["per_shard"]):
        shard = list(iter_shard(url))
        assert len(shard) == count, url
        samples.extend(shard)
    return samples


@pytest.fixture
def read_samples():
    """manifest -> every sample of its shards in order (raw bytes per extension), checked against the counts."""
    return _read_samples
