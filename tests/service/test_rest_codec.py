"""REST bodies <-> OIP messages: what a REST client sends becomes the gRPC request the servicer checks."""

import json
import re
import struct

import numpy as np
import pytest

from convray.oip import inference_pb2 as oip
from convray.service.errors import InvalidInput
from convray.service.rest_codec import infer_response_body, message_json, parse_infer_request


def parse(document, binary=b"", as_header=None):
    header = json.dumps(document).encode() if as_header is None else as_header
    return parse_infer_request(header + binary, len(header) if binary else None, "digits", "1")


def test_json_data_nested_or_flat_becomes_the_raw_bytes_of_its_datatype():
    for data in ([[1.5, 2.0], [3.0, 4.25]], [1.5, 2.0, 3.0, 4.25]):
        request, _ = parse({"inputs": [{"name": "input", "shape": [2, 2], "datatype": "FP32", "data": data}]})
        assert request.model_name == "digits" and request.model_version == "1"
        assert list(request.inputs[0].shape) == [2, 2] and request.inputs[0].datatype == "FP32"
        assert np.frombuffer(request.raw_input_contents[0], "<f4").tolist() == [1.5, 2.0, 3.0, 4.25]
    request, _ = parse({"inputs": [{"name": "input", "shape": [3], "datatype": "UINT8", "data": [0, 7, 255]}]})
    assert request.raw_input_contents[0] == bytes([0, 7, 255])
    request, _ = parse({"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": ["ab", "é"]}]})
    assert request.raw_input_contents[0] == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 2) + "é".encode()


def nested(depth: int) -> bytes:
    data = b"[" * depth + b"5.0" + b"]" * depth
    return b'{"inputs": [{"name": "input", "shape": [1], "datatype": "FP64", "data": ' + data + b"}]}"


def test_deeply_nested_data_is_read_and_too_deep_a_body_is_refused_not_a_crash():
    request, _ = parse(None, as_header=nested(500))
    assert np.frombuffer(request.raw_input_contents[0], "<f8").tolist() == [5.0]
    with pytest.raises(InvalidInput, match="the request body is not valid JSON"):
        parse(None, as_header=nested(2000))  # past the JSON parser's depth limit (1,024)


def test_a_body_of_too_many_json_containers_or_strings_is_refused_before_it_is_parsed(monkeypatch):
    """Found in review: parsing holds the GIL, and 2 MiB of ``[[],[],...]`` held it 0.2 s, of ``""`` strings 26 ms."""
    from convray.service import rest_codec

    def never(_):
        raise AssertionError("parsed")

    monkeypatch.setattr(rest_codec.orjson, "loads", never)
    lists = b'{"inputs": [' + b",".join([b"[]"] * 65_535) + b"]}"  # with the object and its list: 65,537
    with pytest.raises(
        InvalidInput, match=r"^the request body holds 65537 JSON objects and lists, over the 65536 read$"
    ):
        parse(None, as_header=lists)
    strings = b'{"inputs": [' + b",".join([b'""'] * 65_536) + b"]}"  # and the key: 65,537
    with pytest.raises(InvalidInput, match=r"^the request body holds 65537 JSON strings, over the 65536 read$"):
        parse(None, as_header=strings)


def test_a_request_of_more_than_16_inputs_or_outputs_is_refused_before_they_are_read():
    tensor = {"name": "x", "shape": [1], "datatype": "UINT8", "data": [1]}
    assert len(parse({"inputs": [tensor] * 16, "outputs": [{"name": "y"}] * 16})[0].inputs) == 16
    for document in ({"inputs": [tensor] * 17}, {"inputs": [], "outputs": [{"name": "y"}] * 17}):
        with pytest.raises(InvalidInput, match=r"^the request has \d+ inputs and \d+ outputs; at most 16 of each"):
            parse(document)


def test_binary_inputs_are_sliced_off_the_body_in_order_beside_json_ones():
    document = {
        "inputs": [
            {"name": "a", "shape": [2], "datatype": "UINT8", "parameters": {"binary_data_size": 2}},
            {"name": "b", "shape": [1], "datatype": "UINT8", "data": [9]},
            {"name": "c", "shape": [3], "datatype": "UINT8", "parameters": {"binary_data_size": 3}},
        ]
    }
    request, _ = parse(document, binary=b"\x01\x02\x03\x04\x05")
    assert list(request.raw_input_contents) == [b"\x01\x02", b"\x09", b"\x03\x04\x05"]
    assert all("binary_data_size" not in tensor.parameters for tensor in request.inputs)  # REST-only: dropped


def test_parameters_keep_their_json_types_and_the_binary_choices_are_read_then_dropped():
    document = {
        "id": "x",
        "parameters": {"timeout": 5000, "content_type": "np", "ratio": 0.5, "flag": True, "binary_data_output": True},
        "inputs": [],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 3, "binary_data": False}}],
    }
    request, binary = parse(document)
    kinds = {key: value.WhichOneof("parameter_choice") for key, value in request.parameters.items()}
    assert kinds == {"timeout": "int64_param", "content_type": "string_param", "ratio": "double_param",
                     "flag": "bool_param"}  # fmt: skip
    assert request.id == "x" and binary == set()  # the output's own choice wins over binary_data_output
    assert list(request.outputs[0].parameters) == ["classification"]  # REST-only parameters do not reach gRPC's


@pytest.mark.parametrize(
    "parameters,outputs,binary",
    [
        ({"binary_data_output": True}, None, {"*"}),  # tritonclient.http naming no output
        ({}, None, set()),
        ({"binary_data_output": True}, [{"name": "probabilities"}], {"probabilities"}),
        ({}, [{"name": "probabilities", "parameters": {"binary_data": True}}], {"probabilities"}),
    ],
)
def test_outputs_go_back_as_binary_data_when_they_or_the_request_ask(parameters, outputs, binary):
    document = {"inputs": [], "parameters": parameters, **({} if outputs is None else {"outputs": outputs})}
    assert parse(document)[1] == binary


@pytest.mark.parametrize(
    "document,says",
    [
        ({"inputs": {}}, "the request's inputs must be a list"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}, "input 'x' has no 'data'"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP17", "data": [1]}]}, "unknown datatype 'FP17'"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "INT8", "data": [1.5]}]}, "INT8 data must be integers"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "UINT8", "data": [256]}]}, "a value does not fit UINT8"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [1]}]}, "BYTES data must be strings"),
        ({"inputs": [{"name": "x", "shape": [True], "datatype": "FP32", "data": [1]}]}, "shape must be a list of"),
        ({"inputs": [{"name": "x", "shape": [2**63], "datatype": "FP32", "data": [1]}]}, "is out of range"),
        ({"inputs": [{"name": "x", "shape": [2**70], "datatype": "FP32", "data": [1]}]}, "shape must be a list of"),
        ({"inputs": [], "parameters": {"p": [1]}}, "parameter 'p' on the request must be a bool, number or string"),
        ({"inputs": [], "parameters": {"binary_data_output": 1}}, "'binary_data_output' must be true or false"),
        ({"inputs": [], "id": 7}, "the request's id must be a string"),
        ({"inputs": [], "outputs": [{"name": "probabilities", "binary": True}]}, "unknown key(s) ['binary']"),
        (
            {"inputs": [], "outputs": [{"name": "probabilities", "parameters": {"binary_data": 1}}]},
            "output 'probabilities': binary_data must be true or false",
        ),
        ({"inputs": [], "id": "\ud800"}, "is not valid JSON (no low surrogate in string"),  # a lone surrogate
        (
            {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["\udcff"]}]},
            "is not valid JSON (invalid high surrogate in string",
        ),
    ],
)
def test_what_a_client_can_get_wrong_is_refused_saying_what(document, says):
    with pytest.raises(InvalidInput) as refused:
        parse(document)
    assert says in str(refused.value)


def test_a_response_goes_back_as_json_data_or_as_binary_after_the_json():
    response = oip.ModelInferResponse(model_name="digits", model_version="1", id="r")
    response.outputs.add(name="probabilities", datatype="FP32", shape=[1, 2])
    response.raw_output_contents.append(np.array([0.25, 0.75], "<f4").tobytes())
    response.outputs.add(name="classification", datatype="BYTES", shape=[1, 1])
    response.raw_output_contents.append(struct.pack("<I", 8) + b"0.75:1:1")
    body, json_length = infer_response_body(response, set())
    assert json_length is None
    document = json.loads(body)
    assert document["id"] == "r" and document["outputs"][0]["data"] == [0.25, 0.75]
    assert document["outputs"][1]["data"] == ["0.75:1:1"]
    body, json_length = infer_response_body(response, {"probabilities"})
    header = json.loads(body[:json_length])
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 8} and "data" not in header["outputs"][0]
    assert np.frombuffer(body[json_length:], "<f4").tolist() == [0.25, 0.75]


def test_reply_json_keeps_64_bit_integers_as_numbers_enums_by_name_and_default_values():
    model_input = oip.ModelInput(name="input", dims=[1, 8, 8], format=oip.ModelInput.FORMAT_NCHW)
    parameters = {"v": oip.ModelParameter(string_value="1")}
    config = message_json(oip.ModelConfig(name="d", max_batch_size=32, input=[model_input], parameters=parameters))
    assert config["max_batch_size"] == 32 and config["parameters"] == {"v": {"string_value": "1"}}
    assert config["input"][0]["dims"] == [1, 8, 8] and config["input"][0]["format"] == "FORMAT_NCHW"
    assert config["input"][0]["data_type"] == "TYPE_INVALID" and config["output"] == []  # defaults, as Triton
    statistics = oip.ModelStatisticsResponse()
    statistics.model_stats.add(name="d", inference_stats=oip.InferStatistics(fail=oip.StatisticDuration()))
    (model,) = message_json(statistics)["model_stats"]
    assert model["inference_count"] == 0 and model["inference_stats"] == {"fail": {"count": 0, "ns": 0}}


def test_repository_bodies_are_read_as_triton_sends_them_and_what_they_cannot_hold_is_refused():
    from convray.service.rest_codec import add_repository_parameters, parse_index_request

    assert parse_index_request(b"").ready is False and parse_index_request(b'{"ready": true}').ready is True
    unload = oip.RepositoryModelUnloadRequest(model_name="digits")
    add_repository_parameters(b'{"parameters": {"unload_dependents": false}}', unload)
    assert unload.parameters["unload_dependents"].WhichOneof("parameter_choice") == "bool_param"
    for body, says in [
        (b'{"ready": 1}', "'ready' must be true or false"),
        (b'{"readiness": true}', "unknown key(s) ['readiness']"),
        (b'{"parameters": {"x": 0.5}}', "must be a bool, integer or string"),  # a repository parameter has no double
        (b'{"parameters": {"x": "\\ud800"}}', "is not valid JSON (no low surrogate"),
    ]:
        with pytest.raises(InvalidInput, match=re.escape(says)):
            parse_index_request(body) if b"ready" in body else add_repository_parameters(body, unload)


@pytest.mark.parametrize(
    "data,flat",
    [
        (5, [5]),
        ([], []),
        ([1, 2, 3], [1, 2, 3]),
        ([[1, 2], [3, 4]], [1, 2, 3, 4]),  # evenly nested: a level at a time
        ([[[1], [2]], [[3], [4]]], [1, 2, 3, 4]),
        ([[1, [2, 3]], 4, [[5]]], [1, 2, 3, 4, 5]),  # unevenly nested: element by element
        ([[], [1], []], [1]),
    ],
)
def test_nested_json_data_is_flattened_row_major_whether_evenly_nested_or_not(data, flat):
    from convray.service.rest_codec import _flat

    items, kinds = _flat(data)
    assert items == flat and kinds == {type(item) for item in flat}
