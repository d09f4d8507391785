#!/usr/bin/env bash
# Run convray's GPU checks on a lent GPU machine (the `device` tool): no network, Python 3.12 with a CUDA torch.
#
# Here, first:  .venv/bin/python scripts/gpu_bundle.py      (fills .gpu-bundle/: the wheels the machine lacks)
# Then, as one device call from the repository root, with carry [".gpu-bundle"]:
#     scripts/gpu_lease.sh tests bench-group
#
# Steps, run in the order given (each writes under $OUT, which the device tool brings back):
#   tests        the GPU tests (skipped on CPU in CI): serving and training, about 3 minutes
#   bench-group  `convray serve --frontends 8` against 8 separate front ends and 8 no-op servers, over streams,
#                ResNet-style UINT8 (the 0.9x-the-raw-model goal of issue #7), about 5 minutes
#   bench        the make bench-gpu comparison at 2 s points (raw model, no-op, Ray Serve, convray, bf16)
#   graphs       --cuda-graphs against op by op: bench-group's setting with 8 separate front ends each way (and the
#                raw model each way), then the breakdown's first run with CUDA graphs; about 4 minutes
#   graphs-latency  --cuda-graphs against op by op with one front end at concurrency 1 and 32, FP32, digits and
#                ResNet-style (and the raw model each way); about 3 minutes
#   breakdown    where the node's CPU goes (tests/bench/cpu_breakdown.py: cores and CPU ms per image of the clients,
#                front ends, replicas and Ray) under `convray serve --frontends 8`, then 4; about 2 minutes
# Environment: PYTHON (default python3), GPUS (default 1; 0 runs the steps on a CPU, to try this script) and
# FRONTENDS (default 8; bench-group's front ends, each with 32 requests in flight and two client processes).
# TARGETS (default noop,convray,convray_group): bench-group's servers, as tests/bench/run.py --targets takes them.
# TESTS: the test files the tests step runs (by default, every file with a test that needs a GPU).
# REPEATS (default 1): the graphs step's repeats (each adds about 3 minutes).
# PROFILES (unset by default): any value makes breakdown's first run also write py-spy profiles.
# A step that fails is reported and the next one still runs; the exit status is then 1.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
GPUS=${GPUS:-1}
FRONTENDS=${FRONTENDS:-8}
OUT=${OUT:-/tmp/convray-gpu-out}
SITE=/tmp/convray-site   # the bundle's packages, installed once per machine
PACKAGE=/tmp/convray-pkg # the source folders under the `convray` names pyproject gives them
mkdir -p "$OUT"

if [ ! -f "$SITE/.installed" ]; then
    ls .gpu-bundle/wheels/*.whl >/dev/null || { echo "no .gpu-bundle: run scripts/gpu_bundle.py here first" >&2; exit 2; }
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .gpu-bundle/wheels/*.whl
    touch "$SITE/.installed"
fi
cp -r .gpu-bundle/stubs/proto/convray/. proto/convray/
mkdir -p "$PACKAGE/convray"
for pair in service:service workers:workers v1:proto/convray/v1 oip:proto/convray/oip; do
    ln -sfn "$PWD/${pair#*:}" "$PACKAGE/convray/${pair%%:*}"
done
# Ray's workers inherit this environment, so they import the same packages.
export PYTHONPATH="$PWD:$PACKAGE:$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH" PYTHONUNBUFFERED=1
"$PYTHON" - <<'EOF' | tee "$OUT/environment.txt"
import platform, torch, ray, grpc
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print(f"python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}, grpcio {grpc.__version__}, {gpu}")
EOF

bench() { # bench NAME ARGS...: one tests/bench/run.py run, its JSON and its servers' logs under $OUT
    local name=$1 rc=0; shift
    mkdir -p "/tmp/convray-logs/$name"
    "$PYTHON" tests/bench/run.py --gpus "$GPUS" --seconds 2 --warmup 1 --repeats 1 --out "$OUT/$name.json" \
        --logs "/tmp/convray-logs/$name" "$@" 2>&1 | tee "$OUT/$name.txt" || rc=$?
    tar -czf "$OUT/$name-logs.tar.gz" -C /tmp/convray-logs "$name"
    return $rc
}

run_step() {
    case $1 in
        tests)
            # shellcheck disable=SC2086 (TESTS is a list of paths)
            "$PYTHON" -m pytest -p no:cacheprovider -q ${TESTS:-tests/workers/test_replica.py tests/workers/test_forward.py tests/workers/test_cuda_graphs.py \
                tests/service/test_server_gpu.py tests/workers/test_train_gpu.py} 2>&1 | tee "$OUT/tests.txt"
            ;;
        bench-group)
            bench bench-group --models resnet_style --variants-on resnet_style --datatype UINT8 \
                --targets "${TARGETS:-noop,convray,convray_group}" \
                --frontends "$FRONTENDS" --client-processes $((2 * FRONTENDS)) \
                --loaded-concurrency $((32 * FRONTENDS)) --streaming
            ;;
        breakdown)
            # FRONTENDS front ends (two clients and 32 in flight each; the raw model too), then half as many
            local half=$(( (FRONTENDS + 1) / 2 ))
            "$PYTHON" tests/bench/cpu_breakdown.py --gpus "$GPUS" --frontends "$FRONTENDS" --clients $((2 * FRONTENDS)) \
                --concurrency $((32 * FRONTENDS)) --streaming --raw --out "$OUT/breakdown.json" \
                ${PROFILES:+--profiles "$OUT/profiles"} 2>&1 \
                | tee "$OUT/breakdown.txt" &&
            "$PYTHON" tests/bench/cpu_breakdown.py --gpus "$GPUS" --frontends "$half" --clients $((2 * half)) \
                --concurrency $((32 * half)) --streaming --out "$OUT/breakdown-half.json" 2>&1 \
                | tee "$OUT/breakdown-half.txt"
            ;;
        graphs)
            bench graphs --models resnet_style --variants-on resnet_style --datatype UINT8 \
                --targets "${TARGETS:-noop,convray,convray_cuda_graphs}" --repeats "${REPEATS:-1}" \
                --frontends "$FRONTENDS" --client-processes $((2 * FRONTENDS)) \
                --loaded-concurrency $((32 * FRONTENDS)) --streaming &&
            "$PYTHON" tests/bench/cpu_breakdown.py --gpus "$GPUS" --frontends "$FRONTENDS" --clients $((2 * FRONTENDS)) \
                --concurrency $((32 * FRONTENDS)) --streaming --serve-args "--cuda-graphs true" \
                --out "$OUT/breakdown-graphs.json" 2>&1 | tee "$OUT/breakdown-graphs.txt"
            ;;
        graphs-latency)
            bench graphs-latency --models digits,resnet_style --variants-on digits,resnet_style \
                --targets noop,convray,convray_cuda_graphs --client-processes 4
            ;;
        bench)
            bench bench --targets noop,ray_serve,convray,convray_bf16 --variants-on resnet_style --client-processes 4
            ;;
        *)
            echo "unknown step '$1': tests, bench-group, graphs, graphs-latency, bench or breakdown" >&2
            return 2
            ;;
    esac
}

status=0
for step in "$@"; do
    echo "== $step ($(date +%T))"
    run_step "$step" || { echo "== $step FAILED"; status=1; }
done
echo "== done ($(date +%T)); results in $OUT"
exit $status
