"""The dead-letter store on disk, its CLI, and replays through a real server."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import stat
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import APPS, REPO

from evserver import Client, RemoteError, deadletters
from evserver.cli import main
from evserver.deadletters import DeadLetter, DeadLetterStore
from evserver.errors import RegistrationError

WAIT = 20.0  # bound on waiting for helper processes


def letter(i: int, type: str = "pay.card", *, id: str | None = None, **fields: Any) -> DeadLetter:
    record = DeadLetter(type, {"n": i}, id or f"id{i}", 1.5 + i, {"k": "v"}, "app.pay",
                        "processor", "ValueError", "bad", "Traceback...", 3, 100.0 + i)
    return dataclasses.replace(record, **fields)


def ids(store: DeadLetterStore, pattern: str | None = None) -> list[str]:
    return [r.event_id for r in store.read(pattern)]


def write_config(tmp_path: Path, dl: Path) -> str:
    config = tmp_path / "evserver.toml"
    config.write_text(f'[dead_letters]\npath = "{dl}"\n')
    return str(config)


# ---------------------------------------------------------------------- the store


def test_round_trip_keeps_every_field(tmp_path):
    odd = letter(1, data={"b": b"\x00\xff", "nested": [1, 2.5, None, "é"]},
                 meta={"trace": "x" * 1000}, kind="listener", message="two\nlines")
    records = [letter(0), odd, letter(2)]
    with DeadLetterStore(tmp_path / "dl", fsync_interval=0) as store:
        for record in records:
            store.append(record)
    assert list(store) == records
    # Another process's view: a fresh store over the same directory reads the same.
    assert list(DeadLetterStore(tmp_path / "dl").read()) == records
    assert store.count() == 3
    assert DeadLetterStore(tmp_path / "missing").count() == 0


def test_pattern_filter_uses_handler_patterns(tmp_path):
    store = DeadLetterStore(tmp_path)
    for i, type in enumerate(["pay.card", "pay.card.refund", "notify.mail", "pay"]):
        store.append(letter(i, type))
    assert ids(store, "pay.card") == ["id0"]
    assert ids(store, "pay.*") == ["id0"]
    assert ids(store, "pay.**") == ["id0", "id1"]
    assert ids(store, "*.mail") == ["id2"]
    assert ids(store) == ["id0", "id1", "id2", "id3"]
    with pytest.raises(RegistrationError):
        list(store.read("pay.**.x"))


@pytest.mark.parametrize("cut", [1, 5, 12, 13, 40])
def test_a_torn_last_record_is_skipped(tmp_path, caplog, cut):
    store = DeadLetterStore(tmp_path, fsync_interval=0)
    store.append(letter(1))
    size_one = store.file.stat().st_size
    store.append(letter(2))
    store.close()
    with open(store.file, "r+b") as f:
        f.truncate(size_one + cut)  # a crash in the middle of the second write
    assert ids(store) == ["id1"]
    assert "unreadable bytes" in caplog.text
    # A later rewrite drops the torn bytes for good.
    store.append(letter(3))
    assert store.remove({"id3"}) == 1
    assert store.file.stat().st_size == size_one


def test_garbage_in_the_middle_hides_nothing_after_it(tmp_path):
    store = DeadLetterStore(tmp_path, fsync_interval=0)
    for i in range(3):
        store.append(letter(i))
    store.close()
    raw = bytearray(store.file.read_bytes())
    second = raw.index(b"EVDL", 1)
    raw[second + 20] ^= 0xFF  # flip a payload byte of record 2: its checksum fails
    store.file.write_bytes(bytes(raw) + b"\0" * 4096)  # and a zero-filled tail, as after
    assert ids(store) == ["id0", "id2"]                # a crash on a delayed-allocation fs


def test_a_failed_append_leaves_no_torn_record(tmp_path, monkeypatch):
    store = DeadLetterStore(tmp_path, fsync_interval=0)
    store.append(letter(1))
    real_write = os.write

    def disk_full(fd: int, data: bytes) -> int:
        real_write(fd, bytes(data[:10]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(OSError):
        store.append(letter(2))
    monkeypatch.undo()
    store.append(letter(3))
    assert ids(store) == ["id1", "id3"]


def test_fsync_is_batched_by_time(tmp_path, monkeypatch):
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):  # directory fsyncs (new names) aside
            synced.append(fd)
        real_fsync(fd)

    now = [1000.0]
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(deadletters, "time", types.SimpleNamespace(
        monotonic=lambda: now[0], time=time.time, sleep=time.sleep))
    store = DeadLetterStore(tmp_path, fsync_interval=10)
    for i in range(100):
        store.append(letter(i))
        now[0] += 0.05  # 100 appends within 5 s: written to the OS, not yet synced
    assert synced == []
    now[0] = 1010.0
    store.append(letter(100))  # the interval is up: this append syncs everything
    assert len(synced) == 1
    store.maybe_sync()
    now[0] = 1015.0
    store.append(letter(101))
    store.maybe_sync()
    assert len(synced) == 1  # within the interval again
    now[0] = 1020.0
    store.maybe_sync()  # the server's timer: the lone append reaches the disk
    assert len(synced) == 2
    store.maybe_sync()  # nothing new: no fsync
    store.close()
    assert len(synced) == 2
    store.append(letter(102))
    store.close()  # close always syncs what is pending
    assert len(synced) == 3
    every = DeadLetterStore(tmp_path / "b", fsync_interval=0)
    for i in range(3):
        every.append(letter(i))
    assert len(synced) == 6
    assert store.count() == 103


def test_stores_of_two_processes_are_merged_by_failure_time(tmp_path):
    a, b = DeadLetterStore(tmp_path), DeadLetterStore(tmp_path)
    assert a.file != b.file
    for i in range(6):
        (a if i % 2 else b).append(letter(i, failed_at=float(i)))
    a.close()
    b.close()
    assert len(a.files()) == 2
    assert ids(a) == [f"id{i}" for i in range(6)]


def test_remove_keeps_the_others_and_writers_carry_on(tmp_path):
    a, b = DeadLetterStore(tmp_path, fsync_interval=0), DeadLetterStore(tmp_path)
    for i in range(6):
        (a if i % 2 else b).append(letter(i))
    assert a.remove({"id1", "id2", "nope"}) == 2
    assert ids(a) == ["id0", "id3", "id4", "id5"]
    a.append(letter(6))  # the writer notices its file was replaced and appends to the new one
    assert ids(b) == ["id0", "id3", "id4", "id5", "id6"]
    assert a.remove({"id3", "id5", "id6"}) == 3  # empties a's file: it is deleted
    assert not a.file.exists()
    a.append(letter(7))  # ... and started afresh by the next append
    assert ids(b) == ["id0", "id4", "id7"]
    assert b.remove(set()) == 0


def test_remove_is_atomic(tmp_path, monkeypatch):
    store = DeadLetterStore(tmp_path, fsync_interval=0)
    for i in range(3):
        store.append(letter(i))
    before = store.file.read_bytes()

    def crash(src: object, dst: object) -> None:
        raise OSError(errno.EIO, "crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.remove({"id1"})
    monkeypatch.undo()
    assert store.file.read_bytes() == before  # old file whole; the temp file is ignored
    assert ids(store) == ["id0", "id1", "id2"]
    assert store.remove({"id1"}) == 1  # the leftover temp file is simply reused
    assert ids(store) == ["id0", "id2"]
    assert [p.name for p in tmp_path.iterdir()] == [store.file.name]


_WRITER = """
import os, sys, time
from pathlib import Path
from typing import Any
from evserver.deadletters import DeadLetter, DeadLetterStore
directory, tag, tick, stop = sys.argv[1:]
n, last, deadline = 0, None, time.monotonic() + 30
with DeadLetterStore(directory, fsync_interval=3600) as store:
    while not os.path.exists(stop) and time.monotonic() < deadline:
        for _ in range(50):
            store.append(DeadLetter("t", n, f"{tag}-{n}", 0.0, {}, "h", "processor", "E",
                                    "m", "tb", 1, float(n)))
            n += 1
        # A burst per remove pass, so every pass races appends and the files stay small.
        while (now := Path(tick).read_text() if os.path.exists(tick) else "") == last:
            if os.path.exists(stop) or time.monotonic() > deadline:
                break
            time.sleep(0.001)
        last = now
print(n)
"""


def test_concurrent_writers_lose_nothing_to_concurrent_removes(tmp_path):
    """Three processes append in bursts while this one removes the even-numbered records;
    afterwards exactly the odd-numbered ones are left: no append was lost to a rewrite."""
    directory, tick, stop = tmp_path / "dl", tmp_path / "tick", tmp_path / "stop"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writers = {tag: subprocess.Popen([sys.executable, "-c", _WRITER, str(directory), tag,
                                      str(tick), str(stop)], env=env, stdout=subprocess.PIPE,
                                     text=True)
               for tag in ("a", "b", "c")}
    store = DeadLetterStore(directory)
    evens = {f"{tag}-{n}" for tag in writers for n in range(0, 10_000, 2)}
    deadline = time.monotonic() + WAIT
    passes = 0
    try:
        while len(store.files()) < len(writers) and time.monotonic() < deadline:
            pass  # every writer has begun
        while passes < 20 and time.monotonic() < deadline:
            store.remove(evens)
            passes += 1
            tick.write_text(str(passes))
    finally:
        stop.touch()
    written = {tag: int(proc.communicate(timeout=WAIT)[0]) for tag, proc in writers.items()}
    assert all(proc.returncode == 0 for proc in writers.values())
    assert passes == 20
    store.remove(evens)
    expected = sorted(f"{tag}-{n}" for tag, count in written.items() for n in range(1, count, 2))
    assert sorted(ids(store)) == expected


# ---------------------------------------------------------------------- dead-letters list


def test_list_prints_a_table_or_json_lines(tmp_path):
    dl = tmp_path / "dl"
    with DeadLetterStore(dl) as store:
        store.append(letter(1, message="first line\nsecond line"))
        store.append(letter(2, "notify.mail", data=b"raw", kind="listener"))
    config = write_config(tmp_path, dl)
    runner = CliRunner()

    text = runner.invoke(main, ["dead-letters", "list", "--config", config])
    assert text.exit_code == 0, text.output
    header, first, second = text.output.splitlines()
    assert header.split() == ["TIME", "TYPE", "ID", "HANDLER", "ATTEMPTS", "ERROR"]
    assert "pay.card" in first and "id1" in first and "processor app.pay" in first
    assert first.endswith("ValueError: first line")
    assert "notify.mail" in second and "listener app.pay" in second

    only = runner.invoke(main, ["dead-letters", "list", "--config", config, "--type", "notify.*"])
    assert only.exit_code == 0 and "id2" in only.output and "id1" not in only.output

    lines = runner.invoke(main, ["dead-letters", "list", "--config", config, "--json"])
    assert lines.exit_code == 0, lines.output
    docs = [json.loads(line) for line in lines.output.splitlines()]
    assert [d["event_id"] for d in docs] == ["id1", "id2"]
    assert docs[0] == {**letter(1, message="first line\nsecond line").as_dict()}
    assert docs[1]["data"] == "raw"


def test_list_reads_the_config_and_env_of_serve(tmp_path):
    dl = tmp_path / "from-env"
    DeadLetterStore(dl).append(letter(1))
    runner = CliRunner(env={"EVSERVER_DEAD_LETTERS_PATH": str(dl)})
    assert "id1" in runner.invoke(main, ["dead-letters", "list"]).output

    empty = CliRunner().invoke(main, ["dead-letters", "list", "--config",
                                      write_config(tmp_path, tmp_path / "none")])
    assert empty.exit_code == 0 and "no dead letters in" in empty.output

    bad = CliRunner().invoke(main, ["dead-letters", "list", "--type", "a.**.b"])
    assert bad.exit_code == 2 and "'**'" in bad.output
    missing = CliRunner().invoke(main, ["dead-letters", "list", "--config", "nope.toml"])
    assert missing.exit_code == 2 and "not found" in missing.output


# ---------------------------------------------------------------------- replay, real server


@pytest.fixture
def flaky(server_factory, tmp_path):
    """A flaky_app server sharing its dead-letter directory with the CLI, as in production."""
    dl, fixed, seen = tmp_path / "dead-letters", tmp_path / "fixed", tmp_path / "seen"
    server = server_factory(f"{APPS}/flaky_app.py:app", "--dead-letters-path", str(dl),
                            "--dead-letters-fsync-interval", "0",
                            env={"FLAKY_FIXED": str(fixed), "FLAKY_SEEN": str(seen)})
    return types.SimpleNamespace(server=server, dl=dl, fixed=fixed, seen=seen,
                                 config=write_config(tmp_path, dl))


def seen_ids(flaky: types.SimpleNamespace) -> list[str]:
    return flaky.seen.read_text().split() if flaky.seen.exists() else []


def replay(flaky: types.SimpleNamespace, *args: str) -> object:
    return CliRunner().invoke(main, ["dead-letters", "replay", "--config", flaky.config,
                                     "--port", str(flaky.server.port), *args])


def test_replay_removes_acked_and_keeps_failing(flaky):
    with DeadLetterStore(flaky.dl) as store:  # left behind by an earlier server
        store.append(letter(1, "ok", id="ok-1"))
        store.append(letter(2, "pay.card", id="pay-2"))
        store.append(letter(3, "notify.mail", id="mail-3", kind="listener"))

    first = replay(flaky)
    assert first.exit_code == 1, first.output
    assert "replayed 1, failed 2" in first.output
    assert "pay-2 (pay.card): RuntimeError" in first.output
    # Same ids on the wire; pay.* was tried twice (retries=1) by the server.
    assert seen_ids(flaky) == ["ok-1", "pay-2", "pay-2", "mail-3"]
    remaining = list(DeadLetterStore(flaky.dl).read())
    assert "ok-1" not in {r.event_id for r in remaining}
    # The old records stay, next to the ones the server wrote for the failed re-sends.
    assert sorted(r.event_id for r in remaining) == ["mail-3", "mail-3", "pay-2", "pay-2"]

    flaky.fixed.touch()
    second = replay(flaky, "--type", "pay.*")
    assert second.exit_code == 0 and "replayed 1, failed 0" in second.output, second.output
    assert seen_ids(flaky)[4:] == ["pay-2"]  # sent once, though stored twice
    assert [r.event_id for r in DeadLetterStore(flaky.dl).read()] == ["mail-3", "mail-3"]

    third = replay(flaky)
    assert third.exit_code == 0 and "replayed 1, failed 0" in third.output
    assert seen_ids(flaky)[5:] == ["mail-3"]
    assert DeadLetterStore(flaky.dl).count() == 0


def test_failures_are_dead_lettered_then_listed_and_replayed(flaky):
    with Client(*flaky.server.address) as client:
        with pytest.raises(RemoteError) as info:
            client.send("pay.card", {"n": 1}, ack=True, id="evt-1")
        assert "dead-lettered after 2 attempt(s)" in info.value.message
        with pytest.raises(RemoteError):
            client.send("notify.mail", {"n": 2}, ack=True, id="evt-2")
        with pytest.raises(RemoteError):
            client.request("pay.bank", {"n": 3})  # its caller heard: not dead-lettered
        assert client.request("ok") == "ok"

    listed = CliRunner().invoke(main, ["dead-letters", "list", "--config", flaky.config,
                                       "--json"])
    assert listed.exit_code == 0, listed.output
    by_id = {r["event_id"]: r for r in map(json.loads, listed.output.splitlines())}
    assert set(by_id) == {"evt-1", "evt-2"}
    assert by_id["evt-1"]["attempts"] == 2 and by_id["evt-1"]["kind"] == "processor"
    assert by_id["evt-1"]["handler"].endswith("pay") and "Traceback" in by_id["evt-1"]["traceback"]
    assert by_id["evt-2"]["kind"] == "listener" and by_id["evt-2"]["error_type"] == "RuntimeError"

    flaky.fixed.touch()
    replayed = replay(flaky, "--type", "notify.**")
    assert replayed.exit_code == 0 and "replayed 1, failed 0" in replayed.output
    assert [r.event_id for r in DeadLetterStore(flaky.dl).read()] == ["evt-1"]


def test_replay_without_a_server_is_one_line_and_exit_1(tmp_path):
    dl = tmp_path / "dl"
    store = DeadLetterStore(dl)
    store.append(letter(1))
    result = CliRunner().invoke(main, ["dead-letters", "replay", "--config",
                                       write_config(tmp_path, dl), "--port", "1",
                                       "--timeout", "1"])
    assert result.exit_code == 1
    assert len(result.output.splitlines()) == 1 and "Traceback" not in result.output
    assert store.count() == 1
