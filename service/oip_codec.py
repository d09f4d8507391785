"""Open Inference Protocol tensors <-> numpy: inputs in, probabilities (or top-k strings) out.

A model takes ONE input, either ``input`` (FP32 or UINT8, NCHW at the model's size, plain pixel
values 0..255: the model's own normalisation is applied server-side) or ``image`` (BYTES, one encoded
image per element). It has one output, ``probabilities`` (FP32, one row per image). Everything a
client can get wrong raises ``InvalidInput`` saying what was expected.
"""

from __future__ import annotations

import base64
import binascii
import functools
import itertools
import math
import struct
import time
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from convray.oip import inference_pb2 as oip
from convray.service.errors import InvalidInput, shown, shown_items
from convray.workers.repository import InputContract

PIXELS_INPUT = "input"
IMAGE_INPUT = "image"
OUTPUT = "probabilities"
CLASSIFICATION = "classification"
CONTENT_TYPE = "content_type"  # MLServer's codec name for a tensor or request
TIMEOUT = "timeout"  # Triton's request parameter: microseconds the request may take
_CONTENT_TYPES = {PIXELS_INPUT: ("np",), IMAGE_INPUT: ("base64",)}  # MLServer's, per input, that convray reads
MAX_DIMS = 8  # no input has more than 4; checked before a shape a client sent is copied or shown
_PIXEL_DTYPES = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("u1")}
_INPUT_PARAMETERS = frozenset({CONTENT_TYPE})  # the one parameter an input may carry
_FP32_255_BITS = 0x437F0000  # 255.0's float32 bits
_LENGTH = struct.Struct("<I")


class ModelInput(NamedTuple):
    """A request's input: decoded pixels (N, C, H, W) uint8, or encoded images, never both.

    This and ``RequestedOutput`` are named tuples, not frozen dataclasses: built per request, in a third of the time.
    """

    pixels: np.ndarray | None = None
    images: list[bytes] | None = None
    base64: bool = False  # the images are base64 text (content_type), for ``from_base64`` to turn into images

    @property
    def count(self) -> int:
        """Images in the request."""
        return len(self.pixels) if self.pixels is not None else len(self.images or [])


class RequestedOutput(NamedTuple):
    """An output the client asked for, and the top-k of the classification extension (0 = plain)."""

    name: str
    classification_k: int = 0


_ALL_OUTPUTS = (RequestedOutput(OUTPUT),)  # what a request naming no output gets: built once


def parse_version(text: str) -> int:
    """An OIP version string as convray's version number: '' is 0 (the latest loaded)."""
    if text == "":
        return 0
    # ASCII digits only: str.isdigit() also accepts '²' and '٣', which int() refuses or reads as another number.
    # 18 digits fit the native API's int64 versions (and keep int() clear of Python's 4300-digit limit).
    if not (text.isascii() and text.isdigit() and len(text) <= 18) or int(text) < 1:
        raise InvalidInput(f"model version must be empty (latest) or a positive integer, got {text[:40]!r}")
    return int(text)


def reject_parameters(parameters: Mapping[str, object], where: str, allowed: frozenset[str] = frozenset()) -> None:
    """Refuse parameters convray does not support, naming the first of them.

    Only as many keys are looked at as it takes to find those (a request may carry millions: a set of 1.6M took
    0.7 s on the event loop; found in review).
    """
    if not parameters:  # the common case, and the cheap check
        return
    unsupported = list(itertools.islice((key for key in parameters if key not in allowed), 8))
    if unsupported:
        total = len(parameters) - sum(key in parameters for key in allowed)
        extra = f"; supported: {sorted(allowed)}" if allowed else ""
        raise InvalidInput(f"unsupported parameter(s) {shown_items(unsupported, total=total)} on {where}{extra}")


def check_content_type(parameters: Mapping[str, oip.InferParameter], where: str, accepted: tuple[str, ...]) -> None:
    """Accept MLServer's ``content_type`` parameter where it names what convray reads there anyway.

    MLServer's codecs set it on every input ("np" for a numpy tensor) and on requests; refusing it would turn
    away MLServer clients. Any other value says the data is something convray would misread.
    """
    if CONTENT_TYPE not in parameters:
        return
    parameter = parameters[CONTENT_TYPE]
    if parameter.WhichOneof("parameter_choice") != "string_param":
        raise InvalidInput(f"content_type on {where} must be a string_param")
    value = parameter.string_param
    if value not in accepted:
        raise InvalidInput(f"content_type {shown(value)} on {where} is not supported; accepted: {list(accepted)}")


def with_timeout(parameters: Mapping[str, oip.InferParameter], deadline: float | None) -> float | None:
    """``deadline`` (time.monotonic()), brought forward by Triton's ``timeout`` request parameter when it is sooner.

    tritonclient's ``infer(..., timeout=us)`` sends it: microseconds the request may take, 0 for no limit. A request
    still queued when it passes is dropped unrun and answered DEADLINE_EXCEEDED, as one past the client's deadline.
    """
    if TIMEOUT not in parameters:
        return deadline
    parameter = parameters[TIMEOUT]
    if parameter.WhichOneof("parameter_choice") != "int64_param" or parameter.int64_param < 0:
        raise InvalidInput("'timeout' must be an int64_param of microseconds, 0 or more (0: no limit)")
    if parameter.int64_param == 0:
        return deadline
    own = time.monotonic() + parameter.int64_param / 1e6
    return own if deadline is None else min(deadline, own)


def deserialize_bytes(raw: bytes, count: int, max_image_bytes: int | None = None) -> list[bytes]:
    """Split a BYTES tensor's raw content (4-byte little-endian length, then the bytes, repeated).

    ``max_image_bytes``: the elements are images, refused past that size from their length before they are copied
    (a 64 MiB one was copied on the event loop, 40 ms, before the decoder refused it; found in review).
    """
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInput(f"malformed BYTES tensor: element {len(items)} has a truncated 4-byte length prefix")
        (length,) = _LENGTH.unpack_from(raw, offset)
        if max_image_bytes is not None and length > max_image_bytes:
            raise InvalidInput(
                f"image {len(items)} is {length} bytes, over the limit of {max_image_bytes} (--max-image-bytes)"
            )
        offset += 4
        if offset + length > len(raw):
            raise InvalidInput(
                f"malformed BYTES tensor: element {len(items)} claims {length} bytes "
                f"but only {len(raw) - offset} remain"
            )
        items.append(raw[offset : offset + length])
        offset += length
        if len(items) > count:  # now, not after splitting a large buffer into millions of elements on the loop
            raise InvalidInput(f"BYTES tensor holds more than the {count} element(s) its shape says")
    if len(items) != count:
        raise InvalidInput(f"BYTES tensor holds {len(items)} element(s) but its shape says {count}")
    return items


def serialize_bytes(items: list[bytes]) -> bytes:
    """The raw content of a BYTES tensor."""
    return b"".join(_LENGTH.pack(len(item)) + item for item in items)


def read_input(
    request: oip.ModelInferRequest, contract: InputContract, max_batch_size: int, max_image_bytes: int | None = None
) -> ModelInput:
    """The request's one input tensor, checked against the model's contract and batch limit.

    ``max_image_bytes``: raw encoded images over it are refused before they are split off (``deserialize_bytes``).
    """
    inputs = request.inputs  # each access to a protobuf field builds a new wrapper: taken once
    if len(inputs) != 1:
        raise InvalidInput(
            f"expected exactly one input, {PIXELS_INPUT!r} (FP32/UINT8 NCHW) or {IMAGE_INPUT!r} (BYTES); "
            f"got {len(inputs)}"
        )
    tensor = inputs[0]
    name, parameters = tensor.name, tensor.parameters
    if parameters:  # MLServer's content_type, if anything; the text naming the input is built only then
        where = f"input {shown(name)}"
        if name in _CONTENT_TYPES:  # an unknown input is refused as such below
            check_content_type(parameters, where, _CONTENT_TYPES[name])
        reject_parameters(parameters, where, _INPUT_PARAMETERS)
    dims = tensor.shape
    if len(dims) > MAX_DIMS:
        raise InvalidInput(f"input {shown(name)} has a shape of {len(dims)} dimensions; inputs have at most 4")
    raw_contents = request.raw_input_contents
    if raw_contents and len(raw_contents) != 1:
        raise InvalidInput(f"raw_input_contents has {len(raw_contents)} entries for 1 input")
    raw = raw_contents[0] if raw_contents else None
    if raw is not None and tensor.HasField("contents"):
        raise InvalidInput(f"input {shown(name)} has both raw_input_contents and contents; send one")
    shape = list(dims)
    batch = shape[0] if shape else 0
    if not 1 <= batch <= max_batch_size:
        raise InvalidInput(f"batch size (first dimension of the shape) must be 1..{max_batch_size}, got {shape}")
    if name == PIXELS_INPUT:
        return ModelInput(pixels=_read_pixels(tensor, raw, shape, contract))
    if name == IMAGE_INPUT:
        # "base64" (check_content_type): MLServer's Base64Codec encoded each image; decoded with the images.
        base64 = CONTENT_TYPE in parameters  # base64 text is longer than its image: checked once decoded
        images = _read_images(tensor, raw, shape, None if base64 else max_image_bytes)
        return ModelInput(images=images, base64=base64)
    raise InvalidInput(f"unknown input {shown(name)}; inputs are {PIXELS_INPUT!r} and {IMAGE_INPUT!r}")


def _read_pixels(
    tensor: oip.ModelInferRequest.InferInputTensor, raw: bytes | None, shape: list[int], contract: InputContract
) -> np.ndarray:
    datatype = tensor.datatype
    if datatype not in _PIXEL_DTYPES:
        raise InvalidInput(f"input {PIXELS_INPUT!r} must be FP32 or UINT8, got datatype {shown(datatype)}")
    if len(shape) != 4 or shape[1] != contract.channels or shape[2] != contract.height or shape[3] != contract.width:
        expected = ", ".join(map(str, (contract.channels, contract.height, contract.width)))
        raise InvalidInput(f"input {PIXELS_INPUT!r} must have shape [N, {expected}], got {shape}")
    dtype = _PIXEL_DTYPES[datatype]
    elements = math.prod(shape)
    if raw is not None:
        if len(raw) != elements * dtype.itemsize:
            raise InvalidInput(
                f"input {PIXELS_INPUT!r}: raw content is {len(raw)} bytes, shape {shape} of {datatype} "
                f"needs {elements * dtype.itemsize}"
            )
        values = np.frombuffer(raw, dtype=dtype)
    else:
        field = "fp32_contents" if datatype == "FP32" else "uint_contents"  # where OIP puts that datatype
        typed = getattr(tensor.contents, field)
        if len(typed) != elements:
            raise InvalidInput(f"input {PIXELS_INPUT!r}: {datatype} values go in contents.{field}, which "
                               f"holds {len(typed)}; shape {shape} needs {elements}")  # fmt: skip
        values = np.asarray(typed, dtype=np.float32 if datatype == "FP32" else np.int64)
    if values.dtype != np.uint8:
        if not _all_within_0_255(values):
            raise InvalidInput(f"input {PIXELS_INPUT!r} holds pixel values 0..255; found values outside that range")
        pixels = np.empty(values.shape, np.uint8)
        np.rint(values, out=pixels, casting="unsafe")  # rounded into the uint8 array in one pass
        values = pixels
    return values.reshape(shape)


def _all_within_0_255(values: np.ndarray) -> bool:
    """Whether every value is 0..255 (NaN is not): one pass over FP32 values in range, two otherwise.

    The extremes rather than elementwise comparisons: no temporary arrays (a 224x224 RGB image is 602 KB of FP32).
    Every float32 from +0.0 to 255.0, and no other (negatives, NaN, infinities), has its bits read as an unsigned
    integer at most those of 255.0, so one maximum settles the common case (1.3 us against 2.1 for the two extremes
    on a digits image); -0.0 alone fails it while in range, and goes on to the two extremes.
    """
    if values.dtype == np.float32 and np.maximum.reduce(values.view(np.uint32)) <= _FP32_255_BITS:
        return True  # np.float32 is in native byte order, as is the uint32 view of the same bytes
    return bool(values.min() >= 0 and values.max() <= 255)  # NaN makes both comparisons false


def _read_images(
    tensor: oip.ModelInferRequest.InferInputTensor, raw: bytes | None, shape: list[int], max_image_bytes: int | None
) -> list[bytes]:
    if tensor.datatype != "BYTES":
        raise InvalidInput(
            f"input {IMAGE_INPUT!r} must be BYTES (encoded images), got datatype {shown(tensor.datatype)}"
        )
    if shape not in ([shape[0]], [shape[0], 1]):
        raise InvalidInput(f"input {IMAGE_INPUT!r} must have shape [N] or [N, 1], got {shape}")
    if raw is not None:
        images = deserialize_bytes(raw, shape[0], max_image_bytes)
    elif len(tensor.contents.bytes_contents) != shape[0]:
        raise InvalidInput(f"input {IMAGE_INPUT!r}: bytes_contents hold {len(tensor.contents.bytes_contents)} "
                           f"elements, shape {shape} needs {shape[0]}")  # fmt: skip
    else:
        images = list(tensor.contents.bytes_contents)
    return images


def from_base64(texts: Sequence[bytes]) -> list[bytes]:
    """The images a base64 ``IMAGE_INPUT`` carries (``ModelInput.base64``); about 5 ms per MB, so off the loop.

    Raises:
        InvalidInput: one is not base64; the message says which.
    """
    images = []
    for index, text in enumerate(texts):
        try:
            images.append(base64.b64decode(text, validate=True))
        except binascii.Error as exc:
            raise InvalidInput(
                f"input {IMAGE_INPUT!r}: image {index + 1} of {len(texts)} is not base64 as its content_type says: "
                f"{exc}"
            ) from None
    return images


def images_in(request: oip.ModelInferRequest) -> int:
    """How many images a request says it carries (its first input's first dimension), at least 1; unchecked."""
    if request.inputs and request.inputs[0].shape:
        return max(1, request.inputs[0].shape[0])
    return 1


def requested_outputs(request: oip.ModelInferRequest) -> Sequence[RequestedOutput]:
    """The outputs to return (all when none is named), with any classification top-k."""
    if not request.outputs:
        return _ALL_OUTPUTS
    outputs = []
    for output in request.outputs:
        if output.name != OUTPUT:
            raise InvalidInput(f"unknown output {shown(output.name)}; the output is {OUTPUT!r}")
        if outputs:  # as Triton: a reply naming one output twice could not be read by name
            raise InvalidInput(f"output {OUTPUT!r} is requested more than once")
        reject_parameters(output.parameters, f"output {shown(output.name)}", frozenset({CLASSIFICATION}))
        k = 0
        if CLASSIFICATION in output.parameters:
            parameter = output.parameters[CLASSIFICATION]
            if parameter.WhichOneof("parameter_choice") != "int64_param" or parameter.int64_param < 1:
                raise InvalidInput("'classification' must be a positive int64_param (the number of classes)")
            k = parameter.int64_param
        outputs.append(RequestedOutput(output.name, k))
    return outputs


def classification_strings(row: np.ndarray, labels: list[str], k: int) -> list[bytes]:
    """Triton's classification format for one row: ``value:index:label``, highest first (ties by index)."""
    order = np.argsort(-row, kind="stable")[:k]
    return [f"{float(row[i]):f}:{int(i)}:{labels[i]}".encode() for i in order]


def write_outputs(
    probabilities: np.ndarray, labels: list[str], outputs: Sequence[RequestedOutput], response: oip.ModelInferResponse
) -> None:
    """Fill ``response.outputs`` and ``raw_output_contents`` (one raw entry per output, in order)."""
    batch, classes = probabilities.shape
    for output in outputs:
        tensor = response.outputs.add(name=output.name)
        if output.classification_k:
            k = min(output.classification_k, classes)
            tensor.datatype, tensor.shape[:] = "BYTES", [batch, k]
            strings = [s for row in probabilities for s in classification_strings(row, labels, k)]
            response.raw_output_contents.append(serialize_bytes(strings))
        else:
            tensor.datatype, tensor.shape[:] = "FP32", [batch, classes]
            response.raw_output_contents.append(probabilities.astype("<f4", copy=False).tobytes())


def infer_response(
    model: str, version: str, request_id: str, probabilities: np.ndarray, labels: list[str],
    outputs: Sequence[RequestedOutput],
) -> oip.ModelInferResponse:  # fmt: skip
    """The ModelInferResponse to a request (its ``request_id`` echoed) carrying ``probabilities`` as ``outputs`` ask."""
    if outputs is _ALL_OUTPUTS:  # the common case: parsed from a cached encoding, 0.76 against 2.14 us built
        response = oip.ModelInferResponse.FromString(_plain_response(model, version, *probabilities.shape))
        response.raw_output_contents.append(probabilities.astype("<f4", copy=False).tobytes())
    else:
        response = oip.ModelInferResponse(model_name=model, model_version=version)
        write_outputs(probabilities, labels, outputs, response)
    if request_id:
        response.id = request_id
    return response


@functools.lru_cache(maxsize=1024)
def _plain_response(model: str, version: str, batch: int, classes: int) -> bytes:
    """A plain reply's fields but its content, encoded: one per model version and batch size served."""
    response = oip.ModelInferResponse(model_name=model, model_version=version)
    write_outputs(np.zeros((batch, classes), np.float32), [], _ALL_OUTPUTS, response)  # the one layout of a reply
    del response.raw_output_contents[:]
    return response.SerializeToString()
