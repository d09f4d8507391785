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

MAX_DEPTH = 16  # messages nested in messages; OIP nests four deep (request, input, contents or parameters, value)

_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5


class WireFormatError(ValueError):
    """The bytes are not protobuf wire format that ``count_fields`` follows; the message says where."""


def count_fields(data: bytes | memoryview, descriptor: Descriptor, budget: int = MAX_REQUEST_FIELDS) -> int | None:
    """The fields ``data`` holds, counting those of the messages nested in it, or None for more than ``budget``.

    Counting stops as soon as it passes ``budget``, so it takes at most ``budget`` steps.

    Raises:
        WireFormatError: ``data`` is not wire format this walk follows (see the module docstring).
    """
    view = memoryview(data)
    count = 0
    pending = [(0, len(view), descriptor, 0)]  # spans of messages still to walk: start, end, type, depth
    while pending:
        position, end, message, depth = pending.pop()
        while position < end:
            key, position = _varint(view, position, end)
            count += 1
            if count > budget:
                return None
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
