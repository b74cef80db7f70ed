from __future__ import annotations

import io

import numpy as np
from PIL import Image

from sfd_core.imaging import (SKIP_EMPTY, SKIP_TOO_MANY_PIXELS, SKIP_TRUNCATED, SKIP_UNDECODABLE,
                              center_crop_arr, decode_image, encode_image, needs_upscale)


def _noise(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_center_crop_follows_adm_steps_by_hand():
    # 600x1000 at 128: BOX-halve twice (600 -> 300 -> 150, stops below 256), bicubic to short side 128
    # (width round(250 * 128 / 150) = 213), crop offsets (213 - 128) // 2 = 42 and 0.
    image = _noise(600, 1000)
    halved = image.resize((500, 300), Image.BOX).resize((250, 150), Image.BOX)
    resized = np.asarray(halved.resize((213, 128), Image.BICUBIC))
    expected = resized[0:128, 42:170]
    got = center_crop_arr(image, 128)
    assert got.size == (128, 128)
    np.testing.assert_array_equal(np.asarray(got), expected)


def test_center_crop_upscales_small_images_with_floor_offsets():
    image = _noise(9, 14, seed=1)
    # scale 32/9: width round(14 * 32 / 9) = 50, x offset (50 - 32) // 2 = 9
    expected = np.asarray(image.resize((50, 32), Image.BICUBIC))[:, 9:41]
    np.testing.assert_array_equal(np.asarray(center_crop_arr(image, 32)), expected)
    assert needs_upscale(image.size, 32) and not needs_upscale((40, 32), 32)


def test_decode_reasons_for_bad_bytes(tmp_path):
    jpeg = encode_image(_noise(64, 64), "jpg")
    assert decode_image(b"", "zero.JPEG") == (None, SKIP_EMPTY)
    assert decode_image(jpeg[: len(jpeg) // 2], "half.JPEG") == (None, SKIP_TRUNCATED)
    assert decode_image(np.random.default_rng(2).bytes(300), "junk.JPEG") == (None, SKIP_UNDECODABLE)
    assert decode_image(jpeg, "big.JPEG", max_pixels=64 * 64 - 1) == (None, SKIP_TOO_MANY_PIXELS)
    image, reason = decode_image(jpeg, "ok.JPEG")
    assert reason is None and image.mode == "RGB" and image.info["source_format"] == "JPEG"


def test_decode_converts_modes_like_torchvision_and_drops_alpha():
    rgba = np.random.default_rng(3).integers(0, 256, (20, 30, 4), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgba).save(buffer, "PNG")
    image, _ = decode_image(buffer.getvalue(), "rgba.JPEG")  # PNG named .JPEG: the bytes decide
    assert image.info == {"source_mode": "RGBA", "source_format": "PNG"}
    np.testing.assert_array_equal(np.asarray(image), rgba[..., :3])

    cmyk = _noise(16, 16, seed=4).convert("CMYK")
    buffer = io.BytesIO()
    cmyk.save(buffer, "JPEG", quality=100)
    image, _ = decode_image(buffer.getvalue())
    reference = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")  # torchvision's pil_loader
    np.testing.assert_array_equal(np.asarray(image), np.asarray(reference))

    wide = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    buffer = io.BytesIO()
    Image.fromarray(wide).save(buffer, "PNG")
    image, _ = decode_image(buffer.getvalue())
    expected = np.rint(wide.astype(np.float64) * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(image)[..., 1], expected)  # scaled, not clipped at 255


def test_encode_png_is_lossless_and_jpeg_is_close():
    image = _noise(8, 8, seed=5).resize((64, 64), Image.BILINEAR)
    png = Image.open(io.BytesIO(encode_image(image, "png")))
    np.testing.assert_array_equal(np.asarray(png), np.asarray(image))
    jpg = np.asarray(Image.open(io.BytesIO(encode_image(image, "jpg", 95))), dtype=np.float64)
    assert np.abs(jpg - np.asarray(image, dtype=np.float64)).mean() < 1.5
    assert encode_image(image, "jpg") == encode_image(image, "jpg")
