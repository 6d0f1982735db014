"""The dispatcher on its own (no sockets): fairness inside a big job and bounded statistics."""

from __future__ import annotations

import asyncio

from evserver import App, dispatch, outcomes
from evserver._eventlet import eventlet
from evserver.dispatch import Dispatcher, Job
from evserver.event import Event


class Sink:
    def __init__(self) -> None:
        self.jobs: list[Job] = []

    def job_done(self, job: Job) -> None:
        self.jobs.append(job)


def run(app: App, events: list[Event]) -> tuple[Dispatcher, Sink]:
    """Run one job inline, in this green thread, as a connection's reader does."""
    dispatcher, sink = Dispatcher(app), Sink()
    assert dispatcher.run_inline(Job(sink, events))
    assert len(sink.jobs) == 1
    return dispatcher, sink


def test_a_big_batch_lets_other_green_threads_run_while_it_is_processed() -> None:
    app, seen, done = App(), [], []
    app.processor("tick")(lambda event: seen.append(event.data))

    def other() -> None:
        while not done:
            seen.append("other")
            eventlet.sleep(0)

    gt = eventlet.spawn(other)
    _, sink = run(app, [Event("tick", i) for i in range(1000)])
    done.append(True)
    gt.wait()
    assert [x for x in seen if x != "other"] == list(range(1000))
    runs = "".join("o" if x == "other" else "e" for x in seen).split("o")
    assert max(map(len, runs)) <= dispatch.YIELD_EVERY  # never more events between yields
    assert sink.jobs[0].failure(0, 1000) is None


def test_counts_by_type_are_bounded_because_clients_choose_types(monkeypatch) -> None:
    monkeypatch.setattr(outcomes, "MAX_TYPES", 10)
    app = App()
    app.processor("**")(lambda event: None)
    app.processor("bad.*")(lambda event: 1 / 0)
    events = [Event(f"t{i % 25}", i) for i in range(100)] + [Event(f"bad.{i}") for i in range(30)]
    dispatcher, _ = run(app, events)
    stats = dispatcher.stats
    assert len(stats.by_type) == 11 and sum(stats.by_type.values()) == 130
    assert stats.by_type[outcomes.OTHER_TYPES] == 130 - sum(
        n for t, n in stats.by_type.items() if t != outcomes.OTHER_TYPES)
    assert stats.by_type["t0"] == 4  # a type seen before the bound keeps its own count
    assert len(stats.errors_by_type) == 11 and sum(stats.errors_by_type.values()) == 30
    assert stats.events_processed == 130


def test_runs_of_one_type_are_counted_like_single_events() -> None:
    app = App()
    app.processor("a")(lambda event: None)
    app.listener("b")(lambda event: None)
    types = ["a", "a", "b", "a", "b", "b", "b", "c", "a"]
    dispatcher, sink = run(app, [Event(t) for t in types])
    assert dict(dispatcher.stats.by_type) == {"a": 4, "b": 4, "c": 1}
    assert dispatcher.stats.unrouted == 1
    assert sink.jobs[0].failure(0, len(types)).code == "no_handler"


def test_the_empty_type_is_routed_like_any_other() -> None:
    """Forward tags may be empty; a run of them must still reach a catch-all processor."""
    app, seen = App(), []
    app.processor("**")(lambda event: seen.append(event.data))
    dispatcher, sink = run(app, [Event("", 1), Event("", 2), Event("x", 3)])
    assert seen == [1, 2, 3] and dispatcher.stats.unrouted == 0
    assert dict(dispatcher.stats.by_type) == {"": 2, "x": 1}
    assert sink.jobs[0].failure(0, 1000) is None


def test_idle_pool_workers_keep_no_finished_job_alive() -> None:
    """A worker waiting for its next job used to hold its last one (events and replies)
    until then: up to pool_size jobs of memory kept after the traffic ended (the soak found
    a worker 3x its size after a few clients that stopped reading 16 KiB replies)."""
    import gc

    app = App()
    app.processor("big")(lambda event: b"x" * 16384)
    dispatcher, sink = Dispatcher(app, pool_size=4), Sink()
    dispatcher.start()
    for _ in range(8):
        dispatcher.submit(Job(sink, [Event("big", None)], frozenset({0})))
    for _ in range(500):  # bounded: the 8 jobs finish in a few hub turns
        if len(sink.jobs) == 8:
            break
        eventlet.sleep(0.01)
    assert [len(job.values[0]) for job in sink.jobs] == [16384] * 8
    sink.jobs.clear()
    eventlet.sleep(0)  # every worker is back waiting for work
    gc.collect()
    assert [o for o in gc.get_objects() if isinstance(o, Job)] == []
    assert dispatcher.stop(timeout=5)


class Answers:
    def __init__(self) -> None:
        self.jobs: list[Job] = []

    def job_done(self, job: Job) -> None:
        self.jobs.append(job)


def test_a_base_exception_in_a_parked_ordered_event_fails_only_that_event() -> None:
    """Any exception a handler raises fails its own event; the key's next events still run."""
    app = App()

    @app.processor("o", ordered_by="k")
    def proc(event: Event) -> None:
        if event.data["n"] == 0:
            eventlet.sleep(0.02)  # the next ticket of the key is parked meanwhile
        if event.data["n"] == 1:
            raise asyncio.CancelledError()

    dispatcher = Dispatcher(app, pool_size=4)
    dispatcher.start()
    sinks = [Answers() for _ in range(3)]
    for n, sink in enumerate(sinks):
        dispatcher.submit(Job(sink, [Event("o", {"k": 1, "n": n})]))
    with eventlet.Timeout(5):
        while not all(s.jobs for s in sinks):
            eventlet.sleep(0.01)
    failures = [s.jobs[0].failure(0, 1) for s in sinks]
    assert failures[0] is None and failures[2] is None
    assert failures[1] is not None and failures[1].type == "CancelledError"
    assert dispatcher.stop(timeout=5)


def test_a_job_is_answered_only_after_all_listeners_even_when_one_raises() -> None:
    app, finished, at_done = App(), [], []

    @app.listener("e")
    def first(event: Event) -> None:
        eventlet.sleep(0.01)  # blocks: the other listeners go to idle workers
        raise asyncio.CancelledError()

    @app.listener("e")
    def slow(event: Event) -> None:
        eventlet.sleep(0.1)
        finished.append("slow")

    @app.listener("e")
    def other(event: Event) -> None:
        finished.append("other")

    class Sink:
        def job_done(self, job: Job) -> None:
            at_done.append((sorted(finished), job.failure(0, 1)))

    dispatcher = Dispatcher(app, pool_size=4)
    dispatcher.start()
    dispatcher.submit(Job(Sink(), [Event("e", 1)]))
    with eventlet.Timeout(5):
        while not at_done:
            eventlet.sleep(0.01)
    assert at_done[0][0] == ["other", "slow"]
    assert at_done[0][1] is not None and at_done[0][1].type == "CancelledError"
    assert dispatcher.stop(timeout=5)


def test_a_sink_that_raises_ends_no_worker() -> None:
    app = App()
    app.processor("x")(lambda event: None)

    class Broken:
        def job_done(self, job: Job) -> None:
            raise BufferError("cannot answer")

    dispatcher = Dispatcher(app, pool_size=2)
    dispatcher.start()
    for _ in range(4):
        dispatcher.submit(Job(Broken(), [Event("x")]))
    with eventlet.Timeout(5):
        while dispatcher.queue.qsize() or dispatcher.busy:
            eventlet.sleep(0.01)
    assert not [gt for gt in dispatcher._workers if gt.dead]
    assert dispatcher.stop(timeout=5)
