"""The dispatcher on its own (no sockets): fairness inside a big job and bounded statistics."""

from __future__ import annotations

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
