"""How many fields a serialized protobuf message holds, counted from its wire bytes before it is parsed.

Protobuf parses a message whole, on the event loop, holding the GIL, and builds every submessage it meets:
a message made of tiny ones costs tens of nanoseconds and about 40 bytes of memory per byte (64 MiB of
empty OIP ``inputs`` took 4.4 s and 2.8 GB on the 2-core machine), so one within gRPC's size limit could
hold a front end for seconds and take gigabytes. ``count_fields`` walks the wire format instead,
descending into the fields its descriptor types as messages, and stops once past a budget: a message of a
million tiny fields is refused after the budget's worth of steps.

It is stricter than protobuf's parser, never looser: wire format it cannot follow (groups, which proto3 never
sends and the parser would keep as unknown fields; lengths past the end; nesting past ``MAX_DEPTH``) is
refused, since anything it did not count could hide the fields it exists to bound.
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor

MAX_REQUEST_FIELDS = 16_384
"""Most protobuf fields, nested ones included, a large request may hold: 4,096 encoded images as BYTES elements
(the largest batch) and their tensor's other fields fit four times. A tensor's values are one field when packed,
as every protobuf library sends repeated numbers by default."""

MAX_PACKED_VARINT_BYTES = 16 * 1024 * 1024
"""Most bytes of packed variable-length integers a request may hold (OIP's INT, UINT and BOOL tensor contents, a
shape): protobuf decodes them one value at a time, 15 ns a byte idle and about 70 loaded, with up to about 18 bytes
of memory a byte (4 MiB took 62 ms idle; 64 MiB of a shape took 4.5 s and 1.2 GB on a loaded machine). 16 MiB holds
55 to 111 UINT8 images of 3x224x224 in ``uint_contents`` (a value under 128 takes one byte, others two: 74 of random
pixels), over the default --max-batch-size of 32; ``raw_input_contents`` holds any number, and FP32 values are not
varints."""

MAX_DEPTH = 16  # messages nested in messages; OIP nests four deep (request, input, contents or parameters, value)

_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5
_VARINT_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_BOOL,
        FieldDescriptor.TYPE_ENUM,
    }
)


class WireFormatError(ValueError):
    """The bytes are not protobuf wire format that ``count_fields`` follows; the message says where."""


class OverBudget(ValueError):
    """The message holds more than a budget allows (fields, or bytes of packed varints); the message says which."""

    def __init__(self, message: str, packed_integers: bool = False) -> None:
        super().__init__(message)
        self.packed_integers = packed_integers  # the packed varints' budget, not the fields'


def count_fields(
    data: bytes | memoryview,
    descriptor: Descriptor,
    budget: int = MAX_REQUEST_FIELDS,
    packed_varint_budget: int = MAX_PACKED_VARINT_BYTES,
) -> int:
    """The fields ``data`` holds, counting those of the messages nested in it.

    Counting stops as soon as it passes ``budget``, so it takes at most ``budget`` steps. Packed repeated integers
    are one field each, but their bytes are added up against ``packed_varint_budget``.

    Raises:
        OverBudget: over ``budget`` fields or ``packed_varint_budget`` bytes of packed varints.
        WireFormatError: ``data`` is not wire format this walk follows (see the module docstring).
    """
    view = memoryview(data)
    count = packed_varint_bytes = 0
    pending = [(0, len(view), descriptor, 0)]  # spans of messages still to walk: start, end, type, depth
    while pending:
        position, end, message, depth = pending.pop()
        while position < end:
            key, position = _varint(view, position, end)
            count += 1
            if count > budget:
                raise OverBudget(f"over {budget} protobuf fields, nested ones included")
            number, wire_type = key >> 3, key & 7
            if wire_type == _VARINT:
                _, position = _varint(view, position, end)
            elif wire_type == _FIXED64:
                position += 8
            elif wire_type == _FIXED32:
                position += 4
            elif wire_type == _LENGTH_DELIMITED:
                length, position = _varint(view, position, end)
                field = message.fields_by_number.get(number) if message is not None else None
                if field is not None and field.type == FieldDescriptor.TYPE_MESSAGE:
                    if depth + 1 > MAX_DEPTH:
                        raise WireFormatError(f"messages nested over {MAX_DEPTH} deep")
                    pending.append((position, position + length, field.message_type, depth + 1))
                elif field is not None and field.type in _VARINT_TYPES:  # packed: decoded one value at a time
                    packed_varint_bytes += length
                    if packed_varint_bytes > packed_varint_budget:
                        raise OverBudget(f"over {packed_varint_budget} bytes of packed integers", packed_integers=True)
                position += length
            else:
                raise WireFormatError(f"wire type {wire_type} of field {number} (groups are not accepted)")
            if position > end:
                raise WireFormatError(f"field {number} runs past the end of its message")
    return count


def _varint(view: memoryview, position: int, end: int) -> tuple[int, int]:
    """The varint at ``position`` and the position after it.

    Raises:
        WireFormatError: it runs past ``end`` or past 10 bytes.
    """
    value = shift = 0
    while position < end and shift < 70:
        byte = view[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
    raise WireFormatError("a varint runs past the end of its message or past 10 bytes")
