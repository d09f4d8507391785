"""Counting a request's protobuf fields from its wire bytes, before protobuf parses it (service/protowire.py)."""

from convray.oip import inference_pb2 as oip
from convray.service.protowire import MAX_REQUEST_FIELDS, count_fields

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
    empty_inputs = b"\x2a\x00" * 1_000_000  # 2 MB: a million empty inputs, 0.7 s and 736 MB to parse at 16 MiB
    assert count_fields(empty_inputs, REQUEST) is None
    assert count_fields(b"\x2a\x00" * MAX_REQUEST_FIELDS, REQUEST) == MAX_REQUEST_FIELDS
    assert count_fields(b"\x2a\x00" * (MAX_REQUEST_FIELDS + 1), REQUEST) is None
    one_input = oip.ModelInferRequest()
    one_input.inputs.add().contents.bytes_contents.extend([b""] * MAX_REQUEST_FIELDS)
    assert count_fields(one_input.SerializeToString(), REQUEST) is None


def test_an_unknown_field_is_one_field_whatever_it_holds():
    unknown = (
        b"\xfa\x3f" + bytes([200]) + b"\x01" + b"\x2a\x00" * 100
    )  # field 1023, 200 bytes of what looks like inputs
    assert count_fields(unknown, REQUEST) == 1


def test_bytes_that_are_not_wire_format_are_left_to_the_parser():
    for data in (b"\xff\xff\xff", b"\x2a\x05\x00", b"\x0b\x00", b"\x80" * 11):  # bad varint, overrun, group, long
        assert count_fields(data, REQUEST) is not None
