"""TLS, mutual TLS and bearer-token auth against the real server; health checks stay open for probes."""

import datetime
import http.client as http_client
import ipaddress
import json
import socket
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convray.v1 import classifier_pb2 as pb
from convray.v1 import classifier_pb2_grpc as pb_grpc
from tests.conftest import REPO_ROOT, SHIPPED_MODELS, ServerThread, server_settings

pytestmark = pytest.mark.integration
TOKEN = "s3cret-token"
IMAGE = (REPO_ROOT / "examples" / "digits" / "digit-3.png").read_bytes()


def make_cert(name: str, issuer=None, issuer_key=None, is_ca=False):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if not is_ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    return cert, key


def write_pem(folder: Path, name: str, cert, key) -> tuple[Path, Path]:
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca, ca_key = make_cert("convray test CA", is_ca=True)
    paths = {"ca": write_pem(folder, "ca", ca, ca_key)[0]}
    paths["server"] = write_pem(folder, "server", *make_cert("server", ca, ca_key))
    paths["client"] = write_pem(folder, "client", *make_cert("client", ca, ca_key))
    other_ca, other_key = make_cert("someone else", is_ca=True)
    paths["stranger"] = write_pem(folder, "stranger", *make_cert("stranger", other_ca, other_key))
    token_file = folder / "token"
    token_file.write_text(TOKEN + "\n")
    paths["token"] = token_file
    return paths


@pytest.fixture(scope="module")
def secure_server(ray_address, pki, tmp_path_factory):
    repo = tmp_path_factory.mktemp("secure") / "models"
    import shutil

    shutil.copytree(SHIPPED_MODELS, repo)
    settings = server_settings(
        repo,
        workers__replicas=1,
        security__tls_cert=pki["server"][0],
        security__tls_key=pki["server"][1],
        security__tls_client_ca=pki["ca"],
        security__auth_token_file=pki["token"],
        server__health_port=0,
        server__http_port=0,
    )
    server = ServerThread(settings).start()
    yield server
    server.stop()


def secure_channel(server, pki, client="client"):
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki["ca"].read_bytes(),
        private_key=pki[client][1].read_bytes(),
        certificate_chain=pki[client][0].read_bytes(),
    )
    return grpc.secure_channel(f"localhost:{server.server.port}", credentials)


def test_mutual_tls_with_the_token_classifies(secure_server, pki):
    with secure_channel(secure_server, pki) as channel:
        reply = pb_grpc.ClassifierStub(channel).Classify(
            pb.ClassifyRequest(image=IMAGE), timeout=30, metadata=[("authorization", f"Bearer {TOKEN}")]
        )
    assert reply.predictions[0].label == "3"


@pytest.mark.parametrize("metadata", [[], [("authorization", "Bearer wrong")], [("authorization", TOKEN)]])
def test_a_missing_or_wrong_token_is_unauthenticated(secure_server, pki, metadata):
    with secure_channel(secure_server, pki) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.ClassifierStub(channel).Classify(pb.ClassifyRequest(image=IMAGE), timeout=10, metadata=metadata)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "bearer token" in info.value.details()


def test_a_call_without_the_token_is_refused_before_its_request_is_read(secure_server, pki):
    """Found in review: the whole message was received and parsed first (an unparsable one got INVALID_ARGUMENT),
    so callers without the token could fill the server's memory with requests it was about to refuse."""
    with secure_channel(secure_server, pki) as channel:
        raw = channel.unary_unary("/convray.v1.Classifier/Classify")  # bytes in: any body, parsable or not
        with pytest.raises(grpc.RpcError) as info:
            raw(b"\xff" * (8 << 20), timeout=30)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_streaming_calls_are_refused_too_without_the_token(secure_server, pki):
    with secure_channel(secure_server, pki) as channel:
        replies = pb_grpc.ClassifierStub(channel).ClassifyStream(iter([pb.ClassifyRequest(image=IMAGE)]), timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            list(replies)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_checks_need_no_token(secure_server, pki):
    with secure_channel(secure_server, pki) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("client", ["stranger", None])
def test_clients_without_a_certificate_from_the_trusted_ca_cannot_connect(secure_server, pki, client):
    if client is None:
        credentials = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
        channel = grpc.secure_channel(f"localhost:{secure_server.server.port}", credentials)
    else:
        channel = secure_channel(secure_server, pki, client)
    with channel, pytest.raises(grpc.RpcError) as info:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("service", ["", "liveness"])
def test_probes_that_cannot_do_tls_get_health_on_the_plaintext_health_port(secure_server, service):
    """Kubernetes' gRPC probes speak plaintext only: without this port a TLS server's pods never become Ready."""
    with grpc.insecure_channel(f"127.0.0.1:{secure_server.server.health_port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_the_plaintext_health_port_serves_nothing_but_health(secure_server):
    with grpc.insecure_channel(f"127.0.0.1:{secure_server.server.health_port}") as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.ClassifierStub(channel).Classify(
                pb.ClassifyRequest(image=IMAGE), timeout=5, metadata=[("authorization", f"Bearer {TOKEN}")]
            )
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_plaintext_clients_cannot_talk_to_a_tls_port(secure_server):
    with grpc.insecure_channel(f"127.0.0.1:{secure_server.server.port}") as channel:
        with pytest.raises(grpc.RpcError) as info:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_cli_classifies_over_mutual_tls_with_a_token(secure_server, pki):
    result = subprocess.run(
        [str(Path(sys.executable).parent / "convray"), "classify", str(REPO_ROOT / "examples/digits/digit-3.png"),
         "--server", f"localhost:{secure_server.server.port}", "--tls-ca", str(pki["ca"]),
         "--tls-cert", str(pki["client"][0]), "--tls-key", str(pki["client"][1]),
         "--token-file", str(pki["token"]), "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert '"label": "3"' in result.stdout


@pytest.mark.parametrize("flags", [[], ["--streaming"]], ids=["unary", "streaming"])
def test_bench_loads_a_server_over_mutual_tls_with_a_token(secure_server, pki, flags, tmp_path):
    """Found in a walkthrough: bench had no TLS or token flags, and against a TLS server said it could not reach
    it, 30 s later."""
    out = tmp_path / "report.json"
    result = subprocess.run(
        [str(Path(sys.executable).parent / "convray"), "bench", "--server", f"localhost:{secure_server.server.port}",
         "--tls-ca", str(pki["ca"]), "--tls-cert", str(pki["client"][0]), "--tls-key", str(pki["client"][1]),
         "--token-file", str(pki["token"]), "--concurrency", "2", "--duration", "1", "--warmup", "0.2",
         "--json", str(out), *flags],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["ok"] > 0 and report["errors"] == {}


async def test_renewed_certificate_files_are_served_without_a_restart_and_a_mismatched_pair_is_not(tmp_path):
    """Found in review: the files were read once at start, so a certificate renewed in place (cert-manager, a
    Kubernetes Secret volume) was not served, and the old one expired under a server that had not restarted."""
    import os

    from convray.service.config import SecuritySettings
    from convray.service.security import server_credentials

    first_ca, first_ca_key = make_cert("first CA", is_ca=True)
    next_ca, next_ca_key = make_cert("next CA", is_ca=True)
    cert, key = write_pem(tmp_path, "server", *make_cert("server", first_ca, first_ca_key))
    server = grpc.aio.server()

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    handlers = {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
    port = server.add_secure_port("localhost:0", server_credentials(SecuritySettings(tls_cert=cert, tls_key=key)))
    await server.start()

    async def trusted_by(ca) -> bool:
        credentials = grpc.ssl_channel_credentials(ca.public_bytes(serialization.Encoding.PEM))
        async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:  # a new connection
            try:
                return await channel.unary_unary("/test.Echo/Echo")(b"x", timeout=5) == b"x"
            except grpc.aio.AioRpcError:
                return False

    def renew(name: str, with_key: bool = True) -> None:
        staged = tmp_path / name
        staged.mkdir()
        new_cert, new_key = write_pem(staged, "server", *make_cert("server", next_ca, next_ca_key))
        os.replace(new_cert, cert)  # replaced whole, as a Secret volume's symlink swap does
        if with_key:
            os.replace(new_key, key)

    try:
        assert await trusted_by(first_ca) and not await trusted_by(next_ca)
        renew("half", with_key=False)  # caught mid-update: the new certificate with the old key
        assert await trusted_by(first_ca)  # still the old pair
        renew("whole")
        assert await trusted_by(next_ca) and not await trusted_by(first_ca)
    finally:
        await server.stop(None)


def rest_call(server, pki, path, token=TOKEN, client="client", body=None, scheme="https"):
    """(status, body) of one call to the REST port over mutual TLS; ``client`` None sends no certificate."""
    context = ssl.create_default_context(cafile=pki["ca"])
    if client is not None:
        context.load_cert_chain(*pki[client])
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    request = urllib.request.Request(f"{scheme}://localhost:{server.server.http_port}{path}", body, headers)
    try:
        with urllib.request.urlopen(request, context=context if scheme == "https" else None, timeout=30) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as failed:
        return failed.code, failed.read()


def rest_call_raw_header(server, pki, header: bytes) -> tuple[int, bytes]:
    """A GET of the model's metadata with one header written byte for byte (http.client would refuse it)."""
    context = ssl.create_default_context(cafile=pki["ca"])
    context.load_cert_chain(*pki["client"])
    with socket.create_connection(("localhost", server.server.http_port), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /v2/models/digits HTTP/1.1\r\nHost: localhost\r\n" + header + b"\r\n"
                        b"Connection: close\r\n\r\n")  # fmt: skip
            reply = b""
            while chunk := tls.recv(65536):
                reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_the_rest_port_serves_mutual_tls_and_wants_the_token_except_for_health_checks(secure_server, pki):
    assert rest_call(secure_server, pki, "/v2/health/ready", token=None)[0] == 200  # probes send no token
    for token in (None, "wrong"):
        status, body = rest_call(secure_server, pki, "/v2/models/digits", token=token)
        assert status == 401 and "missing or invalid bearer token" in json.loads(body)["error"]
    # Found in review: a header byte that is not UTF-8 raised in the check, a 500 and a traceback per call.
    assert rest_call_raw_header(secure_server, pki, b"Authorization: Bearer \xff")[0] == 401
    assert rest_call(secure_server, pki, "/v2/models/digits")[0] == 200
    header = json.dumps({"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": 4 + len(IMAGE)}}]}).encode()  # fmt: skip
    body = header + len(IMAGE).to_bytes(4, "little") + IMAGE
    request = urllib.request.Request(
        f"https://localhost:{secure_server.server.http_port}/v2/models/digits/infer", body,
        {"Authorization": f"Bearer {TOKEN}", "Inference-Header-Content-Length": str(len(header))},
    )  # fmt: skip
    context = ssl.create_default_context(cafile=pki["ca"])
    context.load_cert_chain(*pki["client"])
    with urllib.request.urlopen(request, context=context, timeout=30) as reply:
        probabilities = json.loads(reply.read())["outputs"][0]["data"]
    assert probabilities.index(max(probabilities)) == 3


@pytest.mark.parametrize("client,scheme", [(None, "https"), ("stranger", "https"), (None, "http")],
                         ids=["no-client-certificate", "a-stranger's-certificate", "plaintext"])  # fmt: skip
def test_the_rest_port_refuses_clients_that_cannot_show_a_certificate_of_the_client_ca(
    secure_server, pki, client, scheme
):
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError, http_client.RemoteDisconnected)):
        rest_call(secure_server, pki, "/v2/models/digits", client=client, scheme=scheme)


def test_the_rest_ports_tls_serves_renewed_files_to_new_connections_and_not_a_mismatched_pair(tmp_path):
    """As the gRPC port's (the test above): each new handshake takes renewed files, none caught mid-update."""
    import os

    from convray.service.config import SecuritySettings
    from convray.service.security import rest_ssl_context

    first_ca, first_ca_key = make_cert("first CA", is_ca=True)
    next_ca, next_ca_key = make_cert("next CA", is_ca=True)
    cert, key = write_pem(tmp_path, "server", *make_cert("server", first_ca, first_ca_key))
    context = rest_ssl_context(SecuritySettings(tls_cert=cert, tls_key=key))
    listener = socket.create_server(("127.0.0.1", 0))

    def handshakes() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:  # closed: the test is over
                return
            try:
                context.wrap_socket(connection, server_side=True).close()
            except (ssl.SSLError, OSError):
                connection.close()

    threading.Thread(target=handshakes, daemon=True).start()

    def trusted_by(ca) -> bool:
        client = ssl.create_default_context(cadata=ca.public_bytes(serialization.Encoding.PEM).decode())
        with socket.create_connection(listener.getsockname(), timeout=5) as raw:
            try:  # by IP address: no SNI, as a client reaching the pod's address sends
                with client.wrap_socket(raw, server_hostname="127.0.0.1"):
                    return True
            except ssl.SSLError:
                return False

    def renew(name: str, with_key: bool = True) -> None:
        staged = tmp_path / name
        staged.mkdir()
        new_cert, new_key = write_pem(staged, "server", *make_cert("server", next_ca, next_ca_key))
        os.replace(new_cert, cert)
        if with_key:
            os.replace(new_key, key)

    try:
        assert trusted_by(first_ca) and not trusted_by(next_ca)
        renew("half", with_key=False)  # caught mid-update: the new certificate with the old key
        assert trusted_by(first_ca)
        renew("whole")
        assert trusted_by(next_ca) and not trusted_by(first_ca)
    finally:
        listener.close()
