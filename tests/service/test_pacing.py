"""OverlapAdvisor: one batch per replica always, a second only while compute outlasts the call's overhead."""

from convray.service.pacing import PROBE_EVERY, OverlapAdvisor


def run_alone(advisor: OverlapAdvisor, compute_s: float, call_s: float) -> None:
    advisor.finished(advisor.started(), compute_s, call_s)


def test_each_replica_may_always_have_one_batch():
    advisor = OverlapAdvisor(replicas=2)
    run_alone(advisor, compute_s=0.001, call_s=0.004)  # overhead-bound: overlap does not pay
    assert not advisor.overlap_pays
    assert advisor.may_start(0) and advisor.may_start(1)
    assert not advisor.may_start(2)


def test_before_any_measurement_overlap_is_allowed():
    advisor = OverlapAdvisor(replicas=1)
    assert advisor.overlap_pays and advisor.may_start(1)


def test_a_compute_bound_model_overlaps_and_an_overhead_bound_one_does_not():
    compute_bound, overhead_bound = OverlapAdvisor(replicas=1), OverlapAdvisor(replicas=1)
    for _ in range(5):
        run_alone(compute_bound, compute_s=0.200, call_s=0.210)
        run_alone(overhead_bound, compute_s=0.001, call_s=0.004)
    assert compute_bound.may_start(1)
    assert not overhead_bound.may_start(1)
    assert overhead_bound.compute_s == 0.001 and abs(overhead_bound.overhead_s - 0.003) < 1e-12


def test_a_batch_that_shared_its_replica_is_not_measured():
    advisor = OverlapAdvisor(replicas=1)
    run_alone(advisor, compute_s=0.200, call_s=0.210)
    first = advisor.started()
    second = advisor.started()  # crowded: queues behind the first in the replica
    advisor.finished(first, 0.200, 0.210)  # the first shared the replica with the second for part of its call
    advisor.finished(second, 0.200, 0.500)  # 0.3 s of it was waiting behind the first, not overhead
    assert advisor.compute_s == 0.200 and abs(advisor.overhead_s - 0.010) < 1e-12


def test_the_moving_averages_follow_a_change_in_load():
    advisor = OverlapAdvisor(replicas=1)
    run_alone(advisor, compute_s=0.002, call_s=0.003)
    assert advisor.overlap_pays
    for _ in range(20):  # the front end got busy: each call's overhead grew
        run_alone(advisor, compute_s=0.002, call_s=0.008)
    assert not advisor.overlap_pays


def test_while_overlapping_one_batch_in_probe_every_runs_alone_to_measure_again():
    advisor = OverlapAdvisor(replicas=1)
    run_alone(advisor, compute_s=0.200, call_s=0.210)
    for _ in range(PROBE_EVERY // 2):  # PROBE_EVERY batches, in overlapping pairs
        assert advisor.may_start(1)
        ticket, crowded = advisor.started(), advisor.started()
        advisor.finished(ticket, 0.2, 0.4)
        advisor.finished(crowded, 0.2, 0.4)
    assert not advisor.may_start(1)  # the next batch waits to run alone
    run_alone(advisor, compute_s=0.200, call_s=0.210)
    assert advisor.may_start(1)


def test_a_failed_batch_is_not_measured():
    advisor = OverlapAdvisor(replicas=1)
    advisor.finished(advisor.started(), None, None)
    assert advisor.compute_s is None and advisor.may_start(1)
