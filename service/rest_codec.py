"""The Open Inference Protocol's REST bodies <-> its gRPC messages, so one code path answers both.

A REST inference request (KServe v2 JSON, optionally followed by Triton's binary tensor data) becomes a
``ModelInferRequest`` with every input as raw bytes, whichever way it came: JSON ``data`` is packed by datatype,
binary data is sliced off the body by each input's ``binary_data_size``. The gRPC servicer then checks and
answers it exactly as it would a gRPC call. Its ``ModelInferResponse`` goes back as JSON, each output as
``data`` or, when the client asked (``binary_data`` on the output, ``binary_data_output`` on the request), as
binary data after the JSON. Everything a client can get wrong here raises ``InvalidInput`` saying what.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from convray.oip import inference_pb2 as oip
from convray.service.errors import InvalidInput, shown, shown_items
from convray.service.oip_codec import MAX_DIMS, deserialize_bytes, serialize_bytes

HEADER_LENGTH = "Inference-Header-Content-Length"
"""Triton's header giving the JSON part's length when binary tensor data follows it in the body."""
BINARY_DATA_SIZE = "binary_data_size"  # on a tensor: its bytes in the binary part
BINARY_DATA = "binary_data"  # on a requested output: send it as binary data
BINARY_DATA_OUTPUT = "binary_data_output"  # on the request: every output as binary data, unless it says otherwise
_NUMERIC = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
MAX_JSON_CONTAINERS = 65_536
"""The most JSON objects and lists a body may hold, counted before it is parsed: parsing them holds the GIL, and
2 MiB of ``[[],[],...]`` held it 0.2 s (found in review). A nested 3x224x224 tensor has 676 lists."""
MAX_JSON_STRINGS = 65_536
"""The most JSON strings (keys included) a body may hold, counted before it is parsed, as the containers are."""
MAX_TENSORS = 16
"""The most inputs, and the most outputs, a request may name (each is read in Python: 42K inputs took 0.47 s)."""
_REQUEST_KEYS = frozenset({"id", "parameters", "inputs", "outputs"})
_INPUT_KEYS = frozenset({"name", "shape", "datatype", "parameters", "data"})
_OUTPUT_KEYS = frozenset({"name", "parameters"})


def parse_infer_request(
    body: bytes, header_length: int | None, model_name: str, model_version: str
) -> tuple[oip.ModelInferRequest, set[str]]:
    """The gRPC request for a REST inference body, and the outputs to send back as binary data (``"*"``: all).

    ``header_length``: the ``Inference-Header-Content-Length`` header, when binary data follows the JSON. An
    output is sent as binary data when it asks (``binary_data``), or when it does not say and the request asks
    for all (``binary_data_output``, which tritonclient.http sends when it names no output).
    """
    if header_length is None:
        header, binary = body, b""
    elif not 0 <= header_length <= len(body):
        raise InvalidInput(f"{HEADER_LENGTH} is {header_length}, but the body has {len(body)} bytes")
    else:  # the binary part as a view: each input is copied once, into its protobuf field
        header, binary = body[:header_length], memoryview(body)[header_length:]
    document = _json_object(header, "the request body")
    _no_unknown_keys(document, _REQUEST_KEYS, "the request")
    request = oip.ModelInferRequest(model_name=model_name, model_version=model_version)
    if "id" in document:
        request.id = _typed(document["id"], str, "the request's id")
    parameters = dict(_typed(document.get("parameters", {}), dict, "the request's parameters"))
    binary_default = _typed(parameters.pop(BINARY_DATA_OUTPUT, False), bool, f"parameter {BINARY_DATA_OUTPUT!r}")
    _set_parameters(request.parameters, parameters, "the request")
    inputs = _typed(document.get("inputs"), list, "the request's inputs")
    outputs = _typed(document.get("outputs", []), list, "the request's outputs")
    if len(inputs) > MAX_TENSORS or len(outputs) > MAX_TENSORS:  # convray's models take one input (found in review)
        raise InvalidInput(
            f"the request has {len(inputs)} inputs and {len(outputs)} outputs; at most {MAX_TENSORS} of each are read"
        )
    offset = 0
    for index, tensor in enumerate(inputs):
        offset = _add_input(request, _typed(tensor, dict, f"input {index}"), index, binary, offset)
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data follow the inputs' binary_data_size in all")
    as_binary = {"*"} if binary_default and not outputs else set()
    for index, output in enumerate(outputs):
        output = _typed(output, dict, f"output {index}")
        _no_unknown_keys(output, _OUTPUT_KEYS, f"output {index}")
        name = _typed(output.get("name"), str, f"the name of output {index}")
        where = f"output {shown(name)}"
        output_parameters = dict(_typed(output.get("parameters", {}), dict, f"{where}: parameters"))
        if _typed(output_parameters.pop(BINARY_DATA, binary_default), bool, f"{where}: {BINARY_DATA}"):
            as_binary.add(name)
        _set_parameters(request.outputs.add(name=name).parameters, output_parameters, where)
    return request, as_binary


def parse_index_request(body: bytes) -> oip.RepositoryIndexRequest:
    """Triton's repository index body: ``{"ready": true|false}``, or nothing."""
    document = _small_json_object(body, frozenset({"ready"}))
    return oip.RepositoryIndexRequest(ready=_typed(document.get("ready", False), bool, "'ready'"))


def add_repository_parameters(body: bytes, request: Any) -> None:
    """A model load's or unload's body, ``{"parameters": {...}}`` or nothing, into ``request.parameters``.

    ModelRepositoryParameters hold a bool, an integer or a string; the servicer refuses the ones it does not know.
    """
    document = _small_json_object(body, frozenset({"parameters"}))
    parameters = _typed(document.get("parameters", {}), dict, "'parameters'")
    _set_parameters(request.parameters, parameters, "the request", doubles=False)


def infer_response_body(response: oip.ModelInferResponse, binary: set[str]) -> tuple[bytes, int | None]:
    """The REST body for a gRPC inference reply, and the JSON part's length when binary data follows it."""
    outputs, chunks = [], []
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if tensor.name in binary or "*" in binary:
            entry["parameters"] = {BINARY_DATA_SIZE: len(raw)}
            chunks.append(raw)
        elif tensor.datatype == "BYTES":
            items = deserialize_bytes(raw, math.prod(tensor.shape))
            entry["data"] = [item.decode("utf-8", errors="replace") for item in items]
        else:
            entry["data"] = np.frombuffer(raw, dtype=_NUMERIC[tensor.datatype]).tolist()
        outputs.append(entry)
    document: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        document["id"] = response.id
    if response.parameters:
        document["parameters"] = {key: _parameter_value(value) for key, value in response.parameters.items()}
    document["outputs"] = outputs
    header = orjson.dumps(document)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def message_json(message: Message) -> dict[str, Any]:
    """A gRPC reply (metadata, config, statistics) as the REST API's JSON, written as Triton writes it.

    The proto's field names, enums by name, every field with its value even when it is the default (a count of 0
    is there), and 64-bit integers as numbers (protobuf's own JSON mapping writes them as strings). A message field
    left unset is left out.
    """
    document: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            document[field.name] = {key: _field_json(field.message_type.fields_by_name["value"], item)
                                    for key, item in value.items()}  # fmt: skip
        elif _repeated(field):
            document[field.name] = [_field_json(field, item) for item in value]
        elif field.type == FieldDescriptor.TYPE_MESSAGE and not message.HasField(field.name):
            continue
        elif field.containing_oneof is not None and message.WhichOneof(field.containing_oneof.name) != field.name:
            continue  # a oneof's other choices (an InferParameter holds one)
        else:
            document[field.name] = _field_json(field, value)
    return document


def _repeated(field: FieldDescriptor) -> bool:
    if hasattr(field, "is_repeated"):  # protobuf 6.30 and later; ``label`` is gone in 7
        return bool(field.is_repeated)
    return bool(field.label == FieldDescriptor.LABEL_REPEATED)


def _field_json(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_json(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values_by_number[value].name
    return value


def _add_input(
    request: oip.ModelInferRequest, tensor: dict[str, Any], index: int, binary: bytes | memoryview, offset: int
) -> int:
    """Add input ``index`` with its content as raw bytes; returns where the next input's binary data starts."""
    _no_unknown_keys(tensor, _INPUT_KEYS, f"input {index}")
    name = _typed(tensor.get("name"), str, f"the name of input {index}")
    where = f"input {shown(name)}"
    datatype = _typed(tensor.get("datatype"), str, f"{where}: datatype")
    shape = _typed(tensor.get("shape"), list, f"{where}: shape")
    if len(shape) > MAX_DIMS or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidInput(f"{where}: shape must be a list of at most {MAX_DIMS} integers")
    parameters = dict(_typed(tensor.get("parameters", {}), dict, f"{where}: parameters"))
    size = parameters.pop(BINARY_DATA_SIZE, None)
    added = request.inputs.add(name=name, datatype=datatype)
    try:
        added.shape[:] = shape
    except ValueError:  # past int64
        raise InvalidInput(f"{where}: shape {shown(str(shape))} is out of range") from None
    _set_parameters(added.parameters, parameters, where)
    if size is not None:
        if "data" in tensor:
            raise InvalidInput(f"{where} has both 'data' and {BINARY_DATA_SIZE!r}; send one")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
            raise InvalidInput(f"{where}: {BINARY_DATA_SIZE} {str(size)[:40]} goes past the binary data "
                               f"({len(binary) - offset} bytes left)")  # fmt: skip
        request.raw_input_contents.append(bytes(binary[offset : offset + size]))
        return offset + size
    if "data" not in tensor:
        raise InvalidInput(f"{where} has no 'data' (nor {BINARY_DATA_SIZE!r} for binary data)")
    request.raw_input_contents.append(_packed(tensor["data"], datatype, where))
    return offset


def _packed(data: Any, datatype: str, where: str) -> bytes:
    """JSON ``data`` (nested or flat, row-major) as the raw bytes of its datatype."""
    items, kinds = _flat(data)
    if datatype == "BYTES":
        if not kinds <= {str}:
            raise InvalidInput(f"{where}: BYTES data must be strings (binary data carries raw bytes)")
        return serialize_bytes([item.encode() for item in items])
    dtype = _NUMERIC.get(datatype)
    if dtype is None:
        raise InvalidInput(f"{where}: unknown datatype {shown(datatype)}; one of {sorted([*_NUMERIC, 'BYTES'])}")
    if not kinds <= {int, float, bool}:  # true and false for BOOL
        raise InvalidInput(f"{where}: {datatype} data must be numbers")
    if dtype.kind in "iu" and not kinds <= {int, bool}:
        raise InvalidInput(f"{where}: {datatype} data must be integers")
    try:
        with np.errstate(over="raise", invalid="raise"):
            return np.asarray(items, dtype=dtype).tobytes()
    except (OverflowError, FloatingPointError, ValueError):
        raise InvalidInput(f"{where}: a value does not fit {datatype}") from None


def _flat(data: Any) -> tuple[list[Any], set[type]]:
    """Row-major elements of nested lists (a scalar alone is one element), and the set of their types.

    Evenly nested lists, as tensors are, are flattened a level at a time in C (2M values took an element-wise walk
    0.12 s, found in review); lists nested unevenly are walked element by element. The types as a set: parsed JSON
    holds exactly these types, and collecting them took 3.6 ms for a 3x224x224 tensor where an isinstance per value
    took 37 ms.
    """
    if not isinstance(data, list):
        return [data], {type(data)}
    level = data
    while True:
        kinds = set(map(type, level))
        if list not in kinds:
            return level, kinds
        if kinds != {list}:
            break
        level = list(itertools.chain.from_iterable(level))
    items: list[Any] = []
    pending = [iter(level)]  # from the levels already flattened
    while pending:  # iterative: a deeply nested body must not exhaust the recursion limit
        for item in pending[-1]:
            if isinstance(item, list):
                pending.append(iter(item))
                break
            items.append(item)
        else:
            pending.pop()
    return items, set(map(type, items))


def _set_parameters(target: Any, values: Mapping[str, Any], where: str, doubles: bool = True) -> None:
    """JSON parameters as InferParameters: a bool, an integer (int64), another number (double) or a string.

    ``doubles`` False: parameters without a double (ModelRepositoryParameter), where another number is refused.
    """
    for key, value in values.items():
        parameter = target[key]
        if isinstance(value, bool):
            parameter.bool_param = value
        elif isinstance(value, int) and -(2**63) <= value < 2**63:
            parameter.int64_param = value
        elif doubles and isinstance(value, float) and math.isfinite(value):
            parameter.double_param = value
        elif isinstance(value, str):
            parameter.string_param = value
        else:
            kinds = "bool, number or string" if doubles else "bool, integer or string"
            raise InvalidInput(f"parameter {shown(key)} on {where or 'an output'} must be a {kinds}")


def _parameter_value(parameter: oip.InferParameter) -> Any:
    choice = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, choice) if choice else None


def _json_object(text: bytes, what: str) -> dict[str, Any]:
    """``text`` parsed as a JSON object, after its containers and strings are counted (``MAX_JSON_CONTAINERS``).

    orjson, not ``json``: it parses numbers 6-27 times as fast (2 MiB of ``1e-400`` took the standard library
    0.4 s holding the GIL, orjson 15 ms; found in review), and refuses what is not UTF-8 or nests over 1,024 deep.
    """
    containers = text.count(b"[") + text.count(b"{")  # brackets inside strings count too: an upper bound
    if containers > MAX_JSON_CONTAINERS:
        raise InvalidInput(f"{what} holds {containers} JSON objects and lists, over the {MAX_JSON_CONTAINERS} read")
    strings = text.count(b'"') // 2
    if strings > MAX_JSON_STRINGS:
        raise InvalidInput(f"{what} holds {strings} JSON strings, over the {MAX_JSON_STRINGS} read")
    try:
        document = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"{what} is not valid JSON ({str(exc)[:200]})") from None
    return _typed(document, dict, what)


def _small_json_object(body: bytes, known: frozenset[str]) -> dict[str, Any]:
    """A repository request's JSON object, with only ``known`` keys; an empty body is ``{}``."""
    if not body.strip():
        return {}
    document = _json_object(body, "the request body")
    _no_unknown_keys(document, known, "the request")
    return document


def _typed(value: Any, kind: type, what: str) -> Any:
    """``value``, refused unless it is a ``kind`` (a JSON object, list, string or bool); bool is never an int here."""
    names = {dict: "a JSON object", list: "a list", str: "a string", bool: "true or false"}
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise InvalidInput(f"{what} must be {names[kind]}")
    return value


def _no_unknown_keys(document: Mapping[str, Any], known: frozenset[str], where: str) -> None:
    unknown = set(document).difference(known)
    if unknown:
        raise InvalidInput(f"unknown key(s) {shown_items(unknown)} in {where}; known: {sorted(known)}")
