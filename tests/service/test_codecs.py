"""Image decoding into a model's input contract, with clear errors for bad input; top-k selection."""

import dataclasses
import io
import re
import struct
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from convray.service import codecs
from convray.service.codecs import (
    DecodeLimits,
    as_colour_mode,
    check_request_pixels,
    decode_image,
    request_pixels_may_exceed,
    top_k,
)
from convray.service.errors import InvalidInput
from convray.workers.repository import InputContract, Normalisation

GREY_8 = InputContract(
    channels=1, height=8, width=8, colour_mode="L", normalisation=Normalisation(mean=[0.5], std=[0.5])
)
RGB_4x6 = InputContract(
    channels=3,
    height=4,
    width=6,
    colour_mode="RGB",
    normalisation=Normalisation(mean=[0.5] * 3, std=[0.5] * 3),
)
LIMITS = DecodeLimits(max_image_bytes=1 << 20, max_image_pixels=1_000_000, max_request_pixels=2_000_000)


def noise(size: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size), dtype=np.uint8))


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def gradient(mode="L", size=(8, 8)) -> Image.Image:
    values = (np.arange(size[0] * size[1]) % 256).astype(np.uint8).reshape(size[1], size[0])
    return Image.fromarray(values, mode="L").convert(mode)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "GIF", "WEBP"])
def test_lossless_formats_decode_to_the_exact_pixels(fmt):
    options = {"lossless": True} if fmt == "WEBP" else {}
    pixels = decode_image(encode(gradient(), fmt, **options), GREY_8, LIMITS)
    assert pixels.shape == (1, 8, 8) and pixels.dtype == np.uint8
    assert np.array_equal(pixels[0], np.asarray(gradient()))


def test_jpeg_decodes_close_to_the_original():
    pixels = decode_image(encode(gradient(), "JPEG", quality=95), GREY_8, LIMITS)
    assert np.abs(pixels[0].astype(int) - np.asarray(gradient()).astype(int)).mean() < 4


def test_colour_is_converted_to_the_contract_and_channels_come_first():
    rgb = Image.new("RGB", (6, 4), (10, 20, 30))
    pixels = decode_image(encode(rgb, "PNG"), RGB_4x6, LIMITS)
    assert pixels.shape == (3, 4, 6)
    assert pixels[:, 0, 0].tolist() == [10, 20, 30]
    grey = decode_image(encode(rgb, "PNG"), GREY_8, LIMITS)
    assert grey.shape == (1, 8, 8) and 15 <= grey[0, 0, 0] <= 25  # ITU-R 601 luma of (10, 20, 30)


def test_shrinking_averages_areas_and_enlarging_interpolates():
    big = Image.fromarray(np.kron(np.asarray(gradient()), np.ones((8, 8), np.uint8)))  # each pixel as 8x8
    assert np.array_equal(decode_image(encode(big, "PNG"), GREY_8, LIMITS)[0], np.asarray(gradient()))
    small = Image.new("L", (2, 2), 100)
    assert decode_image(encode(small, "PNG"), GREY_8, LIMITS).shape == (1, 8, 8)


def large(mode: str) -> Image.Image:
    """A 640x480 test card in ``mode``: a gradient with a transparent band where the mode can have one."""
    grey = np.add.outer(np.arange(480), np.arange(640)) % 256
    rgb = np.stack([grey, grey[::-1], (grey * 3) % 256], axis=-1).astype(np.uint8)
    image = Image.fromarray(rgb, mode="RGB")
    if mode == "RGBA":
        image.putalpha(Image.fromarray(np.where(np.arange(640) < 200, 0, 255).astype(np.uint8)[None].repeat(480, 0)))
        return image
    if mode == "P+transparency":
        image = image.quantize(64)
        image.info["transparency"] = 0
        return image
    if mode == "I;16":
        return Image.fromarray((grey * 257).astype(np.uint16))
    if mode == "CMYK":  # blocks of full cyan and of full black: CMYK to RGB multiplies, so averaging first is wrong
        blocks = (np.add.outer(np.arange(480) // 16, np.arange(640) // 16) % 2).astype(bool)
        cmyk = np.zeros((480, 640, 4), dtype=np.uint8)
        cmyk[blocks, 0], cmyk[~blocks, 3] = 255, 255
        return Image.fromarray(cmyk, mode="CMYK")
    return image.convert(mode)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P+transparency", "I;16", "1", "CMYK"])
@pytest.mark.parametrize("contract", [GREY_8, RGB_4x6], ids=["grey-8x8", "rgb-4x6"])
def test_a_large_image_is_shrunk_before_its_colour_conversion_to_the_pixels_of_one_area_average(mode, contract):
    """Converted at full size first, a palette image with transparency took 16 bytes a pixel (review: 643 MiB
    for a 5 KB 6300x6300 PNG); reduced first, the result is the same area average to within rounding."""
    image = large(mode)
    data = encode(image, "TIFF" if mode == "CMYK" else "PNG")
    if mode == "CMYK":
        data = encode(image, "JPEG", quality=100)
        image = Image.open(io.BytesIO(data))
    expected = as_colour_mode(image, contract.colour_mode).resize(
        (contract.width, contract.height), Image.Resampling.BOX
    )  # the whole image converted, then one area average
    expected = np.asarray(expected, dtype=np.int16).reshape(contract.height, contract.width, -1).transpose(2, 0, 1)
    got = decode_image(data, contract, LIMITS).astype(np.int16)
    assert np.abs(got - expected).max() <= 1


PEAK_DECODE_MEMORY = """
import io, resource, sys
from PIL import Image
from convray.service.codecs import DecodeLimits, decode_image
from convray.workers.repository import InputContract, Normalisation

buffer = io.BytesIO()
size = int(sys.argv[1]), int(sys.argv[2])
Image.new("P", size).save(buffer, "PNG", transparency=0)  # 15-16 Mpx in a few KB
contract = InputContract(channels=1, height=8, width=8, colour_mode="L",
                         normalisation=Normalisation(mean=[0.5], std=[0.5]))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
decode_image(buffer.getvalue(), contract, DecodeLimits(1 << 20, 20_000_000, 20_000_000))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 / (size[0] * size[1]))
"""


@pytest.mark.parametrize("size", [(4000, 4000), (15, 1_000_000)], ids=["square", "long-and-thin"])
def test_decoding_a_large_palette_image_with_transparency_takes_at_most_10_bytes_a_pixel(size):
    """Review: 17 bytes a pixel before (643 MiB for a 5 KB 6300x6300 PNG), so four such requests at once could
    outgrow a front-end pod; 18 for a long, thin one in the first fix. Measured in a fresh process, as the growth
    of its peak memory."""
    command = [sys.executable, "-c", PEAK_DECODE_MEMORY, *map(str, size)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) <= 10, f"{float(result.stdout):.1f} bytes a pixel"


def test_first_frame_of_an_animated_gif():
    frames = [Image.new("L", (8, 8), 50), Image.new("L", (8, 8), 200)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(data, GREY_8, LIMITS)[0, 0, 0] == 50


def test_transparent_areas_are_laid_over_black():
    rgba = Image.new("RGBA", (8, 8), (255, 255, 255, 0))
    rgba.putpixel((0, 0), (255, 255, 255, 255))
    pixels = decode_image(encode(rgba, "PNG"), GREY_8, LIMITS)[0]
    assert pixels[0, 0] == 255 and pixels[1, 1] == 0


def test_palette_with_transparency():
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    data = encode(palette, "PNG", transparency=1)
    assert decode_image(data, GREY_8, LIMITS)[0].max() == 0


def test_16_bit_grey_is_scaled_not_clipped():
    wide = Image.fromarray(np.full((8, 8), 40000, np.uint16))
    assert decode_image(encode(wide, "PNG"), GREY_8, LIMITS)[0, 0, 0] == 40000 >> 8


def test_cmyk_jpeg_is_converted():
    cmyk = Image.new("CMYK", (8, 8), (0, 0, 0, 0))  # white
    assert decode_image(encode(cmyk, "JPEG"), GREY_8, LIMITS)[0].min() > 240


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a size, with a tiny (invalid) body: nothing big is ever allocated."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))


def png_with_exif(exif: bytes) -> bytes:
    """A valid 8x6 grey PNG carrying ``exif`` as its eXIf chunk (Pillow parses it only when asked)."""
    ihdr = struct.pack(">IIBBBBB", 8, 6, 8, 0, 0, 0, 0)
    rows = b"".join(b"\0" + b"\x80" * 8 for _ in range(6))
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"eXIf", exif)
        + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b"")
    )  # fmt: skip


def exif_with_wrong_types() -> bytes:
    """EXIF whose ImageWidth is ASCII and whose Orientation says "rotate": exif_transpose then fails on the types."""
    entries = [struct.pack("<HHI4s", 0x0100, 2, 4, b"abc\0"), struct.pack("<HHIHH", 0x0112, 3, 1, 6, 0)]
    return b"Exif\0\0" + b"II*\0" + struct.pack("<IH", 8, len(entries)) + b"".join(entries) + b"\0" * 4


def exif_saying(orientation: int, endian: str = "<", other_tags: int = 0) -> bytes:
    """EXIF (TIFF, ``endian`` byte order) whose first directory holds ``other_tags`` tags, then the Orientation."""
    head = b"II*\0" if endian == "<" else b"MM\0*"
    entries = [struct.pack(f"{endian}HHIHH", 0x0200 + i, 3, 1, 7, 0) for i in range(other_tags)]
    entries.append(struct.pack(f"{endian}HHIHH", 0x0112, 3, 1, orientation, 0))
    return head + struct.pack(f"{endian}IH", 8, len(entries)) + b"".join(entries) + b"\0" * 4


def asymmetric(size=(6, 4)) -> Image.Image:
    """An RGB image that every flip and turn changes (its pixels all differ)."""
    values = np.arange(size[0] * size[1] * 3, dtype=np.uint8).reshape(size[1], size[0], 3) * 3
    return Image.fromarray(values, mode="RGB")


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "JPEG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_an_image_is_turned_upright_as_its_exif_orientation_says_as_pillow_would(fmt, orientation):
    """Pillow's ``ImageOps.exif_transpose`` is the reference; the image is decoded at its own (upright) size."""
    from PIL import ImageOps

    options = {"lossless": True} if fmt == "WEBP" else {"quality": 95} if fmt == "JPEG" else {}
    data = encode(asymmetric(), fmt, exif=b"Exif\0\0" + exif_saying(orientation), **options)
    reference = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    contract = RGB_4x6.model_copy(update={"width": reference.width, "height": reference.height})
    expected = decode_image(encode(reference, "PNG"), contract, LIMITS)
    np.testing.assert_array_equal(decode_image(data, contract, LIMITS), expected)


def tiff(*entries: bytes, head: bytes = b"II*\0", tail: bytes = b"") -> bytes:
    """A TIFF structure whose first directory holds ``entries`` (12 bytes each), with ``tail`` after it."""
    endian = "<" if head.startswith(b"II") else ">"
    return head + struct.pack(f"{endian}IH", 8, len(entries)) + b"".join(entries) + b"\0" * 4 + tail


def orientation_entry(kind: int, count: int, value: bytes, endian: str = "<") -> bytes:
    return struct.pack(f"{endian}HHI", 0x0112, kind, count) + value.ljust(4, b"\0")


AFTER_ONE_ENTRY = struct.pack("<I", 8 + 2 + 12 + 4)  # where data after a directory of one entry starts
AFTER_TWO_ENTRIES = struct.pack("<I", 8 + 2 + 24 + 4)


@pytest.mark.parametrize(
    "exif",
    [
        tiff(orientation_entry(3, 1, struct.pack("<H", 6))),
        tiff(orientation_entry(3, 1, struct.pack(">H", 8), ">"), head=b"MM\0*"),
        tiff(orientation_entry(3, 1, struct.pack("<H", 5)), head=b"II\0*"),  # a prefix Pillow takes too
        tiff(orientation_entry(3, 1, struct.pack("<H", 6)), orientation_entry(3, 1, struct.pack("<H", 3))),  # 1st
        tiff(orientation_entry(3, 0, b""), orientation_entry(3, 1, struct.pack("<H", 3))),  # no value: the next
        tiff(orientation_entry(99, 1, b"\6"), orientation_entry(3, 1, struct.pack("<H", 7))),  # unknown type
        tiff(orientation_entry(3, 2, struct.pack("<HH", 6, 3))),  # the first of two values
        tiff(orientation_entry(3, 3, AFTER_ONE_ENTRY), tail=struct.pack("<HHH", 8, 1, 1)),  # values after it
        tiff(orientation_entry(3, 3, b"\xff\xff\0\0"), orientation_entry(3, 1, struct.pack("<H", 2))),  # outside
        tiff(orientation_entry(4, 1, struct.pack("<I", 5))),  # LONG
        tiff(orientation_entry(8, 1, struct.pack("<h", 6))),  # SSHORT
        tiff(orientation_entry(5, 1, AFTER_ONE_ENTRY), tail=struct.pack("<II", 12, 2)),  # RATIONAL 6
        tiff(orientation_entry(5, 1, AFTER_ONE_ENTRY), tail=struct.pack("<II", 13, 2)),  # 6.5: no turn
        tiff(orientation_entry(5, 1, AFTER_ONE_ENTRY), tail=struct.pack("<II", 6, 0)),  # over 0: no turn
        tiff(orientation_entry(1, 1, b"\6")),  # BYTE: Pillow gives bytes, and turns nothing
        tiff(orientation_entry(2, 2, b"6\0")),  # ASCII
        tiff(struct.pack("<HHIHH", 0x0100, 3, 1, 9, 0), orientation_entry(3, 1, struct.pack("<H", 4))),
        tiff(orientation_entry(11, 1, struct.pack("<f", 8.0))),  # FLOAT
        tiff(struct.pack("<HHII", 0x0100, 3, 9, 0xFFFF), orientation_entry(3, 1, struct.pack("<H", 6))),  # stops
        tiff(struct.pack("<HHII", 0x0100, 4, 10**6, 0), orientation_entry(3, 1, struct.pack("<H", 6))),  # skipped
        tiff(
            struct.pack("<HHIHH", 0x0100, 3, 1, 5, 0),
            struct.pack("<HHII", 0x0100, 4, 2, 0xFFFF0000),  # a repeat:
            orientation_entry(3, 1, struct.pack("<H", 6)),
        ),  # passed over before its data is looked for
        tiff(orientation_entry(99, 1, b""), orientation_entry(5, 1, b"\xff\xff\0\0")),  # a repeat outside: stops
        tiff(orientation_entry(12, 1, AFTER_ONE_ENTRY), tail=struct.pack("<d", 3.0)),  # DOUBLE
        b"Exif\0\0Exif\0\0" + tiff(orientation_entry(3, 1, struct.pack("<H", 6))),  # two prefixes
        b"garbage-not-tiff",
        tiff(orientation_entry(3, 1, struct.pack("<H", 6)))[:-10],  # cut inside its one entry
    ],
)
def test_exif_orientation_turns_the_image_as_pillow_would(exif):
    """Pillow's own reading (``Image.Exif``, as ``ImageOps.exif_transpose`` uses it) is the reference."""
    reference = Image.Exif()
    try:
        with warnings.catch_warnings():  # Pillow warns of the oddities these directories are made of
            warnings.simplefilter("ignore")
            reference.load(exif)
            pillows = reference.get(0x0112, 1)
    except Exception:  # noqa: BLE001 (Pillow refused it: convray reads such EXIF as saying nothing)
        pillows = 1
    image = Image.new("L", (2, 2))
    image.info["exif"] = exif
    assert codecs._UPRIGHT.get(codecs.exif_orientation(image)) == codecs._UPRIGHT.get(pillows)


def test_exif_orientation_falls_back_to_xmp_and_reads_imagemagicks_hex_profile():
    image = Image.new("L", (2, 2))
    image.info = {"xmp": b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'}
    assert codecs.exif_orientation(image) == 6
    image.info = {"exif": tiff(orientation_entry(3, 0, b"")), "xmp": b'tiff:Orientation="3"'}  # no value: XMP's
    assert codecs.exif_orientation(image) == 3
    image.info = {"exif": tiff(orientation_entry(3, 2, struct.pack("<HH", 9, 9))), "xmp": b'tiff:Orientation="3"'}
    assert codecs.exif_orientation(image) == 9  # EXIF has the tag, so XMP is not asked (as in Pillow)
    raw_profile = b"Exif\0\0" + exif_saying(7)  # ImageMagick's PNG text chunk: a header, then the bytes in hex
    image.info = {"Raw profile type exif": f"\nexif\n{len(raw_profile):8d}\n{raw_profile.hex()}\n"}
    assert codecs.exif_orientation(image) == 7
    image.info = {"exif": "text, from a PNG text chunk named exif"}  # found in review: it made the image a refusal
    assert codecs.exif_orientation(image) == 1


def test_exif_that_cannot_be_read_or_has_wrong_types_elsewhere_is_ignored():
    """Found in review (sixteenth session): such EXIF made the image a refusal ("corrupt"); browsers ignore it."""
    assert decode_image(png_with_exif(b"garbage-not-tiff"), GREY_8, LIMITS).shape == (1, 8, 8)
    for fmt in ("JPEG", "WEBP"):
        upright = decode_image(encode(gradient(), fmt, exif=exif_with_wrong_types(), quality=100), GREY_8, LIMITS)
        stored = decode_image(encode(gradient(), fmt, quality=100), GREY_8, LIMITS)
        np.testing.assert_array_equal(upright[0], np.rot90(stored[0], k=-1))  # 6: turned a quarter clockwise


def test_exif_is_read_without_pillows_tag_decoding(monkeypatch):
    """Found in review: ``getexif`` decodes every tag in Python (65,535 tags took 4.7 s, one 15 MB tag 11 s)."""

    def refuse(*_):
        raise AssertionError("Pillow's EXIF parser was called")

    monkeypatch.setattr(Image.Image, "getexif", refuse)
    data = png_with_exif(exif_saying(6, other_tags=60_000))
    assert decode_image(data, GREY_8, LIMITS).shape == (1, 8, 8)


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", "image is empty"),
        (b"hello, not an image", "not a decodable image; accepted formats: PNG, JPEG"),
        # Past Pillow's own limit too: only ours is quoted (found in review: both were, in one message)
        (
            png_header_claiming(100_000, 100_000),
            r"^image is 100000x100000 = 10000000000 pixels, over the limit of 1000000 \(--max-image-pixels\)$",
        ),
        (
            png_header_claiming(2000, 1000),
            r"2000x1000 = 2000000 pixels, over the limit of 1000000 \(--max-image",
        ),
        (encode(noise(64), "PNG")[:2000], "corrupt or truncated"),
        (encode(gradient(size=(64, 64)), "JPEG")[:300], "corrupt or truncated"),
        (encode(gradient(), "TIFF"), "not a decodable image"),
    ],
)
def test_bad_images_are_invalid_input_naming_the_problem(data, message):
    with pytest.raises(InvalidInput, match=message):
        decode_image(data, GREY_8, LIMITS)


def test_a_request_whose_images_add_up_to_too_many_pixels_is_refused_from_their_headers():
    """Each 1000x1000 header is within the per-image limit (1,000,000); three are over the request's 2,000,000."""
    each = png_header_claiming(1000, 1000)  # its body is invalid: nothing is decoded to refuse it
    check_request_pixels([each, each], LIMITS)
    check_request_pixels([each, each, b"not an image"], LIMITS)  # counted 0: decode_image says what is wrong
    with pytest.raises(InvalidInput, match=r"3 images are 3000000 pixels in all, over the limit of 2000000 "
                                           r"\(--max-request-pixels\); send them in smaller requests"):  # fmt: skip
        check_request_pixels([each, each, each], LIMITS)


def test_requests_too_few_to_exceed_the_request_limit_need_no_header_pass():
    """At 1,000,000 pixels each, two images cannot pass 2,000,000 together; three can."""
    assert not request_pixels_may_exceed(2, LIMITS) and request_pixels_may_exceed(3, LIMITS)
    defaults = DecodeLimits(max_image_bytes=1, max_image_pixels=40_000_000, max_request_pixels=400_000_000)
    assert not request_pixels_may_exceed(10, defaults) and request_pixels_may_exceed(11, defaults)


def test_a_limit_above_pillows_own_bomb_limit_is_the_one_applied():
    """Pillow refuses past 2 x 89.5 Mpx by itself; --max-image-pixels set higher must be what decides (review)."""
    high = DecodeLimits(max_image_bytes=1 << 20, max_image_pixels=200_000_000, max_request_pixels=200_000_000)
    with pytest.raises(InvalidInput, match="corrupt or truncated"):  # past the pixel check; its body is invalid
        decode_image(png_header_claiming(14_000, 14_000), GREY_8, high)
    with pytest.raises(InvalidInput, match=r"over the limit of 200000000 \(--max-image-pixels\)"):
        decode_image(png_header_claiming(15_000, 15_000), GREY_8, high)


def progressive_jpeg_with_scans_repeated(times: int) -> bytes:
    """A valid progressive JPEG whose last scan is repeated: each scan costs a pass over the whole image."""
    data = encode(gradient(size=(64, 64)), "JPEG", progressive=True)
    last_scan = data[data.rindex(b"\xff\xda") : -2]  # start of scan to the end, without the end-of-image marker
    return data[:-2] + last_scan * times + b"\xff\xd9"


def test_a_jpeg_of_more_than_100_scans_is_refused_before_it_is_decoded():
    """Found in review: a 270 KB JPEG of 1,000 scans took 41 s of a decode thread, past its caller's deadline."""
    normal = encode(gradient(size=(64, 64)), "JPEG", progressive=True)
    assert 2 < normal.count(b"\xff\xda") <= 100
    decode_image(progressive_jpeg_with_scans_repeated(100 - normal.count(b"\xff\xda")), GREY_8, LIMITS)
    with pytest.raises(InvalidInput, match=r"^JPEG has over 100 scans \(an encoder writes about 10\); re-encode it$"):
        decode_image(progressive_jpeg_with_scans_repeated(101 - normal.count(b"\xff\xda")), GREY_8, LIMITS)


def test_start_of_scan_bytes_outside_the_images_scans_are_not_counted_as_scans():
    """Bytes after the end-of-image marker (a motion photo's video) or inside a segment are not scans (review).

    The first version counted every 0xFFDA pair in the file, so a progressive JPEG with such data appended was refused.
    """
    normal = encode(gradient(size=(64, 64)), "JPEG", progressive=True)
    start_of_scans = b"\xff\xda" * 200
    decode_image(normal + start_of_scans, GREY_8, LIMITS)
    comment = b"\xff\xfe" + (2 + len(start_of_scans)).to_bytes(2, "big") + start_of_scans
    decode_image(normal[:2] + comment + normal[2:], GREY_8, LIMITS)


def test_an_end_of_image_marker_inside_a_segment_does_not_end_the_scan_count():
    """An EXIF thumbnail (a JPEG inside a segment) ends with 0xFFD9; the image's own scans are counted past it."""
    thumbnail_end = b"\xff\xfe\x00\x04\xff\xd9"  # a comment holding an end-of-image marker
    many_scans = progressive_jpeg_with_scans_repeated(120)
    with pytest.raises(InvalidInput, match=r"^JPEG has over 100 scans"):
        decode_image(many_scans[:2] + thumbnail_end + many_scans[2:], GREY_8, LIMITS)


def test_a_progressive_jpeg_of_over_1000_markers_in_its_image_data_is_refused_when_its_scans_are_walked():
    """The walk (for a file of over 100 start-of-scan pairs) goes marker by marker in Python, so it is bounded."""
    normal = encode(gradient(size=(64, 64)), "JPEG", progressive=True)
    comment, trailing_scans = b"\xff\xfe\x00\x02", b"\xff\xda" * 200  # after the image: walked to, not counted
    decode_image(normal[:-2] + comment * 900 + normal[-2:] + trailing_scans, GREY_8, LIMITS)
    with pytest.raises(InvalidInput, match=r"^JPEG has over 1000 markers in its image data; re-encode it$"):
        decode_image(normal[:-2] + comment * 1000 + normal[-2:] + trailing_scans, GREY_8, LIMITS)


def test_junk_that_stops_the_marker_walk_does_not_hide_the_scans():
    """Found in review: a zero byte after the first segment (Pillow and libjpeg skip it) ended the walk before
    the first scan, so nothing was counted, and 2,000 scans of a 6000x6000 image took 75 s to decode."""
    many_scans = progressive_jpeg_with_scans_repeated(120)
    after_app0 = 4 + int.from_bytes(many_scans[4:6], "big")
    assert many_scans[2:4] == b"\xff\xe0"  # the JFIF segment Pillow writes first
    with_junk = many_scans[:after_app0] + b"\x00" + many_scans[after_app0:]
    with pytest.raises(InvalidInput, match=r"^JPEG has over 100 scans"):
        decode_image(with_junk, GREY_8, LIMITS)


LARGER_FILES = dataclasses.replace(LIMITS, max_image_bytes=16 << 20)


def test_the_scan_walk_follows_megabytes_of_scan_data_across_its_search_chunks():
    """1.8 MB of stuffed zeros and fill runs (each under the fill limit) in the first scan's data, 1 MiB searched at a
    time: the scans after it count."""
    many_scans = progressive_jpeg_with_scans_repeated(120)
    first_scan = many_scans.index(b"\xff\xda")
    scan_data = first_scan + 2 + int.from_bytes(many_scans[first_scan + 2 : first_scan + 4], "big")
    padding = b"\xff\x00" * 600_000 + (b"\xff" * 60_000 + b"\x00") * 10
    with pytest.raises(InvalidInput, match=r"^JPEG has over 100 scans"):
        decode_image(many_scans[:scan_data] + padding + many_scans[scan_data:], GREY_8, LARGER_FILES)


def test_scan_markers_are_found_where_a_byte_by_byte_reading_finds_them(monkeypatch):
    """0xFF then any code but a stuffed zero, a restart marker (0xD0-0xD7) or more fill; at chunk edges too."""
    monkeypatch.setattr(codecs, "_JPEG_MARKER_SEARCH_CHUNK", 7)
    rng = np.random.default_rng(0)
    codes = [0x00, 0x01, 0x12, 0xCF, 0xD0, 0xD7, 0xD8, 0xD9, 0xDA, 0xFE, 0xFF]
    data = rng.choice(np.array(codes, dtype=np.uint8), size=2_000).tobytes()
    assert len(data) == 2_000 and data.count(b"\xff\xda") > 0

    def next_marker_read_byte_by_byte(offset):
        for at in range(offset, len(data) - 1):
            if data[at] == 0xFF and data[at + 1] not in (0x00, 0xFF, *range(0xD0, 0xD8)):
                return at + 2
        return None

    markers, offset, found = codecs._JpegMarkers(data), 0, 0
    while offset is not None:
        assert markers.next_after(offset) == next_marker_read_byte_by_byte(offset), offset
        offset, found = markers.next_after(offset), found + 1
        offset = offset and offset + int(rng.integers(0, 9))  # a segment's length skipped, sometimes past the end
    assert found > 50  # markers were found, not just their absence agreed on
    assert codecs._JpegMarkers(data).count_start_of_scan() == data.count(b"\xff\xda")  # across chunks too
    assert codecs._JpegMarkers(b"\xff").next_after(0) is None
    assert codecs._JpegMarkers(b"\x00\xff\xd9").next_after(0) == 3


def png_with_empty_chunks(count: int) -> bytes:
    """A valid 8x8 PNG with ``count`` empty private chunks after its header (Pillow reads each in Python)."""
    data = encode(gradient(), "PNG")
    header_end = 8 + 25  # signature, then IHDR: length, type, 13 bytes, CRC
    return data[:header_end] + png_chunk(b"teSt", b"") * count + data[header_end:]


def test_a_png_of_more_than_10000_chunks_is_refused_before_it_is_opened():
    """Found in review: 1.3M empty chunks in 16 MB took 8 s per image and slowed every other request."""
    np.testing.assert_array_equal(decode_image(png_with_empty_chunks(9_000), GREY_8, LIMITS)[0], np.asarray(gradient()))
    with pytest.raises(InvalidInput, match=r"^PNG has more than 10000 chunks; re-encode it$"):
        decode_image(png_with_empty_chunks(10_000), GREY_8, LIMITS)


def jpeg_with_before_its_scan(extra: bytes) -> bytes:
    """A valid JPEG with ``extra`` bytes (markers, fill) placed just after its start-of-image marker."""
    data = encode(gradient(), "JPEG")
    return data[:2] + extra + data[2:]


def test_a_jpeg_of_over_1000_markers_or_1024_fill_bytes_before_its_scan_is_refused_before_it_is_opened():
    """Found in review: Pillow parses these in Python, 1M empty comments in 2 s and 4 MB of fill bytes in 3.9 s."""
    comment = b"\xff\xfe\x00\x02"  # an empty COM segment
    decode_image(jpeg_with_before_its_scan(comment * 900 + b"\xff" * 1000), GREY_8, LIMITS)
    with pytest.raises(InvalidInput, match=r"^JPEG has over 1000 markers before its image data; re-encode it$"):
        decode_image(jpeg_with_before_its_scan(comment * 1000), GREY_8, LIMITS)
    with pytest.raises(
        InvalidInput, match=r"^JPEG has over 1024 fill or stray bytes before its image data; re-encode it$"
    ):
        decode_image(jpeg_with_before_its_scan(b"\xff" * 1025), GREY_8, LIMITS)
    decode_image(jpeg_with_before_its_scan(b"\xff" * 1024), GREY_8, LIMITS)


@pytest.mark.parametrize(
    "stray",
    [b"\x00", b"A", b"\xff\x00", b"\xff\xff\x00"],
    ids=["zeros", "junk", "stuffed zeros", "fill then a stuffed zero"],
)
def test_stray_bytes_between_a_jpegs_segments_count_towards_the_same_limit(stray):
    """Found in review: Pillow 13 skips bytes that are not a marker one at a time, in Python (4 MB took 0.5 s)."""
    per_gap = 1024 // (len(stray) * 2)
    within = (b"\xff\xfe\x00\x02" + stray * per_gap) * 2  # two comments, each followed by stray bytes
    check_structure_of = codecs._check_structure
    check_structure_of(b"\xff\xd8" + within + b"\xff\xda")
    with pytest.raises(InvalidInput, match=r"^JPEG has over 1024 fill or stray bytes"):
        check_structure_of(b"\xff\xd8" + within + stray * (1024 // len(stray)) + b"\xff\xda")


@pytest.mark.parametrize("marker", [0xD8, 0xD9, 0xD0, 0xC8, 0xF0, 0xFD], ids=lambda m: f"0xFF{m:02X}")
def test_markers_without_a_length_do_not_hide_the_segments_after_them(marker):
    """Found in review: the walk read a length after SOI and the JPGn markers, and stopped at EOI, where Pillow goes
    on; 1M empty comments after any of them took Pillow 2.3-2.5 s to parse while the check let them through."""
    hidden = b"\xff" + bytes([marker]) + b"\xff\xfe\x00\x02" * 1000
    with pytest.raises(InvalidInput, match=r"^JPEG has over 1000 markers before its image data"):
        decode_image(jpeg_with_before_its_scan(hidden), GREY_8, LIMITS)
    assert marker in codecs._JPEG_HEADER_MARKERS and not codecs._JPEG_HEADER_MARKERS[marker]


def test_a_jpeg_segment_length_under_two_steps_over_the_length_as_pillow_does():
    """Pillow reads the two length bytes whatever they say, so a length of 0 or 1 is not a marker's start."""
    walk = codecs._check_jpeg_header
    for length in (b"\x00\x00", b"\x00\x01", b"\x00\x02"):
        assert walk(b"\xff\xd8\xff\xfe" + length + b"\xff\xda") == 8


def test_a_jpeg_header_with_an_unknown_marker_is_left_to_pillow_to_refuse():
    assert codecs._check_jpeg_header(b"\xff\xd8\xff\x01" + b"\xff\xfe\x00\x02" * 2000) is None
    with pytest.raises(InvalidInput, match="^not a decodable image"):
        decode_image(jpeg_with_before_its_scan(b"\xff\x01"), GREY_8, LIMITS)


def jpeg_segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


QUANTIZATION_TABLE = b"\x00" + bytes(range(1, 65))  # table 0, 8-bit values


@pytest.mark.parametrize(
    "segment,allowed,kind",
    [
        (jpeg_segment(0xC0, b"\x08\x00\x08\x00\x08\x01\x01\x11\x00"), 1, r"frame header \(SOFn\)"),
        (jpeg_segment(0xDB, QUANTIZATION_TABLE), 4, r"quantization table \(DQT\)"),
        (jpeg_segment(0xE1, b"Exif\0\0" + exif_saying(1)), 16, r"EXIF \(APP1\)"),  # Pillow joins them
        (jpeg_segment(0xED, b"Photoshop 3.0\0" + b"8BIM\x04\x04\0\0\0\0\0\0"), 4, r"Photoshop \(APP13\)"),
    ],
    ids=["SOF", "DQT", "EXIF", "Photoshop"],
)
def test_a_jpeg_holds_at_most_a_few_of_the_segments_that_pillow_walks_in_python(segment, allowed, kind):
    """Found in review: 250 of 64 KB each took Pillow 1.0-1.9 s (461 MB for frame headers), under the marker limit."""
    walk = codecs._check_jpeg_header
    assert walk(b"\xff\xd8" + segment * allowed + b"\xff\xda") == 4 + len(segment) * allowed
    with pytest.raises(InvalidInput, match=rf"^JPEG has more than {allowed} {kind} segments before its image data"):
        walk(b"\xff\xd8" + segment * (allowed + 1) + b"\xff\xda")
    assert walk(b"\xff\xd8" + jpeg_segment(0xE1, b"http://ns.adobe.com/xap/1.0/\0") * 5 + b"\xff\xda")  # XMP: not EXIF


def test_a_jpeg_with_a_long_run_of_fill_bytes_in_its_image_data_is_refused():
    """Found in review: libjpeg reads 0xFF fill without reporting progress, and Pillow re-reads its growing buffer:
    15 MB of fill before the end-of-image marker took 2.2 s."""
    data = encode(gradient(), "JPEG")
    limit = codecs.MAX_JPEG_FILL_RUN
    decode_image(data[:-2] + b"\xff" * (limit - 1) + data[-2:], GREY_8, LIMITS)  # under the limit, wherever it lies
    for offset in range(0, limit, limit // 4):  # a run of twice the limit, at any alignment
        with pytest.raises(InvalidInput, match=rf"^JPEG has a run of {limit} or more 0xFF fill bytes; re-encode it$"):
            codecs._check_fill_runs(b"\0" * offset + b"\xff" * (2 * limit) + b"\0", None)
    with pytest.raises(InvalidInput, match="0xFF fill bytes"):
        decode_image(data[:-2] + b"\xff" * (2 * limit) + data[-2:], GREY_8, LIMITS)


def test_fill_bytes_after_the_end_of_image_libjpeg_stops_at_are_let_be_and_no_other_end_of_image_counts():
    """Found in review: libjpeg never reads them, and a flash card's 0xFF padding made a photo a refusal; then, an
    end-of-image marker in a comment hid a run that libjpeg does read (4 MB: 131 ms of Pillow's loading)."""
    data = encode(gradient(), "JPEG")
    padded = data + b"\xff" * (4 * codecs.MAX_JPEG_FILL_RUN)
    np.testing.assert_array_equal(decode_image(padded, GREY_8, LIMITS), decode_image(data, GREY_8, LIMITS))
    commented = jpeg_with_before_its_scan(b"\xff\xfe\x00\x04\xff\xd9")  # a comment holding 0xFFD9
    with pytest.raises(InvalidInput, match="0xFF fill bytes"):
        decode_image(commented[:-2] + b"\xff" * (4 * codecs.MAX_JPEG_FILL_RUN), GREY_8, LIMITS)  # no end of image


@pytest.mark.parametrize(
    "segment,says",
    [
        (
            jpeg_segment(0xE1, b"Exif\0\0" + exif_saying(1, other_tags=256)),
            "JPEG's EXIF data has a directory of over 256",
        ),
        (jpeg_segment(0xE2, b"MPF\0" + exif_saying(1, other_tags=256)), "JPEG's MPF data has a directory of over 256"),
        (
            jpeg_segment(0xE1, b"Exif\0\0" + tiff(struct.pack("<HHII", 0x011A, 5, 17, 26), tail=b"\0\0\0\1" * 34)),
            "JPEG's EXIF gives its resolution in over 16 values",
        ),
    ],
    ids=["EXIF entries", "MPF entries", "resolution values"],
)
def test_the_tag_directories_pillow_reads_as_it_opens_a_jpeg_are_bounded(segment, says):
    """Found in review: Pillow reads EXIF's first directory (for the resolution) and the MPF index as it opens a JPEG:
    5,400 entries in one segment took 95 ms, 0.5M resolution values 1.8 s."""
    with pytest.raises(InvalidInput, match=f"^{re.escape(says)}"):
        decode_image(jpeg_with_before_its_scan(segment), GREY_8, LIMITS)
    within = jpeg_segment(0xE1, b"Exif\0\0" + exif_saying(6, other_tags=255))  # 256 entries
    split = jpeg_segment(0xE1, b"Exif\0\0" + b"\0" * 8)  # a second EXIF segment, joined to the first
    upright = decode_image(
        jpeg_with_before_its_scan(within + split), RGB_4x6.model_copy(update={"width": 8, "height": 8}), LIMITS
    )
    assert upright.shape == (3, 8, 8)


def test_a_segment_too_short_for_its_signature_is_not_taken_for_the_next_ones():
    """Found in review: the signatures were read past a segment's end, so a 5-byte APP1 of ``Exif\0`` and one junk
    byte joined the real EXIF behind a broken prefix (unchecked), and a short APP2 reading ``MPF\0`` beyond its end
    replaced the real MPF index; Pillow read both, 110k resolution values in 0.4 s."""
    directory = b"Exif\0\0" + exif_saying(1, other_tags=256)
    short = b"\xff\xe1\x00\x07Exif\0" + b"\0"  # 5 bytes of payload, then a junk byte Pillow skips
    with pytest.raises(InvalidInput, match="^JPEG's EXIF data has a directory of over 256 entries"):
        decode_image(jpeg_with_before_its_scan(short + jpeg_segment(0xE1, directory)), GREY_8, LIMITS)
    index = jpeg_segment(0xE2, b"MPF\0" + exif_saying(1, other_tags=256))
    with pytest.raises(InvalidInput, match="^JPEG's MPF data has a directory of over 256 entries"):
        decode_image(jpeg_with_before_its_scan(index + b"\xff\xe2\x00\x02MPF\0"), GREY_8, LIMITS)


def png_with_chunks_before_its_data(*chunks: bytes) -> bytes:
    """``png_with_exif``'s 8x6 PNG with ``chunks`` in place of its EXIF."""
    data = png_with_exif(b"")
    exif_start = data.index(b"eXIf") - 4
    return data[:exif_start] + b"".join(chunks) + data[exif_start + 12 :]


@pytest.mark.parametrize(
    "chunk,allowed,kind",
    [
        (png_chunk(b"iCCP", b"p\0\0" + zlib.compress(b"\0" * 1000)), 1, "iCCP"),
        (png_chunk(b"zTXt", b"k\0\0" + zlib.compress(b"x" * 1000)), 16, "zTXt or compressed iTXt"),
        (png_chunk(b"iTXt", b"k\0\1\0\0\0" + zlib.compress(b"x" * 1000)), 16, "zTXt or compressed iTXt"),
    ],
    ids=["iCCP", "zTXt", "compressed iTXt"],
)
def test_a_png_holds_at_most_a_few_chunks_that_pillow_inflates(chunk, allowed, kind):
    """Found in review: each is inflated up to 1 MiB (3-4 ms); 500 iCCP took 1.3 s, 9,990 after the image data 25 s."""
    decode_image(png_with_chunks_before_its_data(*[chunk] * allowed), GREY_8, LIMITS)
    with pytest.raises(InvalidInput, match=rf"^PNG has more than {allowed} {kind} chunks; re-encode it$"):
        decode_image(png_with_chunks_before_its_data(*[chunk] * (allowed + 1)), GREY_8, LIMITS)
    plain_text = png_chunk(b"iTXt", b"k\0\0\0\0\0" + b"x" * 100)  # not compressed: not counted
    decode_image(png_with_chunks_before_its_data(*[plain_text] * 100), GREY_8, LIMITS)


def test_a_png_text_chunk_pillow_inflates_is_counted_whatever_its_keyword_or_compression_flag():
    """Found in review: Pillow inflates an iTXt for any flag but 0, after a keyword of any length."""
    for body in (b"k\0\2\0\0", b"k" * 100 + b"\0\1\0\0"):
        chunk = png_chunk(b"iTXt", body + b"\0" + zlib.compress(b"x" * 100))
        with pytest.raises(InvalidInput, match=r"^PNG has more than 16 zTXt or compressed iTXt chunks"):
            decode_image(png_with_chunks_before_its_data(*[chunk] * 17), GREY_8, LIMITS)


def test_a_png_text_chunk_named_exif_is_text_not_exif():
    """Found in review: Pillow keeps a compressed text chunk named "exif" as text, which was refused as corrupt."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("exif", "hello", zip=True)
    assert decode_image(encode(gradient(), "PNG", pnginfo=info), GREY_8, LIMITS).shape == (1, 8, 8)


def rle8_bmp(width: int, height: int, runs: bytes) -> bytes:
    """An 8-bit grey BMP of ``width`` x ``height`` whose pixel data is the RLE8 ``runs``."""
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(runs), 0, 0, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(runs), 0, 0, offset) + info + palette + runs


def test_an_rle_compressed_bmp_is_decoded_when_small_and_refused_when_large_or_padded_with_runs():
    """Found in review: Pillow decodes RLE in Python, a step per run and per pixel (40 Mpx took 6.6 s and 499 MB, 8M
    runs that set nothing 5.2 s); RLE BMPs are icon-sized, so those over 256x256 are refused."""
    rows = b"".join(bytes((8, 10 * row)) + b"\0\0" for row in range(8)) + b"\0\1"  # a run of 8 per row, bottom up
    np.testing.assert_array_equal(decode_image(rle8_bmp(8, 8, rows), GREY_8, LIMITS)[0, :, 0], np.arange(70, -1, -10))
    with pytest.raises(InvalidInput, match=r"^BMP is RLE-compressed and 257x256 = 65792 pixels, over the 65536 read"):
        decode_image(rle8_bmp(257, 256, rows), GREY_8, LIMITS)
    decode_image(rle8_bmp(8, 8, rows[:-2] + b"\0\2\0\0" * 20 + b"\0\1"), GREY_8, LIMITS)  # 114 bytes: within 290
    decode_image(rle8_bmp(8, 8, rows + b"\0" * 65_536), GREY_8, LIMITS)  # bytes after the runs: some let pass
    with pytest.raises(
        InvalidInput, match=r"^BMP has 80034 bytes of RLE data for 8x8 pixels, more than its runs take$"
    ):
        decode_image(rle8_bmp(8, 8, rows[:-2] + b"\0\2\0\0" * 20_000 + b"\0\1"), GREY_8, LIMITS)


def test_a_long_run_of_jpeg_fill_bytes_is_read_no_further_than_the_limit(monkeypatch):
    """Reading all 16 MB of a run held the GIL for 23 ms before the run was refused."""
    longest_read = []

    class RecordingStray:
        def match(self, data, pos=0, endpos=sys.maxsize):
            found = STRAY.match(data, pos, endpos)
            longest_read.append(found.end() - pos)
            return found

    STRAY = codecs._JPEG_STRAY
    monkeypatch.setattr(codecs, "_JPEG_STRAY", RecordingStray())
    for run in (b"\xff" * 500_000, b"\x00" * 500_000):
        with pytest.raises(InvalidInput, match=r"^JPEG has over 1024 fill or stray bytes"):
            decode_image(jpeg_with_before_its_scan(run), GREY_8, LIMITS)
        assert max(longest_read) <= 1024 + 2  # the limit, and one byte to see it is over


def gif_with_before_its_frame(extra: bytes) -> bytes:
    """A valid 8x8 GIF with ``extra`` bytes (extensions, stray bytes) placed just before its frame."""
    data = encode(Image.new("L", (8, 8), 9), "GIF")
    packed = data[10]
    frame_start = 13 + (3 << ((packed & 7) + 1) if packed & 0x80 else 0)
    return data[:frame_start] + extra + data[frame_start:]


def gif_with_a_comment_of_sub_blocks(count: int) -> bytes:
    """A valid 8x8 GIF whose comment extension, before the frame, has ``count`` one-byte sub-blocks."""
    return gif_with_before_its_frame(b"\x21\xfe" + b"\x01x" * count + b"\x00")


def test_a_gif_of_over_10000_extension_sub_blocks_before_its_frame_is_refused_before_it_is_opened():
    """Found in review: Pillow reads them in Python, 2M in 4 MB took 1 s."""
    assert decode_image(gif_with_a_comment_of_sub_blocks(10_000), GREY_8, LIMITS)[0, 0, 0] == 9
    with pytest.raises(InvalidInput, match=r"^GIF has over 10000 extension blocks before its first frame"):
        decode_image(gif_with_a_comment_of_sub_blocks(10_001), GREY_8, LIMITS)


def test_stray_bytes_before_a_gifs_frame_are_refused_past_1024_wherever_they_are():
    """Found in review: Pillow skips bytes that start no block one at a time, in Python (4 MB took 0.7 s), and the
    walk stopped at the first of them, so extensions after them went uncounted too."""
    comment = b"\x21\xfe\x01x\x00"
    assert decode_image(gif_with_before_its_frame((comment + b"A" * 512) * 2), GREY_8, LIMITS)[0, 0, 0] == 9
    with pytest.raises(InvalidInput, match=r"^GIF has over 1024 stray bytes before its first frame; re-encode it$"):
        decode_image(gif_with_before_its_frame((comment + b"A" * 512) * 2 + b"\x00"), GREY_8, LIMITS)
    hidden = b"A" + b"\x21\xfe" + b"\x01x" * 10_001 + b"\x00"
    with pytest.raises(InvalidInput, match=r"^GIF has over 10000 extension blocks before its first frame"):
        decode_image(gif_with_before_its_frame(hidden), GREY_8, LIMITS)


def test_the_request_pixel_pass_checks_structure_before_it_opens_each_image():
    """Found in review: it opened each image first, so a chunk-flooded PNG in an OIP batch of 11 cost 2.5 s a PNG."""
    with pytest.raises(InvalidInput, match="PNG has more than 10000 chunks"):
        check_request_pixels([png_with_empty_chunks(10_000)], LIMITS)


def test_oversize_bytes_are_refused_before_decoding():
    with pytest.raises(InvalidInput, match=r"over the limit of 10 \(--max-image-bytes\)"):
        decode_image(
            encode(gradient(), "PNG"),
            GREY_8,
            DecodeLimits(max_image_bytes=10, max_image_pixels=100, max_request_pixels=100),
        )


def test_top_k_sorts_by_probability_with_labels_and_stable_ties():
    scores = top_k(np.array([0.1, 0.5, 0.1, 0.3], np.float32), ["a", "b", "c", "d"], 3)
    assert [(s.label, s.index) for s in scores] == [("b", 1), ("d", 3), ("a", 0)]
    assert scores[0].probability == pytest.approx(0.5)
