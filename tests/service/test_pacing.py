"""OverlapAdvisor: one batch per replica always, a second only while compute outlasts the call's overhead
and the front end's event loop has time to spare (LoopLoad)."""

from convray.service.pacing import LOAD_WINDOW_S, LOOP_BUSY_LIMIT, PROBE_EVERY, LoopLoad, OverlapAdvisor


class Clocks:
    """Wall and CPU clocks a test moves by hand."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def advance(self, wall_s: float, busy: float) -> None:
        self.wall += wall_s
        self.cpu += wall_s * busy


def loop_load(clocks: Clocks) -> LoopLoad:
    return LoopLoad(wall_clock=lambda: clocks.wall, cpu_clock=lambda: clocks.cpu)


def run_alone(advisor: OverlapAdvisor, compute_s: float, call_s: float) -> None:
    advisor.finished(advisor.started(), compute_s, call_s)


def test_each_replica_may_always_have_one_batch():
    advisor = OverlapAdvisor(replicas=2)
    run_alone(advisor, compute_s=0.001, call_s=0.004)  # overhead-bound: overlap does not pay
    assert not advisor.overlap_pays
    assert advisor.may_start(0) and advisor.may_start(1)
    assert not advisor.may_start(2)


def test_an_idle_replica_always_gets_a_batch_even_while_another_holds_two():
    """Found in review: with 2 replicas, one stuck (SIGSTOP) on 2 batches made `running` 2 and the idle replica got
    nothing for as long as the other stayed stuck."""
    idle = [True]
    advisor = OverlapAdvisor(replicas=2, idle_replica=lambda running: idle[0])
    run_alone(advisor, compute_s=0.001, call_s=0.004)  # overhead-bound: overlap does not pay
    assert advisor.may_start(2) and advisor.may_start(3)
    idle[0] = False
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


def test_the_loop_load_is_the_cpu_share_of_each_window_smoothed_and_waits_for_a_whole_window():
    clocks = Clocks()
    load = loop_load(clocks)
    clocks.advance(LOAD_WINDOW_S / 2, busy=1.0)
    load.sample()
    assert load.busy == 0.0  # half a window: nothing measured yet
    for _ in range(40):
        clocks.advance(LOAD_WINDOW_S, busy=0.9)
        load.sample()
    assert abs(load.busy - 0.9) < 0.01
    clocks.advance(LOAD_WINDOW_S, busy=0.1)
    load.sample()
    assert 0.7 < load.busy < 0.9  # one quiet window moves it, smoothed


def test_a_busy_event_loop_keeps_one_batch_per_replica_even_when_compute_outlasts_the_overhead():
    clocks = Clocks()
    advisor = OverlapAdvisor(replicas=1, loop_load=loop_load(clocks))
    for _ in range(40):  # compute-bound by the timings, but the loop is at 90% of a core
        clocks.advance(LOAD_WINDOW_S, busy=0.9)
        run_alone(advisor, compute_s=0.200, call_s=0.210)
    assert advisor.loop_load.busy > LOOP_BUSY_LIMIT
    assert not advisor.overlap_pays and not advisor.may_start(1)
    for _ in range(40):  # the load eases: overlap comes back
        clocks.advance(LOAD_WINDOW_S, busy=0.2)
        run_alone(advisor, compute_s=0.200, call_s=0.210)
    assert advisor.overlap_pays and advisor.may_start(1)
