import pytest

from jaxpipe.pipeline.schedule import GPipe, OneFOneB, Phase, Schedule, Task, check_consistent


def names(tasks):
    return " ".join(map(repr, tasks))


def test_gpipe_order_per_stage():
    s = GPipe(n_stages=3, n_microbatches=4)
    for stage in range(3):  # Same order on every stage: all forwards, then all backwards, oldest first.
        assert names(s.tasks(stage)) == "F0 F1 F2 F3 B0 B1 B2 B3"
    check_consistent(s)


def test_1f1b_order_per_stage():
    s = OneFOneB(n_stages=3, n_microbatches=4)
    assert names(s.tasks(0)) == "F0 F1 F2 B0 F3 B1 B2 B3"
    assert names(s.tasks(1)) == "F0 F1 B0 F2 B1 F3 B2 B3"
    assert names(s.tasks(2)) == "F0 B0 F1 B1 F2 B2 F3 B3"
    check_consistent(s)


def test_1f1b_extra_warmup_queues_more_forwards():
    s = OneFOneB(n_stages=3, n_microbatches=5, extra_warmup=1)
    assert names(s.tasks(0)) == "F0 F1 F2 F3 B0 F4 B1 B2 B3 B4"
    assert names(s.tasks(1)) == "F0 F1 F2 B0 F3 B1 F4 B2 B3 B4"
    check_consistent(s)
    for p, m, extra in [(4, 16, 1), (4, 3, 2), (2, 8, 5)]:
        sched = OneFOneB(p, m, extra)
        check_consistent(sched)
        for stage in range(p):  # at most P - s + extra micro-batches' activations alive at once
            alive = peak = 0
            for t in sched.tasks(stage):
                alive += 1 if t.phase == Phase.FWD else -1
                peak = max(peak, alive)
            assert peak == min(p - stage + extra, m)


def test_1f1b_with_fewer_microbatches_than_stages():
    s = OneFOneB(n_stages=4, n_microbatches=2)
    assert names(s.tasks(0)) == "F0 F1 B0 B1"
    check_consistent(s)


def test_inconsistent_schedule_is_rejected():
    class Broken(Schedule):
        def tasks(self, stage):
            order = [0, 1] if stage == 0 else [1, 0]
            return [Task(i, Phase.FWD) for i in order] + [Task(i, Phase.BWD) for i in order]

    with pytest.raises(ValueError, match=r"activations sent in order \[0, 1\] but consumed in \[1, 0\]"):
        check_consistent(Broken(2, 2))
