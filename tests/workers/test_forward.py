"""The serving forward pass: every graph gives the eager model's probabilities, for any batch size."""

import pytest
import torch

from convray.workers.forward import FrozenForward, ServingModule, build_forward, resolve_graph, serving_forward
from convray.workers.models import CNN, build_model, prepare_for_inference
from convray.workers.spec import CNNSpec
from convray.workers.transforms import Normaliser

HEIGHT, WIDTH = 13, 11  # odd sizes, so 'same' padding with stride 2 pads unevenly


def model_with(pool: str, head: dict, output: str = "softmax", batch_norm: bool = False) -> CNN:
    """A small CNN touching one pooling kind and one head, with 'same' and 'valid' padding, stride 2 and leaky ReLU."""
    spec = CNNSpec.model_validate(
        {
            "in_channels": 3,
            "blocks": [
                {"type": "conv", "filters": 4, "kernel_size": 3, "stride": 2, "padding": "same",
                 "batch_norm": batch_norm},
                {"type": "pool", "kind": pool, "window": 2},
                {"type": "conv", "filters": 6, "kernel_size": 2, "padding": "valid",
                 "activation": {"kind": "leaky_relu", "negative_slope": 0.1}},
                {"type": "dropout", "rate": 0.5},
            ],
            "head": head,
            "num_classes": 5,
            "output": output,
        }
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(spec, HEIGHT, WIDTH)
    if batch_norm:  # non-trivial running statistics, so folding them in is checked
        model(torch.randn(8, 3, HEIGHT, WIDTH))
    return prepare_for_inference(model)


MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
NORMALISE = Normaliser(MEAN, STD, torch.device("cpu"))
EXAMPLE = torch.zeros(2, 3, HEIGHT, WIDTH, dtype=torch.uint8)
MODELS = {
    "max pool, fc head": lambda: model_with("max", {"type": "fc", "hidden": [8], "dropout": 0.2}),
    "avg pool, gap head, batch norm": lambda: model_with("avg", {"type": "gap"}, batch_norm=True),
    "sum pool, gap+fc head": lambda: model_with("sum", {"type": "gap_fc", "hidden": [8]}),
    "min pool, sigmoid output": lambda: model_with("min", {"type": "gap_fc", "hidden": []}, output="sigmoid"),
}


def pixels(batch: int) -> torch.Tensor:
    seeded = torch.Generator().manual_seed(batch)
    return torch.randint(0, 256, (batch, 3, HEIGHT, WIDTH), dtype=torch.uint8, generator=seeded)


def reference(model: CNN, batch: torch.Tensor) -> torch.Tensor:
    """What the replica computed before this module existed: normalise, then the eager model."""
    with torch.inference_mode():
        return model.probabilities(NORMALISE(batch))


@pytest.mark.parametrize("name", MODELS)
def test_a_frozen_graph_gives_the_eager_probabilities_for_batch_sizes_it_was_not_traced_at(name):
    model = MODELS[name]()
    forward = build_forward(model, NORMALISE, "frozen", EXAMPLE)
    assert isinstance(forward, FrozenForward) and isinstance(forward.module, torch.jit.ScriptModule)
    with torch.inference_mode():
        for batch in (1, 3, 17):
            x = pixels(batch)
            got = forward(x)
            assert got.shape == (batch, 5) and got.dtype == torch.float32
            assert torch.allclose(got, reference(model, x), atol=1e-5)


def test_a_frozen_graph_runs_without_the_executors_per_shape_specialisation():
    seen = []

    def module(pixels):
        seen.append(torch._C._get_graph_executor_optimize())
        return pixels

    FrozenForward(module)(pixels(1))
    assert seen == [False]  # so a new batch size never triggers a profiling run or a kernel compile
    assert torch._C._get_graph_executor_optimize()  # and the process-wide setting is left as it was


def test_the_eager_graph_is_the_serving_module_itself():
    model = MODELS["max pool, fc head"]()
    forward = build_forward(model, NORMALISE, "eager", EXAMPLE)
    assert isinstance(forward, ServingModule)
    with torch.inference_mode():
        assert torch.allclose(forward(pixels(4)), reference(model, pixels(4)), atol=1e-6)


def test_building_a_forward_leaves_the_model_usable_for_explain():
    model = MODELS["sum pool, gap+fc head"]()
    build_forward(model, NORMALISE, "frozen", EXAMPLE)
    x = NORMALISE(pixels(1)).requires_grad_()
    model.probabilities(x)[0, 0].backward()  # gradients still flow through the eager module (Grad-CAM)
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_a_compiled_graph_gives_the_eager_probabilities(monkeypatch):
    # Dynamo traces for real, with dynamic batch sizes; the graph then runs through AOTAutograd without
    # Inductor's C++ code generation, which takes over two minutes cold on the 2-core CI machine.
    # `scripts/bench_forward.py --compiled` runs the full Inductor path.
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: real_compile(module, backend="aot_eager", **kw))
    model = MODELS["max pool, fc head"]()
    forward = build_forward(model, NORMALISE, "compiled", EXAMPLE)
    with torch.inference_mode():
        for batch in (1, 5):
            assert torch.allclose(forward(pixels(batch)), reference(model, pixels(batch)), atol=1e-5)


def test_auto_means_frozen_without_mixed_precision_and_eager_with_it():
    assert resolve_graph("auto", "none") == "frozen"
    assert resolve_graph("auto", "bf16") == "eager"
    assert resolve_graph("compiled", "fp16") == "compiled"
    assert resolve_graph("eager", "none") == "eager"


def test_frozen_with_mixed_precision_is_refused_with_the_alternatives():
    with pytest.raises(ValueError, match="'compiled' or 'eager'"):
        resolve_graph("frozen", "bf16")


def test_auto_falls_back_to_eager_on_a_torch_without_torchscript(monkeypatch):
    monkeypatch.delattr(torch.jit, "freeze")
    assert resolve_graph("auto", "none") == "eager"
    with pytest.raises(ValueError, match="no longer has"):
        resolve_graph("frozen", "none")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("graph", ["frozen", "eager"])
def test_on_a_gpu_every_graph_gives_the_cpu_probabilities(graph):
    model = MODELS["avg pool, gap head, batch norm"]()
    expected = reference(model, pixels(6))
    cuda = torch.device("cuda")
    normalise = Normaliser(MEAN, STD, cuda)
    forward = build_forward(model.to(cuda), normalise, graph, EXAMPLE.to(cuda))
    with torch.inference_mode():
        got = forward(pixels(6).to(cuda))
    assert got.is_cuda and torch.allclose(got.cpu(), expected, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_a_compiled_graph_runs_under_fp16_autocast():
    model = MODELS["max pool, fc head"]()
    expected = reference(model, pixels(3))
    cuda = torch.device("cuda")
    normalise = Normaliser(MEAN, STD, cuda)
    with torch.autocast("cuda", dtype=torch.float16):
        forward = build_forward(model.to(cuda), normalise, "compiled", EXAMPLE.to(cuda))
        with torch.inference_mode():
            got = forward(pixels(3).to(cuda))
    assert got.dtype == torch.float32  # the serving module hands back float32 whatever ran inside
    assert torch.allclose(got.cpu(), expected, atol=2e-2)


def test_under_auto_a_model_that_cannot_be_traced_is_served_eager(monkeypatch, caplog):
    def refuse(*args, **kwargs):
        raise RuntimeError("untraceable")

    monkeypatch.setattr(torch.jit, "trace", refuse)
    model = MODELS["max pool, fc head"]()
    graph, forward = serving_forward(model, NORMALISE, "auto", "none", EXAMPLE)
    assert graph == "eager" and isinstance(forward, ServingModule)
    assert "could not build the frozen graph (RuntimeError: untraceable)" in caplog.text
    with torch.inference_mode():
        assert torch.allclose(forward(pixels(2)), reference(model, pixels(2)), atol=1e-6)
    with pytest.raises(RuntimeError, match="untraceable"):  # asked for by name: no silent fallback
        serving_forward(model, NORMALISE, "frozen", "none", EXAMPLE)
