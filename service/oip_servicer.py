"""``inference.GRPCInferenceService``: the Open Inference Protocol (KServe v2) with Triton's additions.

Served on the same port as convray's own API, through the same batchers and replicas, so
tritonclient and other OIP clients work unchanged. Kept thin: proto in -> Classifier / registry -> proto out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import numpy as np

from convray.oip import inference_pb2 as oip
from convray.oip import inference_pb2_grpc as oip_grpc
from convray.service import __version__
from convray.service.config import BatchingSettings, WorkerSettings
from convray.service.errors import (
    ConvrayError,
    InvalidInput,
    ModelControlOff,
    ModelNotReady,
    check_request_id,
    echoed,
    shown,
)
from convray.service.inference import Classifier, run_resolved
from convray.service.metrics import Metrics
from convray.service.oip_codec import (
    CONTENT_TYPE,
    IMAGE_INPUT,
    OUTPUT,
    PIXELS_INPUT,
    TIMEOUT,
    check_content_type,
    from_base64,
    images_in,
    infer_response,
    parse_version,
    read_input,
    reject_parameters,
    requested_outputs,
    with_timeout,
)
from convray.service.registry import ModelRegistry, ServedModel
from convray.service.rpc import (
    API_LABELS,
    OpenStreams,
    RpcObserver,
    StreamClosedForDrain,
    TooManyStreams,
    deadline_of,
    ordered_concurrently,
    stream_budget,
)
from convray.service.statistics import Duration
from convray.workers.repository import validate_model_name

EXTENSIONS = ["classification", "model_configuration", "model_repository", "statistics"]
PLATFORM = "pytorch_convray"


def _duration(d: Duration) -> oip.StatisticDuration:
    return oip.StatisticDuration(count=d.count, ns=d.ns)


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    """The OIP RPCs over convray's model registry."""

    def __init__(
        self,
        classifier: Classifier,
        registry: ModelRegistry,
        metrics: Metrics,
        batching: BatchingSettings,
        workers: WorkerSettings,
        model_control_off: str | None = None,
        streams: OpenStreams | None = None,
        api: str = API_LABELS["inference.GRPCInferenceService"],
    ) -> None:
        """``model_control_off``: why RepositoryModelLoad/Unload are refused (FAILED_PRECONDITION); None allows them.

        ``streams``: where its request streams are tracked, for a drain to stop reading them. ``api``: the ``api``
        label its calls are counted under (``rest`` for the REST front, which calls these methods too).
        """
        self._streams = streams or OpenStreams()
        self._model_control_off = model_control_off
        self._classifier = classifier
        self._registry = registry
        self._batching = batching
        self._workers = workers
        self._rpc = RpcObserver(api, metrics, registry.metric_label)

    def refused(self, rpc: str, exc: ConvrayError, model: str = "") -> tuple[grpc.StatusCode, str]:
        """Count and log a call refused before it reached an RPC method (a REST body that is not valid JSON)."""
        return self._rpc.refused(rpc, exc, model)

    def _resolve(self, name: str, version: str) -> ServedModel:
        return self._registry.resolve(name, parse_version(version))

    # ---- health and metadata ----

    async def ServerLive(
        self, request: oip.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerLiveResponse:
        """Live while the process serves RPCs (for liveness probes)."""
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: oip.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerReadyResponse:
        """Ready once the models are loaded, until the server starts draining."""
        return oip.ServerReadyResponse(ready=self._registry.ready)

    async def ModelReady(
        self, request: oip.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelReadyResponse:
        """Whether the named model version is loaded and has a replica able to serve; a non-numeric version: refused."""
        try:
            self._registry.resolve_serving(request.name, parse_version(request.version))
        except InvalidInput as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except ConvrayError:
            return oip.ModelReadyResponse(ready=False)
        return oip.ModelReadyResponse(ready=True)

    async def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerMetadataResponse:
        """Server name, version and the protocol extensions it supports."""
        return oip.ServerMetadataResponse(name="convray", version=__version__, extensions=EXTENSIONS)

    async def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelMetadataResponse:
        """The model's tensors: ``input`` (FP32 NCHW pixels 0..255) or ``image`` (BYTES), and ``probabilities``."""

        async def work() -> oip.ModelMetadataResponse:
            served = self._resolve(request.name, request.version)
            contract = served.metadata.input
            tensor = oip.ModelMetadataResponse.TensorMetadata
            return oip.ModelMetadataResponse(
                name=served.name,
                versions=[str(v) for v in self._registry.loaded_versions(served.name)],
                platform=PLATFORM,
                inputs=[
                    tensor(
                        name=PIXELS_INPUT,
                        datatype="FP32",
                        shape=[-1, contract.channels, contract.height, contract.width],
                    ),
                    # [N, 1] as ModelConfig's dims [1] say (Triton's convention); [N] is accepted too.
                    tensor(name=IMAGE_INPUT, datatype="BYTES", shape=[-1, 1]),
                ],
                outputs=[tensor(name=OUTPUT, datatype="FP32", shape=[-1, len(served.metadata.labels)])],
            )

        return await self._rpc.unary("ModelMetadata", request.name, work, context)

    async def ModelConfig(
        self, request: oip.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelConfigResponse:
        """Triton's model configuration: max batch size, NCHW input, output with labels, batching, instances."""

        async def work() -> oip.ModelConfigResponse:
            served = self._resolve(request.name, request.version)
            contract = served.metadata.input
            kind = (
                oip.ModelInstanceGroup.KIND_GPU
                if self._workers.gpus_per_replica > 0
                else oip.ModelInstanceGroup.KIND_CPU
            )
            config = oip.ModelConfig(
                name=served.name,
                platform=PLATFORM,
                backend="pytorch",
                max_batch_size=served.batcher.max_batch_size,
                input=[
                    # Each is optional: a request sends exactly one of the two.
                    oip.ModelInput(name=PIXELS_INPUT, data_type=oip.TYPE_FP32, format=oip.ModelInput.FORMAT_NCHW,
                                   dims=[contract.channels, contract.height, contract.width], optional=True),
                    oip.ModelInput(name=IMAGE_INPUT, data_type=oip.TYPE_STRING, dims=[1], optional=True),
                ],
                output=[oip.ModelOutput(name=OUTPUT, data_type=oip.TYPE_FP32, dims=[len(served.metadata.labels)],
                                        label_filename="labels.txt")],
                instance_group=[oip.ModelInstanceGroup(name=served.name, count=served.pool.size, kind=kind)],
                dynamic_batching=oip.ModelDynamicBatching(
                    max_queue_delay_microseconds=int(self._batching.max_batch_delay_ms * 1000), preserve_ordering=True
                ),
                parameters={"version": oip.ModelParameter(string_value=str(served.version)),
                            "output_activation": oip.ModelParameter(string_value=served.metadata.spec.output)},
            )  # fmt: skip
            return oip.ModelConfigResponse(config=config)

        return await self._rpc.unary("ModelConfig", request.name, work, context)

    # ---- inference ----

    async def _infer(self, request: oip.ModelInferRequest, deadline: float | None) -> oip.ModelInferResponse:
        check_request_id(request.id, "the request's id")
        check_content_type(request.parameters, "the request", ("np",))
        reject_parameters(request.parameters, "the request", frozenset({CONTENT_TYPE, TIMEOUT}))
        deadline = with_timeout(request.parameters, deadline)
        outputs = requested_outputs(request)

        async def run(served: ServedModel) -> oip.ModelInferResponse:
            model_input = read_input(
                request, served.metadata.input, served.batcher.max_batch_size, self._classifier.max_image_bytes
            )
            if model_input.images is not None:
                unwrap = from_base64 if model_input.base64 else None
                _, results = await self._classifier.infer_images(served, model_input.images, deadline, unwrap)
            else:
                assert model_input.pixels is not None
                results = await self._classifier.infer_pixels(served, list(model_input.pixels), deadline)
            probabilities = (
                np.stack([r.probabilities for r in results]) if len(results) > 1 else results[0].probabilities[None]
            )
            return infer_response(
                served.name, str(served.version), request.id, probabilities, served.metadata.labels, outputs
            )

        version = parse_version(request.model_version)
        return await run_resolved(self._registry, request.model_name, version, run)

    async def ModelInfer(
        self, request: oip.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelInferResponse:
        """Classify a batch of images given as pixels or encoded bytes."""
        deadline = deadline_of(context)
        return await self._rpc.unary("ModelInfer", request.model_name, lambda: self._infer(request, deadline), context)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[oip.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[oip.ModelStreamInferResponse]:
        """ModelInfer over a bidirectional stream: concurrent, answered in request order, errors inline."""
        deadline = deadline_of(context)
        budget = stream_budget(self._batching)
        items = ordered_concurrently(
            request_iterator, lambda r: self._stream_item(r, deadline), budget, images_in, self._streams
        )
        try:
            async for reply in items:
                yield reply
        except StreamClosedForDrain as exc:
            await context.abort(exc.code, str(exc))
        except TooManyStreams as exc:
            await context.abort(*self._rpc.refused("ModelStreamInfer", exc))

    async def _stream_item(
        self, request: oip.ModelInferRequest, deadline: float | None
    ) -> oip.ModelStreamInferResponse:
        outcome = await self._rpc.item(
            "ModelStreamInfer", request.model_name, lambda: self._infer(request, deadline), deadline
        )
        if isinstance(outcome, tuple):
            code, message = outcome
            # The id in the text as well: tritonclient hands a stream callback only the error message, so its users
            # could match a failed item only by counting.
            about = f"request {shown(request.id)}: " if request.id else ""
            return oip.ModelStreamInferResponse(
                error_message=f"[{code.name}] {about}{message}",
                infer_response=oip.ModelInferResponse(model_name=echoed(request.model_name), id=echoed(request.id)),
            )
        return oip.ModelStreamInferResponse(infer_response=outcome)

    # ---- statistics and repository ----

    async def ModelStatistics(
        self, request: oip.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelStatisticsResponse:
        """Counts and durations per loaded version (all loaded versions when no name is given)."""

        async def work() -> oip.ModelStatisticsResponse:
            if request.name:
                served_list = [self._resolve(request.name, request.version)]
            elif request.version:
                raise InvalidInput("a version needs a model name")
            else:
                served_list = self._registry.served_versions()
            reply = oip.ModelStatisticsResponse()
            for served in served_list:
                stats = served.stats
                reply.model_stats.add(
                    name=served.name,
                    version=str(served.version),
                    last_inference=stats.last_inference_ms,
                    inference_count=stats.inference_count,
                    execution_count=stats.execution_count,
                    inference_stats=oip.InferStatistics(
                        success=_duration(stats.success), fail=_duration(stats.fail),
                        queue=_duration(stats.queue), compute_infer=_duration(stats.compute_infer),
                    ),
                    batch_stats=[oip.InferBatchStatistics(batch_size=size, compute_infer=_duration(d))
                                 for size, d in sorted(stats.batches.items())],
                )  # fmt: skip
            return reply

        return await self._rpc.unary("ModelStatistics", request.name, work, context)

    async def RepositoryIndex(
        self, request: oip.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> oip.RepositoryIndexResponse:
        """Every model version in the repository and whether it is loaded (READY) or not (UNAVAILABLE).

        A version still served after its directory was removed from disk is listed too (READY).
        """

        async def work() -> oip.RepositoryIndexResponse:
            self._check_repository_name(request.repository_name)
            reply = oip.RepositoryIndexResponse()
            repository = self._registry.repository
            served = {s.name for s in self._registry.served_versions()}
            for name in sorted(set(repository.model_names()) | served):
                loaded = set(self._registry.loaded_versions(name))
                for version in sorted(set(repository.versions(name)) | loaded):
                    if version in loaded:
                        reply.models.add(name=name, version=str(version), state="READY")
                    elif not request.ready:
                        reply.models.add(name=name, version=str(version), state="UNAVAILABLE", reason="not loaded")
            return reply

        return await self._rpc.unary("RepositoryIndex", "", work, context)

    async def RepositoryModelLoad(
        self, request: oip.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> oip.RepositoryModelLoadResponse:
        """Load (or move to) the highest version on disk; the serving version stays until it is warm."""

        async def work() -> oip.RepositoryModelLoadResponse:
            self._check_repository_name(request.repository_name)
            reject_parameters(request.parameters, "RepositoryModelLoad (config and file overrides are not supported)")
            self._check_model_control()
            _check_model_name(request.model_name)
            await self._registry.load_latest(request.model_name)
            return oip.RepositoryModelLoadResponse()

        return await self._rpc.unary("RepositoryModelLoad", request.model_name, work, context)

    async def RepositoryModelUnload(
        self, request: oip.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> oip.RepositoryModelUnloadResponse:
        """Stop serving a model after finishing its queued requests."""

        async def work() -> oip.RepositoryModelUnloadResponse:
            self._check_repository_name(request.repository_name)
            # tritonclient always sends unload_dependents; convray models have no dependents, so it holds either way.
            reject_parameters(request.parameters, "RepositoryModelUnload", frozenset({"unload_dependents"}))
            self._check_model_control()
            _check_model_name(request.model_name)
            await self._registry.unload(request.model_name)
            return oip.RepositoryModelUnloadResponse()

        return await self._rpc.unary("RepositoryModelUnload", request.model_name, work, context)

    def _check_model_control(self) -> None:
        if self._model_control_off is not None:
            raise ModelControlOff(self._model_control_off)
        if not self._registry.ready:  # the start-up loads (or a recovery's) come first, and Ray may not be there
            raise ModelNotReady("server is starting: models are still loading; retry shortly")

    @staticmethod
    def _check_repository_name(name: str) -> None:
        if name:
            raise InvalidInput(f"convray serves one model repository; leave repository_name empty, got {shown(name)}")


def _check_model_name(name: str) -> None:
    """Refuse a name no model of the repository can have: a path would reach outside it ("../x", "/x")."""
    try:
        validate_model_name(name)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
