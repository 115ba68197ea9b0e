"""Image decoding: every PIL mode to RGB, bad bytes to ImageError, sizes to the bucket, the GPU path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sd3.data.images import (
    ImageError,
    decode_jpegs_on_device,
    decode_rgb,
    fit_to_bucket,
    gpu_decodable,
    jpeg_components,
    open_rgb,
    sniff_format,
    to_model_range,
)
from tests.data_helpers import encode, photo

W, H = 40, 24
RGB = photo(W, H)
GREY = np.asarray(RGB.convert("L"))


def _mode_image(mode: str) -> Image.Image:
    if mode in ("I;16", "I;16B"):
        return Image.fromarray(GREY.astype(np.uint16) * 257)           # full 16-bit range
    if mode == "I":
        return Image.fromarray(GREY.astype(np.int32) * 257)
    if mode == "F":
        return Image.fromarray(GREY.astype(np.float32) / 255.0)
    if mode == "PA":
        return RGB.convert("P").convert("PA")
    return RGB.convert(mode)


# Every PIL mode that an image file can hold, in a format that keeps it.
MODE_FORMATS = [("1", "PNG"), ("L", "PNG"), ("L", "JPEG"), ("P", "PNG"), ("P", "GIF"), ("RGB", "PNG"),
                ("RGB", "JPEG"), ("RGB", "WEBP"), ("RGB", "BMP"), ("RGBA", "PNG"), ("RGBA", "WEBP"),
                ("CMYK", "JPEG"), ("CMYK", "TIFF"), ("YCbCr", "TIFF"), ("LAB", "TIFF"), ("I", "TIFF"),
                ("F", "TIFF"), ("LA", "PNG"), ("PA", "TIFF"), ("I;16", "PNG"), ("I;16B", "TIFF"),
                ("RGBX", "TIFF")]


@pytest.mark.parametrize(("mode", "fmt"), MODE_FORMATS)
def test_every_mode_decodes_to_rgb_of_the_right_size(mode, fmt):
    data = encode(_mode_image(mode), fmt)
    img = decode_rgb(data)
    assert img.shape == (3, H, W) and img.dtype == torch.uint8
    # Content survives: close to the photo (grey modes: to its luminance; 1-bit and palettes: loosely).
    ref = np.asarray(RGB, np.float32).transpose(2, 0, 1)
    if mode in ("L", "LA", "I", "F", "I;16", "I;16B", "1"):
        ref = np.broadcast_to(GREY.astype(np.float32), ref.shape)
    out = img.numpy().astype(np.float32)
    if mode == "1":  # dithered black and white: only the overall brightness survives
        assert abs(out.mean() - ref.mean()) < 20
    else:
        assert np.abs(out - ref).mean() < 25, (mode, fmt)


def test_transparency_is_composited_on_white():
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert decode_rgb(encode(clear, "PNG")).min() == 255
    half = Image.new("RGBA", (8, 8), (0, 0, 0, 128))
    assert abs(int(decode_rgb(encode(half, "PNG"))[0, 0, 0]) - 127) <= 1
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0] * 256)
    assert decode_rgb(encode(palette, "PNG", transparency=0)).min() == 255


def test_16_bit_is_rescaled_not_clipped():
    mid = Image.fromarray(np.full((4, 4), 32768, np.uint16))
    assert abs(int(decode_rgb(encode(mid, "PNG"))[0, 0, 0]) - 128) <= 1


def test_cmyk_colours_are_converted():
    red = Image.new("RGB", (16, 16), (200, 30, 40))
    out = decode_rgb(encode(red.convert("CMYK"), "JPEG", quality=95))
    assert np.allclose(out[:, 8, 8].numpy(), [200, 30, 40], atol=8)


def test_exif_rotation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(RGB, "JPEG", exif=exif.tobytes())
    assert decode_rgb(data).shape == (3, W, H)
    assert open_rgb(data).size == (H, W)


def test_fast_and_fallback_paths_agree():
    data = encode(RGB, "JPEG", quality=95)
    fast = decode_rgb(data)                                       # torchvision
    slow = torch.from_numpy(np.array(open_rgb(data))).permute(2, 0, 1)   # PIL
    assert (fast.int() - slow.int()).abs().float().mean() < 2.0


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_bad_bytes_raise_image_error(fmt):
    good = encode(RGB, fmt)
    for bad in (b"", None, good[: len(good) // 2], good[:40], b"this is not an image", bytes(range(256)) * 4):
        with pytest.raises(ImageError):
            decode_rgb(bad)


def test_sniff_format():
    assert sniff_format(encode(RGB, "JPEG")) == "jpeg"
    assert sniff_format(encode(RGB, "PNG")) == "png"
    assert sniff_format(encode(RGB, "WEBP")) == "webp"
    assert sniff_format(b"hello") is None


def test_fit_to_bucket_keeps_matching_images_and_covers_others():
    img = torch.arange(3 * 24 * 40, dtype=torch.int32).reshape(3, 24, 40).to(torch.uint8)
    same, resized = fit_to_bucket(img, (40, 24))
    assert same is img and not resized
    out, resized = fit_to_bucket(img, (32, 32))                   # cover 32x32, then centre crop
    assert out.shape == (3, 32, 32) and resized
    transposed, _ = fit_to_bucket(decode_rgb(encode(RGB, "PNG")).permute(0, 2, 1), (W, H))
    assert transposed.shape == (3, H, W)


def test_model_range():
    x = to_model_range(torch.tensor([0, 255, 128], dtype=torch.uint8))
    assert x.dtype == torch.float32
    assert torch.allclose(x, torch.tensor([-1.0, 1.0, 128 / 127.5 - 1]), atol=1e-6)


def test_jpeg_header_parsing_picks_what_nvjpeg_can_decode():
    assert jpeg_components(encode(RGB, "JPEG")) == (8, 3)
    assert jpeg_components(encode(RGB.convert("L"), "JPEG")) == (8, 1)
    assert jpeg_components(encode(RGB.convert("CMYK"), "JPEG")) == (8, 4)
    assert jpeg_components(encode(RGB, "JPEG", progressive=True)) == (8, 3)
    assert gpu_decodable(encode(RGB, "JPEG"))
    assert not gpu_decodable(encode(RGB.convert("CMYK"), "JPEG"))
    assert not gpu_decodable(encode(RGB, "PNG"))
    assert not gpu_decodable(b"\xff\xd8\xff")
    assert jpeg_components(b"\xff\xd8" + b"\x00" * 20) is None


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_of_device_decodes_matches_the_cpu_path(orientation):
    """nvjpeg ignores EXIF: `orient` applies it after the GPU decode. Checked against the same decoder
    with its own EXIF handling (torchvision on the CPU), for all eight orientations of a non-square image."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from sd3.data.images import exif_orientation, orient

    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(RGB.crop((0, 0, 40, 24)), "JPEG", exif=exif.tobytes())
    raw = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    expected = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                           apply_exif_orientation=True)
    assert exif_orientation(data) == orientation
    assert torch.equal(orient(raw, exif_orientation(data)), expected)
    assert torch.equal(expected, decode_rgb(data))                # and the CPU path agrees


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                       reason="needs CUDA")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_batched_device_decode_matches_the_cpu_path_and_survives_a_corrupt_image(device):
    """`decode_jpegs_on_device`, the loader's nvjpeg path: one batched call, retried image by image when a
    corrupt JPEG makes it raise (that one comes back None, the others decoded), EXIF orientation applied,
    uint8 (3, H, W) on the device. torchvision's batched decode runs on the CPU too, so the same contract
    is checked here; CUDA adds nvjpeg (within JPEG decoder tolerance of the CPU decoder)."""
    good = [encode(photo(64, 48, seed=i), "JPEG", quality=95) for i in range(3)]
    exif = Image.Exif()
    exif[0x0112] = 6                                                  # rotate 90 clockwise: (48, 64) -> (64, 48)
    rotated = encode(photo(64, 48, seed=3), "JPEG", quality=95, exif=exif.tobytes())
    datas = [*good[:2], good[2][:100], rotated]
    out = decode_jpegs_on_device(datas, device)
    assert out[2] is None
    for data, img in zip([good[0], good[1], None, rotated], out):
        if data is None:
            continue
        expected = decode_rgb(data)
        assert img.device.type == device and img.dtype == torch.uint8 and img.shape == expected.shape
        assert (img.cpu().int() - expected.int()).abs().float().mean() < 3.0
    assert out[3].shape == (3, 64, 48)


def test_decode_never_hangs_on_a_decompression_bomb_header():
    # A PNG header that claims 100000 x 100000 pixels: PIL refuses it (DecompressionBombError) -> ImageError.
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    data = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    with pytest.raises(ImageError):
        decode_rgb(data + b"\x00\x00\x00\x00IEND\xaeB`\x82")


def test_pil_mode_conversion_covers_non_file_modes():
    from sd3.data.images import to_rgb

    for mode in ("HSV", "RGBa", "I;16L", "I;16N"):
        img = Image.new(mode, (4, 3))
        assert to_rgb(img).mode == "RGB" and to_rgb(img).size == (4, 3)
