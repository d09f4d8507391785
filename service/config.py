"""Settings: convray's one typed configuration.

Values come, highest priority first, from CLI flags (``service.cli`` maps each flag onto a field),
environment variables ``CONVRAY_<GROUP>__<FIELD>`` (e.g. ``CONVRAY_BATCHING__MAX_BATCH_SIZE=64``; ``off``
unsets a setting that may be unset), then the defaults below. Nothing else in convray reads the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from convray.service.credentials import LOOPBACK_HOSTS
from convray.service.event_loop import EventLoopChoice

if TYPE_CHECKING:
    from convray.service.codecs import DecodeLimits


def _off_is_none(value: object) -> object:
    return None if value == "off" else value


# A setting that may be unset: "off" (from a flag or an environment variable) unsets it, e.g.
# CONVRAY_SERVER__METRICS_PORT=off is --no-metrics. Only these: elsewhere "off" keeps its own meaning (false).
Unsettable = BeforeValidator(_off_is_none)


class _Group(BaseModel):
    # Attribute docstrings become field descriptions: the CLI's --help and the README table use them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class ServerSettings(_Group):
    """Where the gRPC and metrics servers listen and how they shut down."""

    host: str = "localhost"
    """gRPC bind address; the default keeps the server private to this machine."""
    port: int = Field(50051, ge=0, le=65535)
    """gRPC port; 0 picks a free one (logged at start)."""
    health_port: Annotated[int | None, Unsettable] = Field(None, ge=0, le=65535)
    """Plaintext gRPC port answering health checks only, for probes that cannot do TLS (Kubernetes'); unset: none."""
    http_port: Annotated[int | None, Unsettable] = Field(None, ge=0, le=65535)
    """Port of the Open Inference Protocol over HTTP/REST (KServe v2 and Triton's binary data); unset: off."""
    metrics_host: str = "localhost"
    """Bind address of the Prometheus /metrics endpoint."""
    metrics_port: Annotated[int | None, Unsettable] = Field(9100, ge=0, le=65535)
    """Port of /metrics; 0 picks a free one; ``--no-metrics`` (or ``off``) disables it."""
    max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    """Largest gRPC message received or sent (grpcio's own default is only 4 MiB)."""
    drain_grace_s: float = Field(10.0, ge=0)
    """On shutdown, how long in-flight requests may take to finish before they are cancelled."""
    max_connection_age_s: float = Field(0.0, ge=0)
    """Seconds until each client is asked to reconnect (GOAWAY), so front ends added later get traffic; 0: never."""
    keepalive_time_s: float = Field(60.0, gt=0)
    """Seconds a connection may stay silent before the server pings it (also keeps idle ones through load balancers)."""
    keepalive_timeout_s: float = Field(20.0, gt=0)
    """How long a ping may go unanswered before the connection is closed and its calls cancelled (peer gone)."""
    min_client_ping_interval_s: float = Field(10.0, ge=0)
    """Most frequent keepalive pings a client may send; faster ones get GOAWAY ``too_many_pings`` (grpc's own: 300)."""
    frontends: int = Field(1, ge=1, le=64)
    """Front-end processes sharing the gRPC port, each with its own replicas and metrics port; split by connection."""
    event_loop: EventLoopChoice = "auto"
    """The front end's event loop: ``uvloop`` (a tenth less CPU per request), or Python's ``asyncio``; auto: uvloop if
    installed."""

    def metrics_port_of(self, frontend: int) -> int | None:
        """The metrics port of front-end process ``frontend`` (0-based): consecutive from ``metrics_port``."""
        return self.metrics_port + frontend if self.metrics_port else self.metrics_port

    @model_validator(mode="after")
    def _frontends_have_ports(self) -> ServerSettings:
        if self.frontends == 1:
            return self
        if 0 in (self.port, self.health_port, self.http_port):
            raise ValueError("--frontends above 1 needs fixed ports: with 0 each front end would pick its own")
        if self.metrics_port:
            first, last = self.metrics_port, self.metrics_port + self.frontends - 1
            if last > 65535:
                raise ValueError(f"{self.frontends} front ends need metrics ports {first}-{last}, past 65535")
            fixed = ((self.port, "--port"), (self.health_port, "--health-port"), (self.http_port, "--http-port"))
            for port, flag in fixed:
                if port and first <= port <= last:
                    raise ValueError(f"the front ends' metrics ports {first}-{last} include {flag} {port}")
        return self


class ModelSettings(_Group):
    """Which model repository is served, and which model requests get when they name none."""

    model_repo: Path = Path("models")
    """Directory holding ``<model-name>/<version>/`` (relative to the working directory)."""
    default_model: str = "digits"
    """Model for requests naming none (in a repository of one model: that one); refused while it is not served."""
    poll_interval_s: float = Field(0.0, ge=0)
    """Seconds between checks of the repository for a newer version, which is loaded, warmed, then served; 0: off."""
    control: bool = False
    """Allow OIP RepositoryModelLoad/Unload (Triton's --model-control-mode=explicit); off, they are refused."""


class BatchingSettings(_Group):
    """The dynamic batcher in front of each model version."""

    max_batch_size: int = Field(32, ge=1, le=4096)
    """At most this many requests share one replica call; GPU replicas warm up with batches of up to it at load."""
    max_batch_delay_ms: float = Field(1.0, ge=0, le=10_000)
    """How long the first request of a batch may wait for others to join it while another batch runs."""
    dispatch_when_idle: bool = True
    """Send a batch at once when none of its model is running, instead of waiting the delay to fill it."""
    max_queue: int = Field(512, ge=1)
    """Requests waiting per model version; past it new ones fail at once with RESOURCE_EXHAUSTED."""
    batches_in_flight_per_replica: int = Field(2, ge=1, le=64)
    """Most batches sent to a replica before its previous ones return (keeps it busy while one transfers)."""
    adaptive_in_flight: bool = True
    """Send a replica a second batch only while compute outlasts a call's overhead and the event loop has time."""


class WorkerSettings(_Group):
    """The Ray cluster and the replica actors that hold the models."""

    ray_address: Annotated[str | None, Unsettable] = None
    """Ray cluster to join (e.g. ``auto`` or ``HOST:6379``); unset starts an embedded local Ray."""
    ray_connect_timeout_s: float = Field(60.0, gt=0)
    """How long to wait for Ray (joining or starting it) before giving up with a clear error."""
    ray_check_interval_s: float = Field(2.0, ge=0)
    """Seconds between checks that Ray still answers (each may wait as long; two misses mark it lost); 0: no checks."""
    ray_lost_exit_s: float = Field(120.0, ge=0)
    """How long Ray may stay lost after start before the server exits with code 1 to be restarted; 0: never."""
    ray_num_cpus: Annotated[int | None, Unsettable] = Field(None, ge=1)
    """CPUs an embedded local Ray may use; unset means all of this machine's."""
    replicas: int = Field(1, ge=1, le=1024)
    """Replica actors per model version."""
    cpus_per_replica: float = Field(1.0, ge=0)
    """Ray CPUs reserved per replica; also its torch thread count (at least 1)."""
    gpus_per_replica: float = Field(0.0, ge=0, le=1)
    """Fractions share one GPU between replicas (each held to its fraction of the memory; one GPU at most); 0: CPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto``, ``cpu`` or ``cuda``; ``auto`` uses the GPU when the replica has one."""
    amp: Literal["none", "fp16", "bf16"] = "none"
    """Mixed precision for the forward pass: ``none``, ``bf16`` or ``fp16`` (GPU only)."""
    graph: Literal["auto", "frozen", "compiled", "eager"] = "auto"
    """Forward pass: ``frozen`` (TorchScript), ``compiled`` (torch.compile), ``eager``; ``auto``: frozen, eager with
    ``amp``."""
    cuda_graphs: bool = False
    """On a GPU, replay each batch's forward pass from CUDA graphs captured at load (one per batch size); not with
    ``compiled``."""
    max_restarts: int = Field(3, ge=-1)
    """Times Ray restarts a replica that died; -1 means without limit."""
    replica_start_timeout_s: float = Field(600.0, gt=0)
    """How long a version's replicas may take to be placed and load before the load fails with a clear error."""
    batch_timeout_s: float = Field(30.0, ge=0)
    """How long a replica may take to answer one batch; past it the replica counts as stuck (alive but hung):
    it is restarted and the batch retried on another. 0: no limit."""
    transport: Literal["direct", "compiled-graph", "actor-call"] = "direct"
    """How batches reach a replica: ``direct`` sockets (a local Unix socket where the replica shares the network
    namespace, else TCP), a Ray ``compiled-graph`` (spins a core), a plain ``actor-call``."""

    @model_validator(mode="after")
    def _graph_fits_amp(self) -> WorkerSettings:
        if self.graph == "frozen" and self.amp != "none":
            raise ValueError(f"--graph frozen does not combine with --amp {self.amp}; use --graph compiled or eager")
        if self.cuda_graphs and self.graph == "compiled":
            raise ValueError("--cuda-graphs does not combine with --graph compiled; use --graph frozen or eager")
        if self.device == "cuda" and self.gpus_per_replica == 0:
            raise ValueError("--device cuda needs --gpus-per-replica above 0: Ray reserves no GPU for the replicas")
        return self


class InputSettings(_Group):
    """Limits and defaults for what clients send."""

    max_image_bytes: int = Field(16 * 1024 * 1024, ge=1)
    """Largest encoded image accepted."""
    max_image_pixels: int = Field(40_000_000, ge=1)
    """Largest width x height accepted, checked from the header before decoding (decompression bombs)."""
    max_request_pixels: int = Field(400_000_000, ge=1)
    """Largest sum of width x height over one request's images, from their headers before decoding (32 x 12 MP fit)."""
    default_top_k: int = Field(5, ge=1)
    """Classes returned when a request's top_k is 0 (capped at the model's class count)."""
    decode_threads: int = Field(4, ge=1, le=256)
    """Threads that decode images off the event loop."""

    def decode_limits(self) -> DecodeLimits:
        """The limits the decoder enforces."""
        from convray.service.codecs import DecodeLimits

        return DecodeLimits(self.max_image_bytes, self.max_image_pixels, self.max_request_pixels)


class SecuritySettings(_Group):
    """Transport security and client authentication (both off by default; the default bind is localhost)."""

    tls_cert: Annotated[Path | None, Unsettable] = None
    """PEM certificate chain of the server; with ``tls_key`` it turns TLS on."""
    tls_key: Annotated[Path | None, Unsettable] = None
    """PEM private key of ``tls_cert``."""
    tls_client_ca: Annotated[Path | None, Unsettable] = None
    """PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)."""
    auth_token_file: Annotated[Path | None, Unsettable] = None
    """File holding a bearer token every RPC must carry (``authorization: Bearer ...``), health checks excepted."""

    @model_validator(mode="after")
    def _complete(self) -> SecuritySettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        return self


class ExplainSettings(_Group):
    """Limits of the Explain RPC, which runs outside the batcher, one image per replica call."""

    max_blocks: int = Field(16, ge=1, le=1024)
    """Most blocks one Explain call may return feature maps of; a call naming none gets all, or this many spread
    from the first block to the last."""
    max_channels: int = Field(64, ge=1, le=4096)
    """Most channels drawn in one block's feature-map grid (the first ones)."""
    max_top_k: int = Field(10, ge=1, le=1000)
    """Most classes one Explain call may ask class activation maps of (Grad-CAM costs a backward pass each)."""
    max_in_flight: int = Field(4, ge=1, le=1024)
    """Explain calls processed at once; past it, more get RESOURCE_EXHAUSTED (Explain bypasses the batcher's queue)."""


class Settings(BaseSettings):
    """Everything ``convray serve`` can be told, grouped by concern."""

    model_config = SettingsConfigDict(env_prefix="CONVRAY_", env_nested_delimiter="__", extra="forbid")

    server: ServerSettings = ServerSettings()
    models: ModelSettings = ModelSettings()
    batching: BatchingSettings = BatchingSettings()
    workers: WorkerSettings = WorkerSettings()
    inputs: InputSettings = InputSettings()
    security: SecuritySettings = SecuritySettings()
    explain: ExplainSettings = ExplainSettings()

    def doubts(self) -> list[str]:
        """Valid combinations that are probably mistakes, one sentence each (``convray serve`` logs them)."""
        found = []
        batching = self.batching
        if batching.max_queue < batching.max_batch_size:
            found.append(
                f"--max-queue {batching.max_queue} is below --max-batch-size {batching.max_batch_size}: batches "
                f"can never fill, and requests of more than {batching.max_queue} images are always refused"
            )
        server, security = self.server, self.security
        if security.auth_token_file is not None and security.tls_cert is None and server.host not in LOOPBACK_HOSTS:
            found.append(
                f"--auth-token-file without --tls-cert/--tls-key on --host {server.host}: clients send the token in "
                "cleartext, readable by anyone on the network path"
            )
        if self.models.control and security.auth_token_file is None and server.host not in LOOPBACK_HOSTS:
            found.append(
                f"--model-control with --host {server.host} and no --auth-token-file: anyone who can reach port "
                f"{server.port} can unload every model"
            )
        return found

    @model_validator(mode="after")
    def _model_control_reaches_every_front_end(self) -> Settings:
        if self.models.control and self.server.frontends > 1:
            raise ValueError(
                f"--model-control cannot be used with --frontends {self.server.frontends}: a load or unload would "
                "reach one front end only; let --poll-interval-s serve new versions on all of them"
            )
        return self

    @model_validator(mode="after")
    def _ports_differ(self) -> Settings:
        server = self.server
        if server.metrics_port and server.metrics_port == server.port:
            raise ValueError(f"--metrics-port must differ from --port (both {server.port})")
        if server.health_port and server.health_port in (server.port, server.metrics_port):
            raise ValueError(f"--health-port {server.health_port} must differ from --port and --metrics-port")
        if server.http_port and server.http_port in (server.port, server.metrics_port, server.health_port):
            raise ValueError(f"--http-port {server.http_port} must differ from the other ports")
        return self
