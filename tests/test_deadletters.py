"""The dead-letter store on disk, and its round trip through a real server and the CLI."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner
from conftest import APPS

from evserver import Client, RemoteError
from evserver.cli import main
from evserver.deadletters import DeadLetter, DeadLetterStore


def letter(i: int, type: str = "pay.card") -> DeadLetter:
    return DeadLetter(type, {"n": i}, f"id{i}", 1.5, {"k": "v"}, "app.pay", "processor",
                      "ValueError", "bad", "Traceback...", 3, 2.5)


def test_round_trip_filter_and_count(tmp_path):
    store = DeadLetterStore(tmp_path / "dl", fsync_interval=0)
    for i in range(5):
        store.append(letter(i, "pay.card" if i % 2 else "notify.mail"))
    store.close()
    assert [r.event_id for r in store.read()] == [f"id{i}" for i in range(5)]
    assert [r.event_id for r in store.read("pay.*")] == ["id1", "id3"]
    assert next(iter(store.read())) == letter(0, "notify.mail")
    assert store.count() == 5


def test_a_torn_last_record_is_skipped(tmp_path):
    store = DeadLetterStore(tmp_path, fsync_interval=0)
    store.append(letter(1))
    store.append(letter(2))
    store.close()
    size = store.file.stat().st_size
    with open(store.file, "r+b") as f:
        f.truncate(size - 7)  # a crash in the middle of the last write
    assert [r.event_id for r in store.read()] == ["id1"]


def test_fsync_is_batched(tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd) or real(fd))
    store = DeadLetterStore(tmp_path, fsync_interval=3600)
    for i in range(100):
        store.append(letter(i))
    assert calls == []  # written to the OS, not yet synced
    store.close()
    assert len(calls) == 1
    every = DeadLetterStore(tmp_path / "b", fsync_interval=0)
    for i in range(3):
        every.append(letter(i))
    assert len(calls) == 4


def test_remove_keeps_the_others_and_merges_processes(tmp_path):
    a, b = DeadLetterStore(tmp_path, fsync_interval=0), DeadLetterStore(tmp_path)
    b.file = tmp_path / "dead-letters-999-1.msgpack"  # a second process's file
    for i in range(4):
        (a if i % 2 else b).append(letter(i))
    assert sorted(r.event_id for r in a.read()) == ["id0", "id1", "id2", "id3"]
    assert a.remove({"id1", "id2"}) == 2
    assert sorted(r.event_id for r in a.read()) == ["id0", "id3"]
    a.append(letter(5))  # the writer notices its file was rewritten and keeps appending
    assert sorted(r.event_id for r in b.read()) == ["id0", "id3", "id5"]
    assert a.remove({"id0", "id3", "id5"}) == 3
    assert list(a.read()) == []


@pytest.fixture
def flaky(server_factory, tmp_path):
    dl = tmp_path / "dead-letters"
    fixed = tmp_path / "fixed"
    server = server_factory(f"{APPS}/flaky_app.py:app", "--dead-letters-path", str(dl),
                            "--dead-letters-fsync-interval", "0",
                            env={"FLAKY_FIXED": str(fixed)})
    return server, dl, fixed


def test_failed_events_are_dead_lettered_listed_and_replayed(flaky, tmp_path):
    server, dl, fixed = flaky
    with Client(*server.address) as client:
        with pytest.raises(RemoteError) as info:
            client.send("pay.card", {"n": 1}, ack=True, id="evt-1")
        assert "dead-lettered after 2 attempt(s)" in info.value.message
        with pytest.raises(RemoteError):
            client.send("notify.mail", {"n": 2}, ack=True, id="evt-2")
        with pytest.raises(RemoteError):
            client.request("pay.bank", {"n": 3})  # a request is dead-lettered too
        assert client.request("ok") == "ok"

    config = tmp_path / "evserver.toml"
    config.write_text(f'[dead_letters]\npath = "{dl}"\n')
    runner = CliRunner()
    listed = runner.invoke(main, ["dead-letters", "list", "--config", str(config), "--json"])
    assert listed.exit_code == 0, listed.output
    records = [json.loads(line) for line in listed.output.splitlines()]
    assert {r["event_id"] for r in records} >= {"evt-1", "evt-2"}
    by_id = {r["event_id"]: r for r in records}
    assert by_id["evt-1"]["attempts"] == 2 and by_id["evt-1"]["kind"] == "processor"
    assert by_id["evt-2"]["kind"] == "listener" and by_id["evt-2"]["error_type"] == "RuntimeError"
    text = runner.invoke(main, ["dead-letters", "list", "--config", str(config),
                                "--type", "pay.*"])
    assert "evt-1" in text.output and "evt-2" not in text.output

    # Still broken: replay fails, nothing is removed, exit 1.
    args = ["dead-letters", "replay", "--config", str(config), "--port", str(server.port),
            "--type", "notify.**"]
    failed = runner.invoke(main, args)
    assert failed.exit_code == 1 and "replayed 0, failed 1" in failed.output
    assert "evt-2" in {r.event_id for r in DeadLetterStore(dl).read()}

    fixed.write_text("deployed")
    replayed = runner.invoke(main, args)
    assert replayed.exit_code == 0 and "failed 0" in replayed.output, replayed.output
    remaining = {r.event_id for r in DeadLetterStore(dl).read()}
    assert "evt-2" not in remaining and "evt-1" in remaining


def test_replay_without_a_server_is_one_line_and_exit_1(tmp_path):
    config = tmp_path / "evserver.toml"
    store = DeadLetterStore(tmp_path / "dl", fsync_interval=0)
    store.append(letter(1))
    config.write_text(f'[dead_letters]\npath = "{tmp_path / "dl"}"\n')
    result = CliRunner().invoke(main, ["dead-letters", "replay", "--config", str(config),
                                       "--port", "1", "--timeout", "1"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert store.count() == 1
