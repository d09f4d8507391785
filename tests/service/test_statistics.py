"""Per-version statistics: what the OIP ModelStatistics RPC reports."""

from convray.service.statistics import ModelStatistics


def test_batches_count_executions_and_per_image_compute():
    stats = ModelStatistics()
    stats.record_batch(4, 0.002)
    stats.record_batch(4, 0.004)
    stats.record_batch(1, 0.001)
    assert stats.execution_count == 3
    assert (stats.batches[4].count, stats.batches[4].ns) == (2, 6_000_000)
    assert (stats.compute_infer.count, stats.compute_infer.ns) == (9, 7_000_000)
    assert stats.last_inference_ms > 0


def test_requests_count_successes_per_image_and_failures_per_request():
    stats = ModelStatistics()
    stats.record_request(True, 0.010, images=8, queue_s=0.016)
    stats.record_request(False, 0.001)
    assert stats.inference_count == 8
    assert (stats.success.count, stats.success.ns) == (1, 10_000_000)
    assert (stats.queue.count, stats.queue.ns) == (8, 16_000_000)
    assert (stats.fail.count, stats.fail.ns) == (1, 1_000_000)
