"""Image bytes -> uint8 pixel arrays in a model's input contract, and probabilities -> top-k classes.

Decoding is defensive: the pixel count is checked from the header before any pixel data is decoded,
only the listed formats are tried, and every failure becomes ``InvalidInput`` naming the problem.
"""

from __future__ import annotations

import io
import itertools
import math
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, JpegImagePlugin, UnidentifiedImageError

from convray.service.errors import InvalidInput
from convray.workers.repository import InputContract

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
_EXIF_ORIENTATION = 0x0112
# Pillow's own decompression-bomb limit (89.5 Mpx, a warning, then an error at twice that) is off: ours,
# --max-image-pixels, is checked from the header right after Image.open and before any pixel is decoded. Pillow's
# would refuse a higher --max-image-pixels, and turning its warning into an error per call changed the global
# warning filters from four decode threads at once (found in review).
Image.MAX_IMAGE_PIXELS = None
# Structures whose count, not size, makes Pillow slow, checked before it opens the image (found in review):
MAX_JPEG_SCANS = 100  # each scan of a progressive JPEG re-decodes the whole image: ~40 ms a scan at 36 Mpx;
# an encoder writes about 10.
MAX_JPEG_SEGMENTS = 1_000  # markers before the first scan, each parsed by Pillow in Python (an encoder writes 10-30;
# 1M empty comments took 2 s)
MAX_JPEG_STRAY_BYTES = 1_024  # bytes between segments before the first scan (0xFF fill, junk, stuffed zeros), read by
# Pillow one at a time: 4 MB of fill took 3.9 s, 4 MB of junk 0.5 s
# Segments before the first scan whose contents Pillow walks in Python, and how many of each a JPEG may hold (an
# encoder writes one frame header, one to four DQT and at most a few Photoshop segments, and EXIF in one segment,
# or a few where it is large, which Pillow joins): 250 of 64 KB each took Pillow 1.0-1.9 s, and 250 frame headers
# 461 MB (found in review)
MAX_JPEG_SEGMENTS_OF_KIND = {"frame header (SOFn)": 1, "quantization table (DQT)": 4, "EXIF (APP1)": 16,
                             "Photoshop (APP13)": 4}  # fmt: skip
MAX_JPEG_IFD_ENTRIES = 256  # in the first directory of a JPEG's EXIF, and in its MPF index, which Pillow reads as it
# opens the file (5,400 in one segment took 95 ms); a camera writes 10-30, an MPF index about 5
MAX_JPEG_RESOLUTION_VALUES = 16  # in EXIF's resolution tags, which Pillow decodes as it opens a JPEG without JFIF
# density (0.5M rationals took 1.8 s); there is one of each
MAX_JPEG_FILL_RUN = 64 * 1024  # 0xFF fill in or between the scans, which libjpeg reads without reporting progress,
# so that Pillow re-reads its growing buffer: 15 MB took 2.2 s (found in review); in entropy-coded data 0xFF is
# stuffed. Bytes after the last end-of-image marker are never read (a flash card's 0xFF padding).
MAX_PNG_CHUNKS = 10_000  # Pillow reads each chunk in Python holding the GIL: 1.3M empty chunks in 16 MB took 8 s
# and slowed every other request; encoders write image data in chunks of 8-64 KiB (2,048 of 8 KiB in 16 MiB).
# Chunks that Pillow inflates, up to 1 MiB each (3-4 ms): 500 iCCP took 1.3 s, 9,990 after the image data 25 s (found
# in review). The PNG standard allows one ICC profile; encoders write a few text chunks.
MAX_PNG_CHUNKS_OF_KIND = {"iCCP": 1, "zTXt or compressed iTXt": 16}
MAX_BMP_RLE_TRAILING_BYTES = 64 * 1024  # past what an RLE BMP's runs can take (0.04 s at most of runs that set nothing)
MAX_BMP_RLE_PIXELS = 256 * 256  # Pillow decodes RLE-compressed BMPs in Python, a step per run and per pixel: 40 Mpx
# took 6.6 s and 499 MB, 8M runs in 16 MB 5.2 s (found in review), a 512x512 of one-pixel runs 0.12 s. Icon-sized;
# other BMPs are decoded in C.
MAX_GIF_SUB_BLOCKS = 10_000  # extension data before the first frame, read by Pillow in Python (2M took 1 s)
MAX_GIF_STRAY_BYTES = 1_024  # bytes before the first frame that start no block, which Pillow skips one at a time (4 MB
# took 0.7 s); an encoder writes none
_GIF_STRAY = re.compile(rb"[^\x21\x2c\x3b]*")  # anything but an extension (!), an image (,) or the trailer (;)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# What Pillow's header parser reads past without counting a marker: a byte other than 0xFF, 0xFF 0x00, or an 0xFF
# followed by another (fill); after it comes 0xFF and a marker's code.
_JPEG_STRAY = re.compile(rb"(?:[^\xff]|\xff\x00|\xff(?=\xff))*")
# Pillow's header parser knows the markers in its table and skips a length only for those it has a handler for:
# not SOI, EOI, the restart markers or the JPGn extensions, which a walk that reads a length after them would
# step past segments that Pillow parses (found in review).
_JPEG_HEADER_MARKERS = {code & 0xFF: handler is not None for code, (_, _, handler) in JpegImagePlugin.MARKER.items()}
_JPEG_FRAME_MARKERS = frozenset(
    code & 0xFF for code, (_, _, handler) in JpegImagePlugin.MARKER.items() if handler is JpegImagePlugin.SOF
)
_JPEG_FILL_BLOCK = b"\xff" * MAX_JPEG_FILL_RUN
# EXIF orientations and the transposition that turns each image upright (as ImageOps.exif_transpose does)
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_PREFIX = re.compile(rb"^(?:Exif\x00\x00){1,2}")  # before the TIFF structure, in JPEG and some WebP files
_TIFF_PREFIXES = {b"II*\0": "<", b"II\0*": "<", b"MM\0*": ">", b"MM*\0": ">"}  # Pillow's, but BigTIFF's
# Pillow's TIFF value types: their size, and how one value reads (None: as bytes or text, never an orientation)
_TIFF_TYPES = {
    1: (1, None), 2: (1, None), 3: (2, "H"), 4: (4, "L"), 5: (8, "LL"), 6: (1, "b"), 7: (1, None),
    8: (2, "h"), 9: (4, "l"), 10: (8, "ll"), 11: (4, "f"), 12: (8, "d"), 13: (4, "L"), 16: (8, "Q"),
}  # fmt: skip
_TIFF_UNITS = np.zeros(1 << 16, dtype=np.uint64)  # by type: its size (0: a type Pillow does not know)
_TIFF_UNITS[list(_TIFF_TYPES)] = [size for size, _ in _TIFF_TYPES.values()]
_RESOLUTION_TAGS = (0x011A, 0x011B, 0x0128)  # XResolution, YResolution, ResolutionUnit
_IFD_ENTRIES = {  # an IFD entry: tag, type, count, then the value (when it fits in 4 bytes) or its offset
    endian: np.dtype(
        [("tag", f"{endian}u2"), ("type", f"{endian}u2"), ("count", f"{endian}u4"), ("value", f"{endian}u4")]
    )  # fmt: skip
    for endian in "<>"
}
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')  # as Pillow reads it when EXIF has none
# A marker in or after entropy-coded data is 0xFF, then a code that is not a stuffed zero, a restart marker (those
# occur inside a scan's data) or fill:
_JPEG_MARKER_CODES = np.zeros(256, dtype=bool)
_JPEG_MARKER_CODES[0x01:0xD0] = _JPEG_MARKER_CODES[0xD8:0xFF] = True
_JPEG_MARKER_SEARCH_CHUNK = 1 << 20  # bytes searched at once: at most 512 Ki offsets (4 MiB) held per chunk


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds on what a client may send."""

    max_image_bytes: int
    max_image_pixels: int
    max_request_pixels: int


def request_pixels_may_exceed(count: int, limits: DecodeLimits) -> bool:
    """Whether ``count`` images could be over ``limits.max_request_pixels`` together, each within its own limit.

    When not (up to 10 images at the defaults), ``check_request_pixels`` has nothing to find: ``decode_image``
    refuses any one image over ``max_image_pixels`` from its header, before decoding it.
    """
    return count * limits.max_image_pixels > limits.max_request_pixels


def check_request_pixels(images: list[bytes], limits: DecodeLimits) -> None:
    """Refuse a request whose images' headers add up to more than ``limits.max_request_pixels``, before decoding.

    Each image may be within its own limits and the request still cost seconds of decoding and gigabytes:
    32 blank 6000x6000 PNGs are 4 MB. Only headers are read; an image whose header does not parse counts 0
    here and is refused by ``decode_image``.
    """
    total = 0
    for data in images:
        _check_structure(data)  # opening it parses what precedes the pixels, in Python (found in review)
        try:
            width, height = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS).size
        except Exception:  # noqa: BLE001, S112 (decode_image names what is wrong with it)
            continue
        total += width * height
    if total > limits.max_request_pixels:
        raise InvalidInput(
            f"the request's {len(images)} images are {total} pixels in all, over the limit of "
            f"{limits.max_request_pixels} (--max-request-pixels); send them in smaller requests"
        )


def decode_image(data: bytes, contract: InputContract, limits: DecodeLimits) -> np.ndarray:
    """Decode an encoded image to uint8 (C, H, W) in the contract's colour mode and size.

    Multi-frame images (GIF, animated WebP) use their first frame. Transparent areas are laid over
    black. 16-bit greyscale is scaled to 8 bits. Images of another size are resized (area average to shrink,
    bilinear to enlarge).

    Raises:
        InvalidInput: empty, too large, not an accepted image format, or corrupt/truncated data.
    """
    if not data:
        raise InvalidInput("image is empty: send the encoded bytes of a PNG, JPEG, WebP, BMP or GIF")
    if len(data) > limits.max_image_bytes:
        raise InvalidInput(
            f"image is {len(data)} bytes, over the limit of {limits.max_image_bytes} (--max-image-bytes)"
        )
    _check_structure(data)
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        width, height = image.size
        if width * height > limits.max_image_pixels:
            raise InvalidInput(
                f"image is {width}x{height} = {width * height} pixels, over the limit of "
                f"{limits.max_image_pixels} (--max-image-pixels)"
            )
        if image.format in ("JPEG", "MPO") and image.info.get("progressive"):  # MPO: a JPEG with more images after
            _check_scans(data)
        if image.format == "BMP" and image.info.get("compression") in (1, 2):
            _check_bmp_rle(image, len(data))
        image.seek(0)
        image.load()
        return _to_contract(image, contract)
    except InvalidInput:
        raise
    except UnidentifiedImageError:
        raise InvalidInput(f"not a decodable image; accepted formats: {', '.join(ACCEPTED_FORMATS)}") from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 (untrusted bytes: Pillow's parsers raise many kinds, struct.error too)
        raise InvalidInput(f"image data is corrupt or truncated ({type(exc).__name__}: {exc})") from None


def _check_bmp_rle(image: Image.Image, size: int) -> None:
    """Refuse an RLE-compressed BMP of over ``MAX_BMP_RLE_PIXELS``, or with more data than runs of its pixels take.

    A run takes two bytes and a skip four, each for a pixel at least, and each row ends with two, so an image's runs
    fill at most 4 x (pixels + rows) + 2 bytes (``MAX_BMP_RLE_TRAILING_BYTES`` more are let pass); past that, Pillow's
    Python decoder could be made to loop on runs that set nothing (8M in 16 MB took 5.2 s, found in review).
    """
    width, height = image.size
    if width * height > MAX_BMP_RLE_PIXELS:
        raise InvalidInput(
            f"BMP is RLE-compressed and {width}x{height} = {width * height} pixels, over the {MAX_BMP_RLE_PIXELS} "
            "read for such images; send it as PNG"
        )
    runs = size - image.tile[0][2]  # from the pixel data's offset to the end
    if runs > 4 * (width * height + height) + 2 + MAX_BMP_RLE_TRAILING_BYTES:
        raise InvalidInput(f"BMP has {runs} bytes of RLE data for {width}x{height} pixels, more than its runs take")


def _check_scans(data: bytes) -> None:
    """Refuse a progressive JPEG of more than ``MAX_JPEG_SCANS`` scans (each one a pass over the whole image).

    Only progressive JPEGs are counted (a sequential one ends its scans with its components). Every scan starts
    with the bytes 0xFFDA, so a file with at most ``MAX_JPEG_SCANS`` of them passes on one count of its bytes.
    Past that, the markers are walked from the first scan to the end-of-image marker, skipping each scan's data
    with a vectorised search (``_JpegMarkers``), so bytes after the image (a motion photo's video, an MPO's next image)
    or inside a segment are not counted. A file the walk cannot follow to its end-of-image marker (junk between
    segments, which Pillow and libjpeg skip) is judged on the plain count (found in review).
    """
    markers = _JpegMarkers(data)
    if markers.count_start_of_scan() <= MAX_JPEG_SCANS:
        return
    scans = 0
    for segments, (marker, _) in enumerate(_markers_after_first_scan(data, _check_jpeg_header(data), markers), 1):
        if marker == 0xD9:  # end of image
            return
        if segments > MAX_JPEG_SEGMENTS:  # a walk in Python per marker: bounded like the header's
            raise InvalidInput(f"JPEG has over {MAX_JPEG_SEGMENTS} markers in its image data; re-encode it")
        if marker == 0xDA:
            scans += 1
            if scans > MAX_JPEG_SCANS:
                break
    raise InvalidInput(f"JPEG has over {MAX_JPEG_SCANS} scans (an encoder writes about 10); re-encode it")


def _markers_after_first_scan(data: bytes, offset: int | None, markers: _JpegMarkers) -> Iterator[tuple[int, int]]:
    """Each marker from the first scan's on (``offset``: just past it), as (code, offset just past it).

    Each segment's data is stepped over by its length and each scan's data by a search (``markers``), until the data
    ends; the caller bounds how many it reads.
    """
    while offset is not None and offset <= len(data):
        marker = data[offset - 1]
        yield marker, offset
        if not (0xD0 <= marker <= 0xD8 or marker == 0x01):  # all but these carry a length (itself included)
            offset += int.from_bytes(data[offset : offset + 2], "big")
        offset = markers.next_after(offset)  # past any scan data


class _JpegMarkers:
    """Finds the markers in a JPEG's scan data, with numpy, one chunk at a time, so that the search lets go of the GIL.

    A regular expression search held the GIL for 0.3 s over 16 MB of 0xFF or 0xFF00 pairs in a hostile file,
    stalling the event loop; numpy takes a sixth of that, and the event loop runs meanwhile (found in review).
    """

    def __init__(self, data: bytes) -> None:
        self._bytes = np.frombuffer(data, dtype=np.uint8)
        self._start = self._end = 0
        self._found = np.empty(0, dtype=np.int64)  # offsets of the markers in [_start, _end)

    def count_start_of_scan(self) -> int:
        """How many times the bytes 0xFFDA occur, anywhere (``bytes.count`` held the GIL for 44 ms on 15 MB of 0xFF).

        Counted a chunk at a time, like the search, so that the temporaries stay at a few MiB per decode thread.
        """
        count, last = 0, len(self._bytes) - 1
        for start in range(0, last, _JPEG_MARKER_SEARCH_CHUNK):
            chunk = self._bytes[start : min(start + _JPEG_MARKER_SEARCH_CHUNK, last) + 1]
            count += int(np.count_nonzero((chunk[:-1] == 0xFF) & (chunk[1:] == 0xDA)))
        return count

    def next_after(self, offset: int) -> int | None:
        """The offset just past the first marker at or after ``offset``, or None if there is none."""
        last, offset = len(self._bytes) - 1, max(offset, 0)  # a marker's first byte can be at most at `last`
        while offset < last:
            if not self._start <= offset < self._end:  # offsets only grow, so each chunk is searched once
                self._start, self._end = offset, min(offset + _JPEG_MARKER_SEARCH_CHUNK, last)
                chunk = self._bytes[self._start : self._end + 1]
                is_marker = (chunk[:-1] == 0xFF) & _JPEG_MARKER_CODES[chunk[1:]]
                self._found = np.flatnonzero(is_marker) + self._start
            index = int(np.searchsorted(self._found, offset))
            if index < len(self._found):
                return int(self._found[index]) + 2
            offset = self._end
        return None


def _check_jpeg_header(data: bytes) -> int | None:
    """Walk a JPEG's markers from its start to its first scan, as Pillow's parser does (see ``_check_structure``).

    Pillow reads bytes between segments one at a time and goes on past an end-of-image marker, so those are
    counted and walked too; stray bytes are read no further than their limit. The tag directories Pillow reads as
    it opens the file, EXIF's and MPF's, are checked once the walk ends without a refusal.

    Returns:
        The offset just past the first scan's marker, or None if the data ended or went corrupt first (an unknown
        marker, which Pillow refuses).
    """
    directories: dict[str, bytes] = {}
    offset = _walk_jpeg_header(data, directories)
    _check_jpeg_directories(directories)
    return offset


def _walk_jpeg_header(data: bytes, directories: dict[str, bytes]) -> int | None:
    """``_check_jpeg_header``'s walk; puts the EXIF (joined as Pillow joins it) and MPF data in ``directories``."""
    offset, segments, stray = 2, 0, 0  # offset: where Pillow expects the 0xFF of a marker (after 0xFFD8)
    of_kind = dict.fromkeys(MAX_JPEG_SEGMENTS_OF_KIND, 0)
    while offset < len(data):
        run = _JPEG_STRAY.match(data, offset, offset + MAX_JPEG_STRAY_BYTES - stray + 2)  # bounded (found in review)
        stray += run.end() - offset
        if stray > MAX_JPEG_STRAY_BYTES:
            raise InvalidInput(
                f"JPEG has over {MAX_JPEG_STRAY_BYTES} fill or stray bytes before its image data; re-encode it"
            )
        offset = run.end() + 2
        if offset > len(data):
            return None
        marker = data[offset - 1]
        if marker not in _JPEG_HEADER_MARKERS:
            return None
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise InvalidInput(f"JPEG has over {MAX_JPEG_SEGMENTS} markers before its image data; re-encode it")
        if marker == 0xDA:  # the first scan: what follows is the C decoder's
            return offset
        if _JPEG_HEADER_MARKERS[marker]:  # a length, itself included; Pillow steps over the length at least
            length = max(int.from_bytes(data[offset : offset + 2], "big"), 2)
            kind = _jpeg_segment_kind(marker, data, offset + 2, offset + length)
            if kind is not None:
                of_kind[kind] += 1
                if of_kind[kind] > MAX_JPEG_SEGMENTS_OF_KIND[kind]:
                    raise InvalidInput(
                        f"JPEG has more than {MAX_JPEG_SEGMENTS_OF_KIND[kind]} {kind} segments before its image "
                        "data; re-encode it"
                    )
            if kind == "EXIF (APP1)":  # Pillow keeps the first whole and adds the rest without their "Exif\0\0"
                first = "EXIF" not in directories
                payload = data[offset + (2 if first else 8) : offset + length]
                directories["EXIF"] = payload if first else directories["EXIF"] + payload
            elif marker == 0xE2 and data.startswith(b"MPF\0", offset + 2, offset + length):  # the last one is kept
                directories["MPF"] = data[offset + 6 : offset + length]
            offset += length
    return None


def _check_jpeg_directories(directories: dict[str, bytes]) -> None:
    """Refuse EXIF or MPF data whose first directory is longer than Pillow should read as it opens a JPEG.

    Pillow loads EXIF's first directory to look for the resolution, when the JFIF header gives none, and decodes the
    MPF index whole (found in review: 5,400 entries in one segment took 95 ms, 0.5M resolution values 1.8 s).
    """
    for name, tiff in directories.items():
        directory = _ifd0_entries(_EXIF_PREFIX.sub(b"", tiff, count=1))
        if directory is None:
            continue
        entries = directory[0]
        if entries.size > MAX_JPEG_IFD_ENTRIES:
            raise InvalidInput(
                f"JPEG's {name} data has a directory of over {MAX_JPEG_IFD_ENTRIES} entries; re-encode it"
            )
        resolution = entries[np.isin(entries["tag"], _RESOLUTION_TAGS)] if name == "EXIF" else entries[:0]
        if (resolution["count"] > MAX_JPEG_RESOLUTION_VALUES).any():
            raise InvalidInput(
                f"JPEG's EXIF gives its resolution in over {MAX_JPEG_RESOLUTION_VALUES} values; re-encode it"
            )


def _jpeg_segment_kind(marker: int, data: bytes, start: int, end: int) -> str | None:
    """Which of ``MAX_JPEG_SEGMENTS_OF_KIND`` a segment is, from its marker and contents (``data[start:end]``)."""
    if marker in _JPEG_FRAME_MARKERS:
        return "frame header (SOFn)"
    if marker == 0xDB:
        return "quantization table (DQT)"
    if marker == 0xE1 and data.startswith(b"Exif\0\0", start, end):  # Pillow joins them all into one EXIF block
        return "EXIF (APP1)"
    if marker == 0xED and data.startswith(b"Photoshop 3.0\0", start, end):
        return "Photoshop (APP13)"
    return None


def _check_fill_runs(data: bytes, first_scan: int | None) -> None:
    """Refuse a JPEG holding ``MAX_JPEG_FILL_RUN`` bytes of 0xFF in a row before the end of its image (see the limit).

    Only aligned blocks are compared, with ``startswith`` (a memcmp: 2.4 ms on 16 MB of near misses), so every run
    of twice the limit is found, and a run is refused only if it has at least the limit's length. A run after the
    end-of-image marker libjpeg stops at is let be; that marker is found by walking the markers from the first scan
    (``first_scan``: just past its marker), as only a file with such a run needs (an end-of-image marker elsewhere,
    in a comment say, stops nothing: found in review).
    """
    run = next(
        (at for at in range(0, len(data) - MAX_JPEG_FILL_RUN + 1, MAX_JPEG_FILL_RUN)
         if data.startswith(_JPEG_FILL_BLOCK, at)),
        None,
    )  # fmt: skip
    if run is not None and (first_scan is None or run < _end_of_image(data, first_scan)):
        raise InvalidInput(f"JPEG has a run of {MAX_JPEG_FILL_RUN} or more 0xFF fill bytes; re-encode it")


def _end_of_image(data: bytes, offset: int) -> int:
    """Where the end-of-image marker libjpeg stops at starts, walking from just past the first scan's marker.

    The end of the data where the walk finds none within ``MAX_JPEG_SEGMENTS`` markers.
    """
    walk = _markers_after_first_scan(data, offset, _JpegMarkers(data))
    for marker, after in itertools.islice(walk, MAX_JPEG_SEGMENTS):
        if marker == 0xD9:
            return after - 2
    return len(data)


def _check_gif_extensions(data: bytes) -> None:
    """Walk a GIF's blocks up to its first frame, as Pillow's parser does (see ``_check_structure``).

    The extensions' sub-blocks are counted, and so are bytes that start no block, which Pillow skips one at a time
    (found in review); those are read no further than their limit.
    """
    packed = data[10] if len(data) > 10 else 0
    offset = 13 + (3 << ((packed & 7) + 1) if packed & 0x80 else 0)  # header, screen descriptor, colour table
    sub_blocks = stray = 0
    while offset < len(data):
        run = _GIF_STRAY.match(data, offset, offset + MAX_GIF_STRAY_BYTES - stray + 1)
        stray += run.end() - offset
        if stray > MAX_GIF_STRAY_BYTES:
            raise InvalidInput(f"GIF has over {MAX_GIF_STRAY_BYTES} stray bytes before its first frame; re-encode it")
        offset = run.end()
        if offset + 1 >= len(data) or data[offset] != 0x21:  # the first frame, the trailer or the end
            return
        offset += 2  # an extension: its introducer and label, then sized sub-blocks
        while offset < len(data) and data[offset]:
            sub_blocks += 1
            if sub_blocks > MAX_GIF_SUB_BLOCKS:
                raise InvalidInput(
                    f"GIF has over {MAX_GIF_SUB_BLOCKS} extension blocks before its first frame; re-encode it"
                )
            offset += 1 + data[offset]
        offset += 1  # the empty sub-block that ends the extension


def _check_structure(data: bytes) -> None:
    """Refuse, before Pillow opens it, a PNG, JPEG or GIF whose structure would take Pillow seconds to parse.

    That is a PNG of over ``MAX_PNG_CHUNKS`` chunks, a JPEG whose part before its first scan holds over
    ``MAX_JPEG_SEGMENTS`` markers or ``MAX_JPEG_STRAY_BYTES`` bytes between them, or a GIF with over
    ``MAX_GIF_SUB_BLOCKS`` extension sub-blocks or ``MAX_GIF_STRAY_BYTES`` stray bytes before its first frame.
    Pillow parses those in Python, whatever the pixel count, in a decode thread that a caller's deadline cannot
    stop. Only lengths are read here, at most the limit's number.
    """
    if data.startswith(b"\xff\xd8"):
        _check_fill_runs(data, _check_jpeg_header(data))
    elif data.startswith((b"GIF87a", b"GIF89a")):
        _check_gif_extensions(data)
    elif data.startswith(_PNG_SIGNATURE):
        _check_png_chunks(data)


def _check_png_chunks(data: bytes) -> None:
    """Walk a PNG's chunk lengths up to its end, counting its chunks (see ``_check_structure``)."""
    offset, chunks = len(_PNG_SIGNATURE), 0
    of_kind = dict.fromkeys(MAX_PNG_CHUNKS_OF_KIND, 0)
    while offset + 8 <= len(data):
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise InvalidInput(f"PNG has more than {MAX_PNG_CHUNKS} chunks; re-encode it")
        (length,) = struct.unpack_from(">I", data, offset)
        chunk_type = data[offset + 4 : offset + 8]
        if chunk_type == b"IEND":
            return
        kind = _png_chunk_kind(chunk_type, data, offset + 8, offset + 8 + length)
        if kind is not None:
            of_kind[kind] += 1
            if of_kind[kind] > MAX_PNG_CHUNKS_OF_KIND[kind]:
                raise InvalidInput(f"PNG has more than {MAX_PNG_CHUNKS_OF_KIND[kind]} {kind} chunks; re-encode it")
        offset += 12 + length  # length, type, data, CRC


def _png_chunk_kind(chunk_type: bytes, data: bytes, start: int, end: int) -> str | None:
    """Which of ``MAX_PNG_CHUNKS_OF_KIND`` a chunk is, from its type and contents (``data[start:end]``), if any."""
    if chunk_type == b"iCCP":
        return "iCCP"
    if chunk_type == b"zTXt":
        return "zTXt or compressed iTXt"
    if chunk_type == b"iTXt":  # a keyword, a zero, then the compression flag: Pillow inflates for any flag but 0
        keyword_end = data.find(b"\0", start, end)
        if keyword_end >= 0 and data[keyword_end + 1 : keyword_end + 2] not in (b"", b"\0"):
            return "zTXt or compressed iTXt"
    return None


GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")  # Pillow modes of single-channel images


def as_colour_mode(image: Image.Image, mode: str, orientation: float | None = None) -> Image.Image:
    """``image`` upright and in ``mode`` ("L" or "RGB"), as every model input is made (``convray kernels`` too).

    Unlike a plain ``convert``: 16-bit values are scaled to 8 bits (Pillow clips them at 255, so most 16-bit images
    turned white), and transparent pixels are laid over black. ``orientation``: ``exif_orientation`` of the image,
    where the caller has read it already.
    """
    orientation = exif_orientation(image) if orientation is None else orientation
    if orientation in _UPRIGHT:  # phone photos: rotate as the camera meant
        image = image.transpose(_UPRIGHT[orientation])
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        wide = np.asarray(image, dtype=np.uint32)
        image = Image.fromarray((wide >> 8).clip(0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert(mode)


def exif_orientation(image: Image.Image) -> float:
    """The orientation ``image`` says it was taken in (EXIF's 1-8), read as Pillow 13's ``getexif`` reads it.

    From its EXIF's first directory (or a PNG's hex "Raw profile type exif"), else its XMP's ``tiff:Orientation``;
    1 (as stored) when it says none or its EXIF cannot be read. A number other than 1-8 (a fraction, say) turns
    nothing, as in Pillow. Read here because ``getexif`` and ``ImageOps.exif_transpose`` decode every tag in Python:
    65,535 tags in 0.8 MB of EXIF took 4.7 s, one tag of 15 MB 11 s and 1.6 GB (found in review).
    """
    exif = image.info.get("exif")
    if not isinstance(exif, bytes | bytearray):  # a PNG text chunk named "exif" is text: not EXIF Pillow reads
        exif = None
    if exif is None and "Raw profile type exif" in image.info:
        try:
            exif = bytes.fromhex("".join(str(image.info["Raw profile type exif"]).split("\n")[3:]))
        except ValueError:
            exif = None
    if exif:
        found = _ifd0_orientation(_EXIF_PREFIX.sub(b"", bytes(exif), count=1))
        if found is not None:
            return found
    xmp = image.info.get("XML:com.adobe.xmp") or image.info.get("xmp")
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8", "surrogateescape")
    match = _XMP_ORIENTATION.search(xmp) if isinstance(xmp, bytes | bytearray) else None
    return int(match[2]) if match else 1


def _ifd0_entries(tiff: bytes) -> tuple[np.ndarray, str, int] | None:
    """A TIFF structure's first directory: its whole entries, byte order ("<" or ">") and where the entries start.

    None if it has no readable directory.
    """
    endian = _TIFF_PREFIXES.get(tiff[:4])
    if endian is None or len(tiff) < 8:
        return None
    (start,) = struct.unpack_from(f"{endian}L", tiff, 4)
    if start + 2 > len(tiff):
        return None
    (count,) = struct.unpack_from(f"{endian}H", tiff, start)
    count = min(count, (len(tiff) - start - 2) // 12)
    return np.frombuffer(tiff, dtype=_IFD_ENTRIES[endian], count=count, offset=start + 2), endian, start + 2


def _ifd0_orientation(tiff: bytes) -> float | None:
    """The Orientation in a TIFF structure's first directory, as Pillow 13 reads it; None if it holds none.

    Pillow reads the entries in order: it passes over a repeat of a tag it has kept, and skips one of an unknown
    type, with no value, or whose data, added to the data before it, is more than the structure holds; it stops at
    one whose data lies outside the structure; it keeps the first entry of a tag, and gives its first value. A value
    of bytes or text turns nothing (1 here). Here every repeat of a tag is passed over, where Pillow passes over only
    those of a tag whose first entry it kept (the running total and the stop can differ for such a directory).
    """
    directory = _ifd0_entries(tiff)
    if directory is None:
        return None
    entries, endian, first_entry = directory
    unit = _TIFF_UNITS[entries["type"]]
    size = unit * entries["count"].astype(np.uint64)
    first_of_tag = np.zeros(len(entries), dtype=bool)
    first_of_tag[np.unique(entries["tag"], return_index=True)[1]] = True
    out_of_line = (unit > 0) & (size > 4)  # its data is elsewhere, at the entry's offset
    counted = out_of_line & first_of_tag
    past_end = entries["value"].astype(np.uint64) + size > len(tiff)
    skipped = counted & (np.cumsum(np.where(counted, size, 0)) > len(tiff))
    unreadable = np.flatnonzero(counted & ~skipped & past_end)
    read = entries[: unreadable[0]] if len(unreadable) else entries
    kept = (unit[: len(read)] > 0) & (size[: len(read)] > 0) & ~skipped[: len(read)]
    found = np.flatnonzero(kept & (read["tag"] == _EXIF_ORIENTATION))
    if not len(found):
        return None
    index = int(found[0])
    if out_of_line[index] and past_end[index]:  # a repeat (its first entry was skipped) whose data is not there
        return None
    entry = entries[index]
    value_size, value_format = _TIFF_TYPES[int(entry["type"])]
    if value_format is None:
        return 1
    at = int(entry["value"]) if out_of_line[index] else first_entry + 12 * index + 8
    value = struct.unpack_from(f"{endian}{value_format}", tiff, at)
    if len(value) == 2:  # a (signed) rational: Pillow's is nan over 0
        return value[0] / value[1] if value[1] else math.nan
    return value[0]


# Modes whose area average, then conversion to L or RGB, is the conversion then the average (alpha premultiplied).
# Not CMYK: Pillow's CMYK to RGB multiplies the channels, so it goes to RGB first.
_RESIZABLE = ("L", "LA", "RGB", "RGBA", "I", "F")
_RESIZABLE_AS = {"1": "L", "I;16": "I", "I;16B": "I", "I;16L": "I"}  # and what some others become first
_QUARTER_TURNS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def _shrunk_towards(image: Image.Image, contract: InputContract, orientation: float) -> Image.Image:
    """``image`` area-averaged down to the contract's size (as it will stand once turned upright), if larger.

    Done before the colour conversion, which at full size cost up to 17 bytes a pixel (a 6300x6300 palette PNG
    with transparency, 5 KB, took 643 MiB to decode; found in review). Colour conversion and area averaging
    commute, up to rounding, so the pixels are those of converting first.
    """
    width, height = contract.width, contract.height
    if max(image.size) < 2 * max(width, height):
        return image  # at most a few times the input's size: converting it whole costs little
    if orientation in _QUARTER_TURNS:
        width, height = height, width
    # Each side at least twice the input's is shrunk to it; the other is left to the final resize (a long, thin
    # image too: found in review, 15x1,000,000 took 18 bytes a pixel when only both sides were looked at).
    width = width if image.width >= 2 * width else image.width
    height = height if image.height >= 2 * height else image.height
    if (width, height) == image.size:
        return image
    if image.mode in _RESIZABLE_AS:
        image = image.convert(_RESIZABLE_AS[image.mode])
    elif image.mode not in _RESIZABLE:  # palette indices (P, PA) cannot be averaged: their colours can
        transparent = "A" in image.mode or "transparency" in image.info
        image = image.convert("RGBA" if transparent else "RGB")
    return image.resize((width, height), Image.Resampling.BOX)


def _to_contract(image: Image.Image, contract: InputContract) -> np.ndarray:
    orientation = exif_orientation(image)  # read once: the shrunk image carries the same EXIF
    image = as_colour_mode(_shrunk_towards(image, contract, orientation), contract.colour_mode, orientation)
    if image.size != (contract.width, contract.height):
        shrinking = image.width >= contract.width and image.height >= contract.height
        # Area averaging when shrinking keeps every source pixel's weight (no aliasing); bilinear to enlarge.
        resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
        image = image.resize((contract.width, contract.height), resample)
    pixels = np.asarray(image, dtype=np.uint8)
    if pixels.ndim == 2:  # (H, W) -> (1, H, W)
        return pixels[None, :, :]
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))  # (H, W, C) -> (C, H, W)


@dataclass(frozen=True)
class ClassScore:
    """One class of a prediction."""

    index: int
    label: str
    probability: float


def top_k(probabilities: np.ndarray, labels: list[str], k: int) -> list[ClassScore]:
    """The ``k`` most probable classes of one row of probabilities, highest first (ties by index)."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [ClassScore(int(i), labels[i], float(probabilities[i])) for i in order]
