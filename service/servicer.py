"""The ``convray.v1.Classifier`` RPCs, kept thin: proto in -> Classifier / registry call -> proto out."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import grpc

from convray.service.config import BatchingSettings
from convray.service.errors import InvalidInput, check_request_id, echoed
from convray.service.explaining import ExplainAnswer, Explainer
from convray.service.inference import Classification, Classifier
from convray.service.metrics import Metrics
from convray.service.registry import ModelRegistry
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
from convray.v1 import classifier_pb2 as pb
from convray.v1 import classifier_pb2_grpc as pb_grpc

CAM_METHODS = {pb.CAM_METHOD_AUTO: "auto", pb.CAM_METHOD_CAM: "cam", pb.CAM_METHOD_GRAD_CAM: "grad_cam"}


def classification_to_proto(result: Classification, request_id: str) -> pb.ClassifyResponse:
    """The wire form of one classification."""
    batch = result.batch
    return pb.ClassifyResponse(
        model=result.model,
        version=result.version,
        predictions=[
            pb.Prediction(label=p.label, index=p.index, probability=p.probability) for p in result.predictions
        ],
        timings=pb.Timings(
            decode_ms=result.decode_s * 1e3,
            queue_ms=batch.queue_s * 1e3,
            batch_call_ms=batch.batch_call_s * 1e3,
            compute_ms=batch.compute_s * 1e3,
            total_ms=result.total_s * 1e3,
            batch_size=batch.batch_size,
            replica=batch.replica,
        ),
        request_id=request_id,
    )


def explanation_to_proto(answer: ExplainAnswer) -> pb.ExplainResponse:
    """The wire form of one explanation."""
    methods = {name: value for value, name in CAM_METHODS.items()}
    return pb.ExplainResponse(
        model=answer.model,
        version=answer.version,
        predictions=[
            pb.Prediction(label=p.label, index=p.index, probability=p.probability) for p in answer.predictions
        ],
        feature_maps=[
            pb.FeatureMap(
                block=m.block,
                shape=list(m.shape),
                channels_shown=m.channels_shown,
                png=m.grid.png,
                grid_rows=m.grid.rows,
                grid_columns=m.grid.columns,
            )
            for m in answer.feature_maps
        ],
        class_activation_maps=[
            pb.ClassActivationMap(
                prediction=pb.Prediction(label=c.score.label, index=c.score.index, probability=c.score.probability),
                png=c.png,
            )
            for c in answer.cams
        ],
        method=methods[answer.method],
        cam_block=answer.cam_block,
        compute_ms=answer.compute_s * 1e3,
        total_ms=answer.total_s * 1e3,
        replica=answer.replica,
    )


class ClassifierServicer(pb_grpc.ClassifierServicer):
    """convray's own API over the model registry."""

    def __init__(
        self,
        classifier: Classifier,
        registry: ModelRegistry,
        metrics: Metrics,
        explainer: Explainer,
        batching: BatchingSettings,
        streams: OpenStreams | None = None,
    ) -> None:
        """``streams``: where its request streams are tracked, for a drain to stop reading them."""
        self._streams = streams or OpenStreams()
        self._explainer = explainer
        self._batching = batching
        self._classifier = classifier
        self._registry = registry
        self._rpc = RpcObserver(API_LABELS["convray.v1.Classifier"], metrics, registry.metric_label)

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        """Classify one image."""

        async def work() -> pb.ClassifyResponse:
            check_request_id(request.request_id, "request_id")
            result = await self._classifier.classify(
                request.image, request.model, request.version, request.top_k, deadline_of(context)
            )
            return classification_to_proto(result, request.request_id)

        return await self._rpc.unary("Classify", request.model, work, context)

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[pb.ClassifyRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ClassifyStreamResponse]:
        """Classify a stream of images concurrently, answering in request order."""
        deadline = deadline_of(context)
        budget = stream_budget(self._batching)  # one image per request
        items = ordered_concurrently(
            request_iterator, lambda r: self._stream_item(r, deadline), budget, streams=self._streams
        )
        try:
            async for reply in items:
                yield reply
        except StreamClosedForDrain as exc:
            await context.abort(exc.code, str(exc))
        except TooManyStreams as exc:
            await context.abort(*self._rpc.refused("ClassifyStream", exc))

    async def _stream_item(self, request: pb.ClassifyRequest, deadline: float | None) -> pb.ClassifyStreamResponse:
        async def work() -> pb.ClassifyResponse:
            check_request_id(request.request_id, "request_id")
            result = await self._classifier.classify(
                request.image, request.model, request.version, request.top_k, deadline
            )
            return classification_to_proto(result, request.request_id)

        outcome = await self._rpc.item("ClassifyStream", request.model, work, deadline)
        if isinstance(outcome, tuple):
            code, message = outcome
            return pb.ClassifyStreamResponse(
                error=pb.Error(code=code.name, message=message), request_id=echoed(request.request_id)
            )
        return pb.ClassifyStreamResponse(result=outcome, request_id=request.request_id)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        """Every model in the repository with its versions, and which are loaded."""

        async def work() -> pb.ListModelsResponse:
            repo = self._registry.repository
            summaries = []
            for name in repo.model_names():
                loaded = set(self._registry.loaded_versions(name))
                summaries.append(
                    pb.ModelSummary(
                        name=name,
                        versions=[pb.ModelVersionState(version=v, loaded=v in loaded) for v in repo.versions(name)],
                        default_version=max(loaded, default=0),
                    )
                )
            return pb.ListModelsResponse(models=summaries, default_model=self._registry.default_model)

        return await self._rpc.unary("ListModels", "", work, context)

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        """One loaded version's metadata."""

        async def work() -> pb.ModelInfo:
            served = self._registry.resolve(request.model, request.version)
            meta, contract = served.metadata, served.metadata.input
            return pb.ModelInfo(
                name=served.name,
                version=served.version,
                loaded=True,
                input=pb.InputContract(
                    channels=contract.channels,
                    height=contract.height,
                    width=contract.width,
                    colour_mode=contract.colour_mode,
                    normalisation=pb.Normalisation(mean=contract.normalisation.mean, std=contract.normalisation.std),
                ),
                labels=meta.labels,
                output=meta.spec.output,
                metrics={k: float(v) for k, v in meta.metrics.items() if isinstance(v, (int, float))},
                spec_json=json.dumps(meta.spec.model_dump(mode="json")),
                max_batch_size=served.batcher.max_batch_size,
                replicas=served.pool.size,
            )

        return await self._rpc.unary("GetModel", request.model, work, context)

    async def Explain(self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext) -> pb.ExplainResponse:
        """Feature maps and class activation maps of one image."""

        async def work() -> pb.ExplainResponse:
            if request.method not in CAM_METHODS:
                raise InvalidInput(f"unknown method {request.method}; use one of {sorted(CAM_METHODS)} (CamMethod)")
            answer = await self._explainer.explain(
                request.image,
                request.model,
                request.version,
                request.blocks,
                request.top_k,
                CAM_METHODS[request.method],
            )
            return explanation_to_proto(answer)

        return await self._rpc.unary("Explain", request.model, work, context)
