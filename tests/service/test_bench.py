"""convray bench: its statistics, and a short real run against the real server (counts, not speed)."""

import asyncio
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from convray.service.bench import (
    BenchConfig,
    BenchReport,
    Measurement,
    build_payloads,
    concurrency_levels,
    format_sweep,
    load_images,
    percentiles,
    report_of,
    split_load,
)
from tests.deploy.tools import scrape
from tests.e2e.test_cli import free_port


def test_percentiles_interpolate_like_numpy():
    values = [float(v) for v in range(1, 101)]  # 1..100 ms
    stats = percentiles(values)
    assert stats["p50"] == 50.5 and stats["p90"] == pytest.approx(90.1) and stats["p99"] == pytest.approx(99.01)
    assert stats["max"] == 100.0 and stats["mean"] == 50.5


def test_percentiles_of_nothing_are_nan():
    assert all(math.isnan(v) for v in percentiles([]).values())


def test_concurrency_is_one_level_or_a_comma_separated_sweep():
    assert concurrency_levels("32") == [32]
    assert concurrency_levels("1,8,32") == [1, 8, 32]


@pytest.mark.parametrize(
    ("text", "message"),
    [("0", ">= 1"), ("1,-4", ">= 1"), ("1,x", "positive integer"), ("", "positive integer"), ("8,8", "must differ")],
)
def test_a_bad_concurrency_is_a_clear_error(text, message):
    with pytest.raises(ValueError, match=message):
        concurrency_levels(text)


def test_a_sweep_ends_with_one_row_per_level():
    def report(concurrency: int, rate: float, errors: dict[str, int]) -> BenchReport:
        config = {"concurrency": concurrency}
        latency = {"p50": 1.0 * concurrency, "p90": 2.0, "p99": 3.0, "max": 4.0, "mean": 1.5}
        return BenchReport(config, 10, 10, errors, 1.0, rate, rate, latency, 0.5, False)

    lines = format_sweep([report(1, 500.0, {}), report(32, 2100.5, {"RESOURCE_EXHAUSTED": 3})]).splitlines()
    assert lines[0].split() == ["concurrency", "req/s", "img/s", "p50", "ms", "p90", "ms", "p99", "ms", "errors"]
    assert lines[1].split() == ["1", "500.0", "500.0", "1.00", "2.00", "3.00", "none"]
    assert lines[2].split() == ["32", "2,100.5", "2,100.5", "32.00", "2.00", "3.00", "3"]


def test_generated_images_have_the_asked_size_and_format():
    images = load_images(BenchConfig(image_size=(28, 20), image_format="JPEG", channels=3))
    assert len(images) == 16
    import io

    image = Image.open(io.BytesIO(images[0]))
    assert image.format == "JPEG" and image.size == (28, 20) and image.mode == "RGB"


def test_an_empty_image_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        load_images(BenchConfig(images=str(tmp_path)))


def run_bench(*args: str, out: Path | None = None) -> tuple[subprocess.CompletedProcess, dict | None]:
    """``convray bench ARGS`` in its own process; its output, and its JSON report when ``out`` is given."""
    json_flags = ["--json", str(out)] if out else []
    result = subprocess.run(
        [str(Path(sys.executable).parent / "convray"), "bench", *args, *json_flags],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return result, json.loads(out.read_text()) if out and out.exists() else None


@pytest.mark.integration
@pytest.mark.parametrize(
    "flags",
    [
        ["--api", "native"],
        ["--api", "oip", "--payload", "tensor"],
        ["--api", "oip", "--payload", "tensor", "--datatype", "UINT8"],
        ["--api", "oip", "--rate", "50"],
        ["--api", "oip", "--payload", "tensor", "--datatype", "UINT8", "--batch-size", "8"],
        ["--api", "oip", "--batch-size", "3"],
        ["--api", "oip", "--payload", "tensor", "--processes", "2"],
        ["--api", "native", "--streaming"],
        ["--api", "oip", "--payload", "tensor", "--datatype", "UINT8", "--streaming"],
        ["--api", "oip", "--rate", "50", "--streaming"],
        ["--api", "rest"],
        ["--api", "rest", "--payload", "tensor", "--datatype", "UINT8", "--batch-size", "8"],
        ["--api", "rest", "--payload", "tensor", "--rate", "50"],
    ],
)
def test_a_short_run_against_the_real_server_reports_consistent_counts(served, tmp_path, flags):
    api = flags[flags.index("--api") + 1]
    rpcs = {"native": ("Classify", "ClassifyStream"), "oip": ("ModelInfer", "ModelStreamInfer")}
    rpcs["rest"] = ("ModelInfer",)
    rpc = rpcs[api]["--streaming" in flags]
    counted = {"api": api, "rpc": rpc, "model": "digits", "code": "OK"}
    before = scrape(served.server.metrics_port).value("convray_requests_total", **counted)
    address = f"127.0.0.1:{served.server.http_port}" if api == "rest" else served.address
    result, report = run_bench(
        "--server", address, "--duration", "1.5", "--warmup", "0.3", "--concurrency", "4", *flags,
        out=tmp_path / "report.json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert report["ok"] > 0 and report["errors"] == {} and report["requests"] == report["ok"]
    assert report["requests_per_s"] == pytest.approx(report["ok"] / report["duration_s"], rel=0.01)
    assert set(report["latency_ms"]) == {"p50", "p90", "p99", "max", "mean"}
    assert report["latency_ms"]["p50"] <= report["latency_ms"]["p99"] <= report["latency_ms"]["max"]
    assert 0 < report["client_cpu_fraction"]
    assert "req/s" in result.stdout and "latency ms: p50" in result.stdout
    assert report["config"]["datatype"] == ("UINT8" if "UINT8" in flags else "FP32")
    batch = int(flags[flags.index("--batch-size") + 1]) if "--batch-size" in flags else 1
    assert report["images_per_s"] == pytest.approx(batch * report["requests_per_s"], rel=0.01)
    # the server answered them through the RPC asked for (streams count each item), warm-up included
    assert scrape(served.server.metrics_port).value("convray_requests_total", **counted) - before >= report["ok"]
    assert ("streaming" in result.stdout) == ("--streaming" in flags)


@pytest.mark.integration
def test_a_sweep_measures_each_concurrency_level_in_turn(served, tmp_path):
    result, report = run_bench(
        "--server", served.address, "--api", "oip", "--concurrency", "1,4", "--processes", "2",
        "--duration", "1", "--warmup", "0.3", out=tmp_path / "report.json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    levels = report["levels"]
    assert [level["config"]["concurrency"] for level in levels] == [1, 4]
    assert [level["config"]["processes"] for level in levels] == [1, 2]  # no more processes than requests in flight
    assert all(level["ok"] > 0 and level["errors"] == {} for level in levels)
    assert result.stdout.splitlines()[-3].split()[0] == "concurrency"


@pytest.mark.parametrize(
    ("ok", "requests", "max_error_fraction", "passed"),
    [(100, 100, 0.0, True), (99, 100, 0.0, False), (99, 100, 0.01, True), (90, 100, 0.05, False),
     (1, 100, 1.0, True), (0, 100, 1.0, False), (0, 0, 1.0, False)],
)  # fmt: skip
def test_a_run_passes_when_no_more_than_the_allowed_fraction_of_requests_failed(
    ok, requests, max_error_fraction, passed
):
    """Found in review: bench exited 0 when one request in a thousand succeeded."""
    report = BenchReport({}, requests, ok, {"UNAVAILABLE": requests - ok}, 1.0, 1.0, 1.0, {}, 0.1, False)
    assert report.passed(max_error_fraction) is passed


def test_the_allowed_error_fraction_is_from_0_to_1():
    result, _ = run_bench("--max-error-fraction", "1.5")
    assert result.returncode == 2 and "--max-error-fraction must be from 0 to 1, got 1.5" in result.stderr


def test_a_sweep_cannot_be_of_rates():
    result, _ = run_bench("--concurrency", "1,4", "--rate", "10")
    assert result.returncode == 2 and "--rate runs open loop at one rate" in result.stderr


@pytest.mark.integration
def test_a_batch_larger_than_the_servers_maximum_is_counted_as_invalid_argument(served, tmp_path):
    result, report = run_bench(
        "--server", served.address, "--api", "oip", "--batch-size", "1000", "--requests", "5", "--warmup", "0",
        "--max-error-fraction", "1", out=tmp_path / "report.json",
    )  # fmt: skip
    assert result.returncode == 1  # with every error allowed, a run with no success still fails
    assert "5 of 5 requests failed at concurrency 1, none succeeded" in result.stderr  # not "over ... 1"
    assert report["ok"] == 0 and report["errors"] == {"INVALID_ARGUMENT": 5}
    # Why, as the server said it (found in a walkthrough: a run of nothing but errors never said what they were)
    assert "1000" in report["first_error_messages"]["INVALID_ARGUMENT"]
    assert "first INVALID_ARGUMENT: " in result.stdout


def test_batches_need_the_oip_api():
    with pytest.raises(ValueError, match="one image per request; use --api oip"):
        asyncio.run(build_payloads(BenchConfig(api="native", batch_size=4), channel=None))


@pytest.mark.integration
@pytest.mark.parametrize(
    "flags",
    [[], ["--streaming"], ["--api", "oip", "--streaming"], ["--api", "rest"]],
    ids=["unary", "native-stream", "oip-stream", "rest"],
)
def test_errors_are_counted_by_code(served, tmp_path, flags):
    address = f"127.0.0.1:{served.server.http_port}" if "rest" in flags else served.address
    result, report = run_bench(
        "--server", address, "--model", "nope", "--requests", "20", "--warmup", "0", *flags,
        out=tmp_path / "report.json",
    )  # fmt: skip
    assert result.returncode == 1
    assert report["ok"] == 0 and report["errors"] == {"NOT_FOUND": 20}
    assert "nope" in report["first_error_messages"]["NOT_FOUND"]  # streams' items too (found in review)


def test_the_load_is_shared_out_over_client_processes():
    parts = split_load(BenchConfig(concurrency=5, requests=11, processes=2))
    assert [(p.concurrency, p.requests, p.processes) for p in parts] == [(3, 6, 1), (2, 5, 1)]
    (one,) = split_load(BenchConfig(concurrency=5, processes=1))
    assert one.concurrency == 5
    assert [p.rate_per_s for p in split_load(BenchConfig(rate_per_s=90.0, processes=3))] == [30.0, 30.0, 30.0]
    with pytest.raises(ValueError, match="--concurrency 2 cannot be split over 4 processes"):
        split_load(BenchConfig(concurrency=2, processes=4))


def test_several_servers_are_shared_out_round_robin_over_the_client_processes_each_getting_an_equal_load():
    parts = split_load(BenchConfig(server="a:1, b:2", concurrency=32, processes=4))
    assert [(p.server, p.concurrency) for p in parts] == [("a:1", 8), ("b:2", 8), ("a:1", 8), ("b:2", 8)]
    uneven = split_load(BenchConfig(server="a:1,b:2", concurrency=12, requests=100, processes=3))
    assert [(p.server, p.concurrency, p.requests) for p in uneven] == [("a:1", 3, 25), ("b:2", 6, 50), ("a:1", 3, 25)]
    rates = split_load(BenchConfig(server="a:1,b:2", rate_per_s=60.0, processes=3))
    assert [(p.server, p.rate_per_s) for p in rates] == [("a:1", 15.0), ("b:2", 30.0), ("a:1", 15.0)]
    with pytest.raises(ValueError, match="2 servers need at least as many client processes, got --processes 1"):
        split_load(BenchConfig(server="a:1,b:2", concurrency=4, processes=1))


def test_client_processes_measurements_merge_into_one_report():
    first = Measurement(
        [1.0, 2.0], {"OK": 2, "UNAVAILABLE": 1}, wall_s=2.0, cpu_s=1.9, images_per_request=4, started_at=100.0
    )
    second = Measurement([3.0], {"OK": 1}, wall_s=1.0, cpu_s=0.2, images_per_request=4, started_at=100.5)
    report = report_of(BenchConfig(processes=2), [first, second])
    assert (report.requests, report.ok, report.errors) == (4, 3, {"UNAVAILABLE": 1})
    # The OK requests over one window, from the first start to the last end. Found in review: each process's
    # rate over its own span, added up (2/2 + 1/1), made 2.0, a rate the run never reached.
    assert report.duration_s == 2.0 and report.requests_per_s == 1.5
    assert report.images_per_s == 6.0
    assert report.latency_ms["max"] == 3.0 and report.latency_ms["p50"] == 2.0
    assert report.client_cpu_fraction == pytest.approx(2.1 / 2.0)
    assert report.client_saturated and "add more --processes" in report.notes[0]  # the first used 95% of a core


def test_the_report_gives_each_servers_rate():
    measurements = [
        Measurement([1.0], {"OK": 4}, wall_s=2.0, cpu_s=0.1, images_per_request=1, server="a:1"),
        Measurement([1.0], {"OK": 6, "UNAVAILABLE": 2}, wall_s=2.0, cpu_s=0.1, images_per_request=1, server="b:2"),
        Measurement([1.0], {"OK": 2}, wall_s=1.0, cpu_s=0.1, images_per_request=1, server="a:1"),
    ]
    report = report_of(BenchConfig(server="a:1,b:2", processes=3), measurements)
    assert report.per_server_requests_per_s == {"a:1": 3.0, "b:2": 3.0}  # each server's OK over the window
    assert report.requests_per_s == 6.0


@pytest.mark.integration
def test_a_run_over_several_servers_drives_each_of_them(served, tmp_path):
    # The same server under two spellings of its address: two "servers" as far as the client can tell.
    port = served.address.rpartition(":")[2]
    servers = f"{served.address},localhost:{port}"
    result, report = run_bench(
        "--server", servers, "--api", "oip", "--payload", "tensor", "--concurrency", "4", "--duration", "1.5",
        "--warmup", "0.3", out=tmp_path / "report.json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert report["config"]["processes"] == 2  # one per server by default
    assert set(report["per_server_requests_per_s"]) == {served.address, f"localhost:{port}"}
    assert all(rate > 0 for rate in report["per_server_requests_per_s"].values())
    assert sum(report["per_server_requests_per_s"].values()) == pytest.approx(report["requests_per_s"], rel=0.01)
    assert "req/s by server:" in result.stdout


@pytest.mark.integration
def test_an_unreachable_server_among_several_is_named(served):
    dead = f"127.0.0.1:{free_port()}"
    result, _ = run_bench("--server", f"{served.address},{dead}", "--timeout", "1", "--concurrency", "2")
    assert result.returncode == 3 and f"cannot reach a server at {dead} within 1 s" in result.stderr, result.stderr


@pytest.mark.parametrize("processes", ["1", "2"])
def test_no_server_is_a_clear_error_whatever_the_client_processes(processes):
    result, _ = run_bench(
        "--server", f"127.0.0.1:{free_port()}", "--timeout", "1", "--concurrency", "2", "--processes", processes
    )
    assert result.returncode == 3 and "cannot reach a server at 127.0.0.1:" in result.stderr, result.stderr


class PeerRecorder:
    """A real gRPC server answering Classify and ClassifyStream with empty replies, noting each caller's address.

    Each client connection has its own address (port), so the set of addresses counts connections.
    """

    def __init__(self) -> None:
        import grpc

        self.peers: set[str] = set()
        self.server = grpc.aio.server()
        handlers = {
            "Classify": grpc.unary_unary_rpc_method_handler(self._classify),
            "ClassifyStream": grpc.stream_stream_rpc_method_handler(self._classify_stream),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("convray.v1.Classifier", handlers),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    async def _classify(self, request: bytes, context) -> bytes:
        self.peers.add(context.peer())
        return b""

    async def _classify_stream(self, requests, context):
        from convray.v1 import classifier_pb2 as pb

        self.peers.add(context.peer())
        async for _ in requests:
            yield pb.ClassifyStreamResponse(result=pb.ClassifyResponse()).SerializeToString()


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "streaming"])
@pytest.mark.parametrize("connections", [1, 3])
def test_a_client_process_opens_as_many_connections_as_asked_and_uses_them_all(streaming, connections):
    from convray.service.bench import measure

    async def run() -> tuple[set[str], dict[str, int]]:
        recorder = PeerRecorder()
        await recorder.server.start()
        try:
            config = BenchConfig(
                server=f"127.0.0.1:{recorder.port}", concurrency=6, duration_s=0.3, warmup_s=0.1,
                connections=connections, streaming=streaming,
            )  # fmt: skip
            measured = await measure(config)
        finally:
            await recorder.server.stop(None)
        return recorder.peers, measured.codes

    peers, codes = asyncio.run(run())
    assert len(peers) == connections
    assert set(codes) == {"OK"} and codes["OK"] > 0


def test_an_open_loop_that_fell_behind_its_rate_says_so():
    """Found in review: asked for 20,000 requests/s, a starved client sent 3,000 and said nothing."""
    behind = Measurement([1.0] * 90, {"OK": 90, "UNAVAILABLE": 10}, wall_s=1.0, cpu_s=0.5, images_per_request=1)
    assert "fell behind its schedule" in report_of(BenchConfig(rate_per_s=1000.0), [behind]).notes[0]
    assert report_of(BenchConfig(rate_per_s=100.0), [behind]).notes == []  # 100 sent of 100 asked


class RequestCounter:
    """A real gRPC server answering Classify with an empty reply, counting the requests."""

    def __init__(self) -> None:
        import grpc

        self.requests = 0
        self.server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(self._classify)
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("convray.v1.Classifier", {"Classify": handler}),)
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    async def _classify(self, request: bytes, context) -> bytes:
        self.requests += 1
        return b""


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_request_count_sends_exactly_that_many_at_any_concurrency(concurrency):
    """Found in review: at concurrency above 1, all callers but the first took the spent budget for "no limit"
    and sent for an hour."""
    from convray.service.bench import measure

    async def run() -> tuple[int, dict[str, int]]:
        counter = RequestCounter()
        await counter.server.start()
        try:
            config = BenchConfig(server=f"127.0.0.1:{counter.port}", concurrency=concurrency, requests=50, warmup_s=0.0)
            measured = await asyncio.wait_for(measure(config), 30)
        finally:
            await counter.server.stop(None)
        return counter.requests, measured.codes

    sent, codes = asyncio.run(run())
    assert sent == 50 and codes == {"OK": 50}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--rate", "0"], "--rate must be > 0 requests/s, got 0.0"),  # ran at 1/s
        (["--rate", "-5"], "--rate must be > 0"),  # sent unthrottled
        (["--requests", "-1"], "--requests must be >= 1, got -1"),  # ran for an hour
        (["--duration", "0"], "--duration must be > 0 s"),
        (["--timeout", "0"], "--timeout must be a number of seconds > 0, got 0"),
        (["--duration", "inf"], "--duration must be > 0 s, got inf"),  # would never end
        (["--rate", "nan"], "--rate must be > 0 requests/s, got nan"),
        (["--processes", "0"], "--processes must be >= 1"),  # became the default
        (["--image-size", "abc"], "--image-size is WxH"),  # a traceback
        (["--image-format", "foo"], "--image-format must be one of BMP, GIF, JPEG, PNG, WEBP"),  # a traceback
    ],
)
def test_bench_flags_no_run_can_use_are_usage_errors_before_anything_is_sent(flags, message, capsys):
    from convray.service.cli import main

    assert main(["bench", *flags]) == 2
    assert message in capsys.readouterr().err


def test_connections_below_one_are_a_usage_error(capsys):
    from convray.service.cli import main

    assert main(["bench", "--connections", "0", "--duration", "0.1"]) == 2
    assert "--connections must be >= 1, got 0" in capsys.readouterr().err


def test_rest_has_no_stream_to_bench(capsys):
    from convray.service.cli import main

    assert main(["bench", "--api", "rest", "--streaming", "--server", "127.0.0.1:1", "--duration", "0.1"]) == 2
    assert "--streaming needs a gRPC API (--api native or oip)" in capsys.readouterr().err


def test_rest_failures_are_counted_under_the_grpc_code_their_status_stands_for():
    from convray.service.bench_rest import CODE_OF_STATUS

    assert CODE_OF_STATUS[400] == "INVALID_ARGUMENT" and CODE_OF_STATUS[404] == "NOT_FOUND"
    assert CODE_OF_STATUS[429] == CODE_OF_STATUS[413] == "RESOURCE_EXHAUSTED" and CODE_OF_STATUS[503] == "UNAVAILABLE"
