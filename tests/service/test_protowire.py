"""Counting a request's protobuf fields from its wire bytes, before protobuf parses it (service/protowire.py)."""

import pytest

from convray.oip import inference_pb2 as oip
from convray.service.protowire import (
    MAX_DEPTH,
    MAX_PACKED_VARINT_BYTES,
    MAX_REQUEST_FIELDS,
    OverBudget,
    WireFormatError,
    count_fields,
)

REQUEST = oip.ModelInferRequest.DESCRIPTOR


def test_a_real_request_counts_its_fields_and_those_nested_in_it():
    request = oip.ModelInferRequest(model_name="digits", id="a", raw_input_contents=[bytes(1 << 20)])  # 3 fields
    tensor = request.inputs.add(name="input", datatype="UINT8", shape=[1, 1, 8, 8])  # 1 + 3 (the shape packed)
    tensor.parameters["content_type"].string_param = "x"  # 1 entry + its key and value + the value's field
    request.outputs.add(name="output")  # 1 + 1
    assert count_fields(request.SerializeToString(), REQUEST) == 3 + 4 + 4 + 2


def test_a_tensors_packed_values_are_one_field_and_each_bytes_element_one():
    request = oip.ModelInferRequest()
    request.inputs.add(name="input").contents.fp32_contents.extend([0.5] * 100_000)  # input, name, contents, values
    assert count_fields(request.SerializeToString(), REQUEST) == 4
    request = oip.ModelInferRequest()
    request.inputs.add(name="image").contents.bytes_contents.extend([b"png"] * 4096)  # the largest batch
    assert count_fields(request.SerializeToString(), REQUEST) == 3 + 4096


def test_counting_stops_past_the_budget_at_any_depth():
    assert count_fields(b"\x2a\x00" * MAX_REQUEST_FIELDS, REQUEST) == MAX_REQUEST_FIELDS  # empty inputs
    over = f"over {MAX_REQUEST_FIELDS} protobuf fields"
    with pytest.raises(OverBudget, match=over):
        count_fields(b"\x2a\x00" * (MAX_REQUEST_FIELDS + 1), REQUEST)
    with pytest.raises(OverBudget, match=over):  # stops at the budget, before bytes that are not wire format
        count_fields(b"\x2a\x00" * 1_000_000 + b"\xff", REQUEST)
    one_input = oip.ModelInferRequest()
    one_input.inputs.add().contents.bytes_contents.extend([b""] * MAX_REQUEST_FIELDS)  # depth 3
    with pytest.raises(OverBudget, match=over):
        count_fields(one_input.SerializeToString(), REQUEST)
    parameters = oip.ModelInferRequest()
    for i in range(MAX_REQUEST_FIELDS // 3):  # each entry: the entry, its key, its value
        parameters.inputs.add().parameters[str(i)]  # noqa: B018 (adds an entry with an empty value)
    with pytest.raises(OverBudget, match=over):
        count_fields(parameters.SerializeToString(), REQUEST)


def test_packed_integers_are_one_field_but_their_bytes_have_a_budget_of_their_own():
    """Found in review: a 64 MiB shape of one-byte varints counted 2 fields and took 4.5 s and 1.2 GB to parse."""
    within = oip.ModelInferRequest()
    within.inputs.add().contents.uint_contents.extend([255] * (MAX_PACKED_VARINT_BYTES // 2))  # two bytes each
    assert count_fields(within.SerializeToString(), REQUEST) == 3
    over = oip.ModelInferRequest()
    over.inputs.add().shape.extend([1] * (MAX_PACKED_VARINT_BYTES + 1))
    with pytest.raises(OverBudget, match=f"over {MAX_PACKED_VARINT_BYTES} bytes of packed integers"):
        count_fields(over.SerializeToString(), REQUEST)
    floats = oip.ModelInferRequest()  # fixed-width values are copied whole, not decoded one at a time
    floats.inputs.add().contents.fp32_contents.extend([1.0] * (MAX_PACKED_VARINT_BYTES // 2))
    assert count_fields(floats.SerializeToString(), REQUEST) == 3


def test_an_unknown_field_is_one_field_whatever_it_holds():
    unknown = (
        b"\xfa\x3f" + bytes([200]) + b"\x01" + b"\x2a\x00" * 100
    )  # field 1023, 200 bytes of what looks like inputs
    assert count_fields(unknown, REQUEST) == 1


@pytest.mark.parametrize(
    "data,fault",
    [
        (b"\x2b\x2c" + b"\x2a\x00" * 10, "wire type 3 of field 5 (groups are not accepted)"),  # a group at inputs
        (b"\x2a\x00" * 10 + b"\x0b\x0c", "wire type 3 of field 1"),  # a group at the end
        (b"\x2a\x04\x22\x00\x22\x00" + b"\x3a\x05", "field 7 runs past the end"),  # a fault after nested fields
        (b"\x2a\x05\x00", "field 5 runs past the end"),
        (b"\x2a\x02\x22\x05", "field 4 runs past the end"),  # inside the input
        (b"\x80" * 11, "a varint runs past"),
        (b"\x0d\x00", "field 1 runs past the end"),  # a fixed32 cut short
    ],
)
def test_wire_format_the_count_cannot_follow_is_refused_not_left_to_the_parser(data, fault):
    """Found in review: a walk that stopped at a fault counted only what came before, and protobuf then parsed a
    million inputs inside a group (kept as an unknown field), or nested ones before a bad tail."""
    with pytest.raises(WireFormatError, match=fault.replace("(", r"\(").replace(")", r"\)")):
        count_fields(data, REQUEST)


def test_messages_nested_deeper_than_the_limit_are_refused():
    from google.protobuf import descriptor_pb2

    # FileDescriptorProto nests DescriptorProto in DescriptorProto (nested_type, field 3) without end.
    nested = b""
    for _ in range(MAX_DEPTH):
        nested = b"\x1a" + bytes([len(nested)]) + nested
    assert count_fields(nested, descriptor_pb2.DescriptorProto.DESCRIPTOR) == MAX_DEPTH
    with pytest.raises(WireFormatError, match=f"nested over {MAX_DEPTH} deep"):
        count_fields(b"\x1a" + bytes([len(nested)]) + nested, descriptor_pb2.DescriptorProto.DESCRIPTOR)
