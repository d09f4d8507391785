"""The convray Grafana dashboard, as code with Grafana's grafana-foundation-sdk.

Regenerate the committed JSON after any change (a test checks they agree):

    .venv/bin/python deploy/grafana/dashboard.py > deploy/grafana/convray-dashboard.json

Every query filters by the ``instance`` and ``model`` template variables (the training row only by
``model``: a training job is its own scrape target) and reads from the ``datasource`` variable.
"""

from __future__ import annotations

import itertools

from grafana_foundation_sdk.builders.common import VizLegendOptions
from grafana_foundation_sdk.builders.dashboard import Dashboard, DatasourceVariable, QueryVariable, Row
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import LegendDisplayMode, LegendPlacement
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    VariableOption,
    VariableRefresh,
    VariableSort,
)

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
SERVED = 'instance=~"$instance", model=~"$model"'
INSTANCE = 'instance=~"$instance"'  # for the front end's own series, which have no model label
INFERENCE_RPCS = 'rpc=~"Classify|ClassifyStream|ModelInfer|ModelStreamInfer"'
RATE = "[$__rate_interval]"


def query(expr: str, legend: str) -> Dataquery:
    """One PromQL target with its legend."""
    return Dataquery().expr(expr).legend_format(legend).datasource(DATASOURCE)


def quantile(q: float, histogram: str, by: str = "", selector: str = SERVED) -> str:
    """The q-quantile of a convray histogram over the rate window, summed over everything but ``by``."""
    group = f"le, {by}" if by else "le"
    return f"histogram_quantile({q}, sum by ({group}) (rate({histogram}_bucket{{{selector}}}{RATE})))"


def panel(title: str, description: str, unit: str, *targets: Dataquery, width: int = 12) -> Timeseries:
    """A time-series panel with a bottom legend table showing the last and max values."""
    built = (
        Timeseries()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .height(8)
        .span(width)
        .legend(
            VizLegendOptions()
            .display_mode(LegendDisplayMode.TABLE)
            .placement(LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs(["lastNotNull", "max"])
        )
    )
    for target in targets:
        built = built.with_target(target)
    return built


def all_option() -> VariableOption:
    """The variable's 'All' choice, selected by default."""
    return VariableOption(selected=True, text="All", value="$__all")


def build() -> Dashboard:
    """The whole dashboard: traffic, batching, replicas, overload and training rows."""
    datasource = DatasourceVariable("datasource").label("Data source").type("prometheus")
    instance = (
        QueryVariable("instance")
        .label("Front end")
        .datasource(DATASOURCE)
        .query("label_values(convray_build_info, instance)")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(all_option())
    )
    model = (
        QueryVariable("model")
        .label("Model")
        .datasource(DATASOURCE)
        .query('label_values(convray_replicas{instance=~"$instance"}, model)')
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(all_option())
    )
    requests = f"convray_requests_total{{{SERVED}}}"
    dashboard = (
        Dashboard("convray")
        .uid("convray-overview")
        .description("convray front ends and their Ray replicas: traffic, latency, batching, replicas, training.")
        .tags(["convray", "generated"])
        .editable()
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .with_variable(datasource)
        .with_variable(instance)
        .with_variable(model)
    )
    sections: list[tuple[str, list[Timeseries]]] = [
        (
            "Traffic and latency",
            [
                panel(
                    "Requests per second",
                    "RPCs answered, by API (native or oip) and RPC.",
                    "reqps",
                    query(f"sum by (api, rpc) (rate({requests}{RATE}))", "{{api}} {{rpc}}"),
                ),
                panel(
                    "Error ratio by code",
                    "Share of RPCs answered with each non-OK gRPC status code.",
                    "percentunit",
                    query(
                        f'sum by (code) (rate(convray_requests_total{{{SERVED}, code!="OK"}}{RATE}))'
                        f" / ignoring (code) group_left sum(rate({requests}{RATE}))",
                        "{{code}}",
                    ),
                ),
                panel(
                    "Request latency",
                    "End-to-end latency of inference RPCs, p50 / p90 / p99.",
                    "s",
                    *(
                        query(
                            quantile(q, "convray_request_duration_seconds", selector=f"{SERVED}, {INFERENCE_RPCS}"),
                            name,
                        )
                        for q, name in ((0.5, "p50"), (0.9, "p90"), (0.99, "p99"))
                    ),
                ),
                panel(
                    "In-flight requests and queue depth",
                    "RPCs being handled now, and requests waiting in each model's batcher.",
                    "short",
                    query(f"sum by (api) (convray_in_flight_requests{{{SERVED}}})", "in flight {{api}}"),
                    query(
                        f"sum by (model, version) (convray_queue_depth{{{SERVED}}})", "queued {{model}} v{{version}}"
                    ),
                ),
            ],
        ),
        (
            "Batching: where the time goes",
            [
                panel(
                    "Time in queue",
                    "Time a request waited in the batcher before its batch was sent, p50 / p99.",
                    "s",
                    query(quantile(0.5, "convray_queue_wait_seconds"), "p50"),
                    query(quantile(0.99, "convray_queue_wait_seconds"), "p99"),
                ),
                panel(
                    "Stages, p99",
                    "Decode, time in the call into the replica (front end's view) and the forward pass inside it.",
                    "s",
                    query(quantile(0.99, "convray_decode_duration_seconds"), "decode"),
                    query(quantile(0.99, "convray_batch_call_duration_seconds"), "replica call"),
                    query(quantile(0.99, "convray_model_compute_duration_seconds"), "model compute (in replica)"),
                ),
                panel(
                    "Batch size",
                    "Requests per batch sent to a replica: mean and p99.",
                    "short",
                    query(
                        f"sum by (model, version) (rate(convray_batch_size_sum{{{SERVED}}}{RATE}))"
                        f" / sum by (model, version) (rate(convray_batch_size_count{{{SERVED}}}{RATE}))",
                        "mean {{model}} v{{version}}",
                    ),
                    query(quantile(0.99, "convray_batch_size", by="model, version"), "p99 {{model}} v{{version}}"),
                ),
                panel(
                    "Batch fill ratio",
                    "Mean batch size over the configured maximum batch size (1 = every batch full).",
                    "percentunit",
                    query(
                        f"sum by (model, version) (rate(convray_batch_fill_ratio_sum{{{SERVED}}}{RATE}))"
                        f" / sum by (model, version) (rate(convray_batch_fill_ratio_count{{{SERVED}}}{RATE}))",
                        "{{model}} v{{version}}",
                    ),
                ),
            ],
        ),
        (
            "Replicas",
            [
                panel(
                    "Replicas and failures",
                    "Replica actors per model version able to take batches, replicas found dead in the window (each"
                    " death once; Ray restarts them) and the batches that found them dead, and replicas reached by"
                    " plain Ray calls instead of their fast path (--transport; see the log).",
                    "short",
                    query(f"sum by (model, version) (convray_replicas{{{SERVED}}})", "replicas {{model}} v{{version}}"),
                    query(
                        f"sum by (model, version) (increase(convray_replica_losses_total{{{SERVED}}}{RATE}))",
                        "deaths {{model}} v{{version}}",
                    ),
                    query(
                        f"sum by (model, version) (increase(convray_replica_failures_total{{{SERVED}}}{RATE}))",
                        "batches that found one dead {{model}} v{{version}}",
                    ),
                    query(
                        f"sum by (model, version) (1 - convray_replica_fast_path{{{SERVED}}})",
                        "on plain Ray calls {{model}} v{{version}}",
                    ),
                ),
                panel(
                    "In-flight batches per replica",
                    "Batches sent to each replica and not yet answered, and whether the pacing lets a replica"
                    " have a second one (1: its compute outlasts a call's overhead and the front end has time).",
                    "short",
                    query(
                        f"sum by (instance, replica, version) (convray_replica_in_flight_batches{{{SERVED}}})",
                        "{{instance}} {{replica}} v{{version}}",
                    ),
                    query(
                        f"max by (model, version) (convray_batch_overlap{{{SERVED}}})",
                        "second batch allowed {{model}} v{{version}}",
                    ),
                ),
                panel(
                    "GPU memory per replica",
                    "torch's allocated and reserved CUDA memory in each replica, as of its last batch (0 on CPU).",
                    "bytes",
                    query(
                        f"max by (instance, replica, version) (convray_replica_gpu_memory_allocated_bytes{{{SERVED}}})",
                        "allocated {{instance}} {{replica}} v{{version}}",
                    ),
                    query(
                        f"max by (instance, replica, version) (convray_replica_gpu_memory_reserved_bytes{{{SERVED}}})",
                        "reserved {{instance}} {{replica}} v{{version}}",
                    ),
                ),
                panel(
                    "Model loads",
                    "Load attempts by outcome, unloads, and the mean load time of the loads in the window.",
                    "short",
                    query(
                        f"sum by (model, outcome) (increase(convray_model_loads_total{{{SERVED}}}{RATE}))",
                        "loads {{model}} {{outcome}}",
                    ),
                    query(
                        f"sum by (model) (increase(convray_model_unloads_total{{{SERVED}}}{RATE}))",
                        "unloads {{model}}",
                    ),
                    query(
                        f"sum by (model) (increase(convray_model_load_duration_seconds_sum{{{SERVED}}}{RATE}))"
                        f" / sum by (model) (increase(convray_model_load_duration_seconds_count{{{SERVED}}}{RATE}))",
                        "mean load seconds {{model}}",
                    ),
                ),
            ],
        ),
        (
            "Overload and deadlines",
            [
                panel(
                    "Overload rejections",
                    "Requests refused with RESOURCE_EXHAUSTED because the model's queue was full (--max-queue).",
                    "reqps",
                    query(
                        f"sum by (model, api) (rate(convray_overload_rejections_total{{{SERVED}}}{RATE}))",
                        "{{model}} {{api}}",
                    ),
                ),
                panel(
                    "Deadline-expired requests",
                    "Requests whose client deadline passed before they were answered.",
                    "reqps",
                    query(
                        f"sum by (model, api) (rate(convray_deadline_expired_total{{{SERVED}}}{RATE}))",
                        "{{model}} {{api}}",
                    ),
                ),
            ],
        ),
        (
            "Ray cluster",
            [
                panel(
                    "Ray cluster connection",
                    "1 while each front end's Ray cluster answers its checks (0 before it is joined and while it is"
                    " lost: readiness is NOT_SERVING then), and the requests refused or failed meanwhile with"
                    " UNAVAILABLE. Per front end: these have no model label.",
                    "short",
                    query(f"min by (instance) (convray_ray_connected{{{INSTANCE}}})", "connected {{instance}}"),
                    query(
                        f"sum by (instance) (rate(convray_ray_unavailable_requests_total{{{INSTANCE}}}{RATE}))",
                        "refused, Ray lost, req/s {{instance}}",
                    ),
                ),
            ],
        ),
        (
            "Training",
            [
                panel(
                    "Training progress",
                    "Epochs done out of planned, per model being trained (convray train --metrics-port), or of"
                    " a search's running trial (convray tune --metrics-port).",
                    "short",
                    query('max by (model) (convray_train_epoch{model=~"$model"})', "epoch {{model}}"),
                    query('max by (model) (convray_train_epochs{model=~"$model"})', "of {{model}}"),
                    width=6,
                ),
                panel(
                    "Training loss and accuracy",
                    "Mean loss and training accuracy over the last completed epoch; for a search, also the running"
                    " trial's held-out accuracy, which picks the winner.",
                    "short",
                    query('max by (model) (convray_train_loss{model=~"$model"})', "loss {{model}}"),
                    query('max by (model) (convray_train_accuracy{model=~"$model"})', "accuracy {{model}}"),
                    query('max by (model) (convray_tune_val_accuracy{model=~"$model"})', "held-out accuracy {{model}}"),
                    width=6,
                ),
                panel(
                    "Training throughput",
                    "Training images per second over the last completed epoch.",
                    "short",
                    query('sum by (model) (convray_train_images_per_second{model=~"$model"})', "{{model}}"),
                    width=6,
                ),
                panel(
                    "Training search trials",
                    "A search's running trial of its planned trials, and those failed (convray tune"
                    " --metrics-port). The panels beside it show the running trial's epochs.",
                    "short",
                    query('max by (model) (convray_tune_trial{model=~"$model"})', "trial {{model}}"),
                    query('max by (model) (convray_tune_trials{model=~"$model"})', "of {{model}}"),
                    query('max by (model) (convray_tune_trials_failed{model=~"$model"})', "failed {{model}}"),
                    width=6,
                ),
            ],
        ),
    ]
    ids = itertools.count(1)
    for title, panels in sections:
        dashboard = dashboard.with_row(Row(title).id(next(ids)))
        for each in panels:
            dashboard = dashboard.with_panel(each.id(next(ids)))
    return dashboard


def render() -> str:
    """The dashboard as Grafana JSON, keys sorted, ending in a newline."""
    return JSONEncoder(sort_keys=True, indent=2).encode(build().build()) + "\n"


if __name__ == "__main__":
    print(render(), end="")
