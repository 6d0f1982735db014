"""Load generator and reporter: evserver against a minimal eventlet receiver of the same protocol.

On a shared 2-vCPU VM absolute numbers swing 20-80 % from run to run (performance-notes.md), so
one invocation measures the reference (in-process ceiling + scripts/ref_receiver.py) and the
target (evserver serving scripts/bench_app.py) back to back and reports the target as ratios.
Generators are separate processes that send pre-encoded bytes on blocking sockets, so they stay
far from saturation; each reports its own CPU use to show it. Fire-and-forget runs end with a
PING per connection: the PONG proves every earlier frame of that connection was dispatched.
evserver (default command) must then count exactly the events the generators sent.

``--protocol forward`` sends the same events as Fluentd Forward requests to evserver's Forward
listener (and to the reference's Forward twin): Message mode (single), Forward mode (batch,
acked), PackedForward (packed). Forward has no request/reply, so no rr or idle; its
fire-and-forget runs end with one acked chunk instead of the PING.

Handler costs (``--handler-wait MS``, ``--handler-cpu US``, ``--ordered-keys K``, and
``--listener`` for a listener on every event) reach the servers as BENCH_* environment
variables (scripts/bench_costs.py). Such runs also report the most handlers in flight at once,
the bound a perfect server would reach (``min(pool, events in flight, K) / (wait + spin)``),
and, with a wait, run the asyncio reference (scripts/ref_asyncio.py: a task per event under a
semaphore of ``--pool-size``, uvloop when installed). ``--suite issue13`` runs the acceptance
loads of parallel handlers, one table each.

    python scripts/bench.py --target ref --mode all --repeat 3          # reference only
    python scripts/bench.py --mode batch --batch 100 --json             # ref vs evserver
    python scripts/bench.py --protocol forward --mode acked             # Fluentd Forward
    python scripts/bench.py --server-cmd "python my_launcher.py {port}" # any other server
    python scripts/bench.py --mode rr --handler-wait 10                 # 10 ms green waits
    python scripts/bench.py --suite issue13 --duration 4 --repeat 3    # parallel handlers
"""

from __future__ import annotations

import argparse
import array
import contextlib
import importlib.util
import json
import math
import multiprocessing as mp
import os
import resource
import selectors
import shlex
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

HELLO, EVENT, BATCH, REQUEST, ACK, REPLY, ERROR, PING, PONG = range(9)
ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
MODES = {"native": ("single", "batch", "acked", "rr", "idle"),
         "forward": ("single", "batch", "packed", "acked")}
UNPACED = ("single", "batch", "packed")  # fire-and-forget: sent as fast as the socket takes
CONNECTIONS = {"single": 1, "batch": 1, "packed": 1, "acked": 8, "rr": 50, "idle": 1}
EVENT_BODY = ["bench", {"seq": 12345, "payload": "x" * 16}]  # ~40 bytes, like the notes' 48
EVENT_TIME = 1700000000  # Forward entry time: an int, as fluent-logger sends by default
IO_TIMEOUT = 30.0  # bounds every blocking socket call
IDLE_SETTLE = 5.0  # idle mode: seconds before measuring (evserver parks after 2 s of silence)
PING_FRAME = msgpack.packb([PING, 1])
NOISY_PCT = 10  # warn when other processes take more of the server's core than this
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- generator side (runs in spawned processes) ---------------------------------------------


def connect(port: int, timeout: float = IO_TIMEOUT,
            hello: bool = True) -> tuple[socket.socket, msgpack.Unpacker]:
    """A blocking socket bounded by SO_RCVTIMEO/SO_SNDTIMEO (no poll per call), HELLO read
    (native; Forward without a shared key greets with nothing)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    tv = struct.pack("ll", int(timeout), int(timeout % 1 * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    unpacker = msgpack.Unpacker()
    if hello and (frame := next_frame(sock, unpacker))[0] != HELLO:
        raise ConnectionError(f"expected HELLO, got {frame!r}")
    return sock, unpacker


def next_frame(sock: socket.socket, unpacker: msgpack.Unpacker) -> list:
    while True:
        with contextlib.suppress(StopIteration):
            return next(unpacker)
        if not (data := sock.recv(65536)):
            raise ConnectionError("server closed the connection")
        unpacker.feed(data)


def answer_corr(answer: Any) -> int:
    """The corr an answer settles: a native ACK's or REPLY's, or the chunk of a Forward ack."""
    if type(answer) is dict and "ack" in answer:
        return int(answer["ack"])
    if type(answer) is list and answer[0] in (ACK, REPLY):
        return answer[1]
    raise RuntimeError(f"unexpected answer {answer!r}")


def fire(conns: list, chunk: bytes, per_chunk: int, finale: tuple[bytes, Any, int],
         deadline: float, rate: float = 0) -> tuple[int, list]:
    """Send ``chunk`` until the deadline (at most ``rate`` events/s if set), then the finale
    on each connection: wait its answer."""
    sent, (last, answer, last_events) = 0, finale
    start = time.monotonic()
    while (now := time.monotonic()) < deadline:
        if rate and (ahead := start + sent / rate - now) > 0:
            time.sleep(min(ahead, deadline - now))
            continue
        for sock, _ in conns:
            sock.sendall(chunk)
        sent += per_chunk * len(conns)
    for sock, _ in conns:
        sock.sendall(last)
    for sock, unpacker in conns:
        if (frame := next_frame(sock, unpacker)) != answer:
            raise RuntimeError(f"expected {answer!r}, got {frame!r}")
    return sent + last_events * len(conns), []


def windowed(conns: list, variants: list[list[bytes]], first: int, per_frame: int,
             deadline: float) -> tuple[int, list]:
    """Keep every frame (corr i+1) in flight on every connection; an answer resends its corr.
    Connection i (``first`` + i over all generators) sends variant i % len(variants)."""
    frames_of = [variants[(first + i) % len(variants)] for i in range(len(conns))]
    window, lat, done = len(variants[0]), [], 0
    sent_at = [[0.0] * (window + 1) for _ in conns]
    sel = None
    if len(conns) > 1:  # one connection: block in recv, no epoll round trip on the latency path
        sel = selectors.DefaultSelector()
        for i, (sock, _) in enumerate(conns):
            sel.register(sock, selectors.EVENT_READ, i)
    for i, (sock, _) in enumerate(conns):
        sent_at[i] = [time.monotonic()] * (window + 1)
        sock.sendall(b"".join(frames_of[i]))
    outstanding = window * len(conns)
    while outstanding:
        ready = [key.data for key, _ in sel.select(IO_TIMEOUT)] if sel else [0]
        if not ready:
            raise TimeoutError("no answer within IO_TIMEOUT")
        for i in ready:
            sock, unpacker = conns[i]
            if not (data := sock.recv(65536)):
                raise ConnectionError("server closed the connection")
            unpacker.feed(data)
            now, again, times, frames = time.monotonic(), [], sent_at[i], frames_of[i]
            for answer in unpacker:
                corr = answer_corr(answer)
                lat.append(now - times[corr])
                done += 1
                if now < deadline:
                    again.append(frames[corr - 1])
                    times[corr] = now
                else:
                    outstanding -= 1
            if again:
                sock.sendall(b"".join(again))
    return done * per_frame, lat


def generator(job: dict, ready: Any, go: Any, results: Any) -> None:
    """One generator process: connect, report ready, wait for go, drive, report."""
    try:
        if job["cpus"]:
            os.sched_setaffinity(0, job["cpus"])
        conns = [connect(job["port"], hello=job["hello"]) for _ in range(job["conns"])]
    except Exception as exc:
        ready.put(f"{type(exc).__name__}: {exc}")
        return
    ready.put(None)
    if not go.wait(60):
        return
    try:
        cpu0, t0 = os.times(), time.monotonic()
        deadline = t0 + job["duration"]
        if job["chunk"] is not None:
            events, lat = fire(conns, job["chunk"], job["per_chunk"], job["finale"], deadline,
                               job["rate"])
        else:
            events, lat = windowed(conns, job["variants"], job["first"], job["per_frame"],
                                   deadline)
        t1, cpu1 = time.monotonic(), os.times()
        cpu = max(0.0, cpu1.user + cpu1.system - cpu0.user - cpu0.system)
        results.put({"events": events, "t0": t0, "t1": t1, "cpu": cpu, "rts": len(lat),
                     "lat": array.array("d", lat).tobytes()})
    except Exception as exc:
        results.put({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        for sock, _ in conns:
            sock.close()


# --- payloads: built once, in the parent ----------------------------------------------------


def body(key: int | None = None) -> list:
    """One event's [type, data]; with ordered keys the data carries ``key``."""
    if key is None:
        return EVENT_BODY
    return [EVENT_BODY[0], {**EVENT_BODY[1], "key": key}]


def bodies(n: int, keys: int) -> list[list]:
    """``n`` events, their keys cycling over ``keys`` (none if 0)."""
    if not keys:
        return [EVENT_BODY] * n
    return [body(i % keys) for i in range(n)]


def frame(protocol: str, mode: str, events: list[list], corr: int = 0) -> bytes:
    """One frame of ``events`` ([type, data] each; one for "single"), acked under ``corr``
    if set.

    Forward asks for the ack with option ``{"chunk": str(corr)}``, so the ack names the corr.
    """
    if protocol == "native":
        return msgpack.packb([EVENT, corr, events[0]] if mode == "single"
                             else [BATCH, corr, events])
    tag = EVENT_BODY[0]
    request = {"single": [tag, EVENT_TIME, events[0][1]],
               "batch": [tag, [[EVENT_TIME, record] for _, record in events]],
               "packed": [tag, b"".join(msgpack.packb([EVENT_TIME, record])
                                        for _, record in events)]}[mode]
    options = {"size": len(events)} if mode == "packed" else {}  # as Fluentd, Fluent Bit send
    if corr:
        options["chunk"] = str(corr)
    return msgpack.packb([*request, options] if options else request)


def finale(protocol: str, keys: int = 0) -> tuple[bytes, Any, int]:
    """What ends a fire-and-forget run on each connection: (bytes, their answer, events in
    them). The answer proves every earlier frame of the connection was dispatched: the PONG,
    or the ack of one chunk, since evserver acks in request order."""
    if protocol == "native":
        return PING_FRAME, [PONG, 1], 0
    return frame("forward", "batch", [body(0 if keys else None)], corr=1), {"ack": "1"}, 1


def payload(protocol: str, mode: str, batch: int, window: int, keys: int = 0) -> dict:
    """Pre-encoded bytes for a mode: a ~64 KiB chunk (fire-and-forget) or W corr'd frames.

    With ordered ``keys``, batches cycle over the keys, a fire-and-forget chunk of single
    events holds one frame per key, and request/reply has one variant per key: connection i
    sends key i % K (``variants``: one list of frames per key; ``frames`` is the first)."""
    if mode in UNPACED:
        if mode == "single":
            unit = b"".join(frame(protocol, mode, [body(k)]) for k in range(keys)) if keys else (
                frame(protocol, mode, [EVENT_BODY]))
            per_unit = keys or 1
        else:
            unit, per_unit = frame(protocol, mode, bodies(batch, keys)), batch
        k = max(1, 65536 // len(unit))
        return {"chunk": unit * k, "per_chunk": k * per_unit, "finale": finale(protocol, keys)}
    if mode == "acked":
        frames = [frame(protocol, "batch", bodies(batch, keys), c) for c in range(1, window + 1)]
        return {"chunk": None, "frames": frames, "variants": [frames], "per_frame": batch}
    variants = [[msgpack.packb([REQUEST, 1, body(k if keys else None)])]
                for k in range(keys or 1)]
    return {"chunk": None, "frames": variants[0], "variants": variants, "per_frame": 1}


def payload_bytes(p: dict) -> tuple[bytes, int]:
    """A payload's bytes (the chunk, or every frame of the window once) and their events."""
    if p["chunk"]:
        return p["chunk"], p["per_chunk"]
    return b"".join(p["frames"]), p["per_frame"] * len(p["frames"])


def ceiling_job(protocol: str, mode: str, batch: int, window: int, duration: float,
                cpus: Any) -> dict:
    """Spawned: the same frames through the reference's frame loop with no network."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    sys.path.insert(0, str(SCRIPTS))
    with warnings.catch_warnings():  # eventlet's deprecation notice
        warnings.simplefilter("ignore")
        from ref_receiver import ceiling

    unit, per = payload_bytes(payload(protocol, mode, batch, window))
    k = max(1, (1 << 20) // len(unit))
    res = ceiling(unit * k, per * k, duration, protocol)
    return {"events_per_s": res["events_per_s"], "srv_us_per_event": res["cpu_us_per_event"]}


# --- server under test ----------------------------------------------------------------------


def tree(pid: int) -> list[int]:
    """pid and its descendants, so a forking server is measured whole."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        out.append(p := todo.pop())
        todo.extend(children.get(p, []))
    return out


def server_cpu(pid: int) -> float:
    total = 0
    for p in tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def core_busy(core: int) -> float:
    """Seconds ``core`` has been busy since boot, whoever ran there (/proc/stat: all but idle
    and iowait; steal, the hypervisor's, counts as busy)."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{core} "):
            ticks = [int(x) for x in line.split()[1:9]]
            return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK
    return 0.0


def server_rss(pid: int) -> int:
    """Bytes of VmRSS over the server's process tree."""
    total = 0
    for p in tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


@contextlib.contextmanager
def server(cmd: list[str], port: int, cpus: Any, hello: bool, env: dict[str, str]):
    """Start the server in its own session (``env`` added to ours), wait until ``port``
    accepts (and sends HELLO if ``hello``), stop it afterwards."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(SCRIPTS)]),
               PYTHONWARNINGS="ignore", **env)
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            if cpus:
                os.sched_setaffinity(proc.pid, cpus)
            deadline = time.monotonic() + 20
            while True:
                try:
                    connect(port, timeout=2, hello=hello)[0].close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        tail = log.read()[-2000:].decode(errors="replace")
                        raise RuntimeError(f"server {cmd} did not start:\n{tail}") from None
                    time.sleep(0.05)
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 15)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait(5)


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: the sockets are held together, so none comes back twice."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def wait_processed(admin_port: int, sent: int) -> float | None:
    """Wait until evserver's admin /stats counts exactly the ``sent`` events as processed.

    Returns when that was first seen, or None if it already was at the first look: the
    generators' own clock then holds. Handlers that wait may still run after a fire-and-forget
    run's finale is answered (its answer proves dispatch, not completion), and their time
    belongs to the run. Fails if more were processed, or if they never are (bounded)."""
    url = f"http://127.0.0.1:{admin_port}/stats"
    deadline, first = time.monotonic() + 2 * IO_TIMEOUT, True
    while True:
        with urllib.request.urlopen(url, timeout=IO_TIMEOUT) as resp:
            done = json.load(resp)["totals"]["events_out"]
        if done == sent:
            return None if first else time.monotonic()
        if done > sent or time.monotonic() > deadline:
            raise RuntimeError(f"evserver processed {done:,} events; the generators sent {sent:,}")
        first = False
        time.sleep(0.01)


def max_in_flight(prefix: str) -> int | None:
    """The most handlers a server process had in flight (bench_costs.Concurrency's files)."""
    counts = [int(f.read_text()) for f in Path(prefix).parent.glob(Path(prefix).name + ".*")]
    return max(counts) if counts else None


# --- driving one run ------------------------------------------------------------------------


def drive(port: int, pid: int, job: dict, conns: int, gens: int, duration: float,
          settle: Callable[[int], float | None] | None = None, core: int | None = None) -> dict:
    """Spread ``conns`` over ``gens`` spawned generators, run them, collect the figures.

    ``settle(events)`` waits until the server has finished the events sent and returns when
    it did (None: when the generators finished). ``core``: the core the server is pinned to;
    what other processes took of it is reported, since on a shared machine that is what
    makes figures unreliable."""
    ctx = mp.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    gens = max(1, min(gens, conns))
    shares = [conns // gens + (g < conns % gens) for g in range(gens)]
    procs = [ctx.Process(target=generator, daemon=True, args=(
        dict(job, port=port, duration=duration, conns=share, first=sum(shares[:g]),
             rate=job["rate"] / gens),
        ready, go, results)) for g, share in enumerate(shares)]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            if err := ready.get(timeout=60):
                raise RuntimeError(f"generator failed to connect: {err}")
        cpu0, w0 = server_cpu(pid), time.monotonic()
        busy0 = core_busy(core) if core is not None else 0.0
        go.set()
        outs = [results.get(timeout=duration + 90) for _ in procs]
        if errors := [o["error"] for o in outs if "error" in o]:
            raise RuntimeError(f"generator failed: {errors}")
        events = sum(o["events"] for o in outs)
        settled = settle(events) if settle else None
        cpu1, w1, rss = server_cpu(pid), time.monotonic(), server_rss(pid)
        busy1 = core_busy(core) if core is not None else 0.0
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    wall = max(settled or 0, *(o["t1"] for o in outs)) - min(o["t0"] for o in outs)
    lat = sorted(x for o in outs for x in array.array("d", o["lat"]))
    res = {"events_per_s": events / wall, "srv_us_per_event": (cpu1 - cpu0) / events * 1e6,
           "srv_cpu_pct": (cpu1 - cpu0) / (w1 - w0) * 100, "srv_rss_mib": rss / 2**20,
           "gen_cpu_pct": sum(o["cpu"] for o in outs) / wall * 100, "events": events}
    if core is not None:
        res["others_pct"] = max(0.0, busy1 - busy0 - (cpu1 - cpu0)) / (w1 - w0) * 100
    if lat:
        res["rt_per_s"] = len(lat) / wall
        for name, q in (("p50_us", 0.5), ("p99_us", 0.99), ("p999_us", 0.999)):
            res[name] = lat[min(len(lat) - 1, int(q * len(lat)))] * 1e6
    return res


def costly(args: argparse.Namespace) -> bool:
    """True when the handlers have a cost (a wait or a spin): the no-op paths are not used."""
    return bool(args.handler_wait or args.handler_cpu)


def handler_env(args: argparse.Namespace, stats: str) -> dict[str, str]:
    """The bench's handler settings for scripts/bench_costs.py, in every server's environment."""
    return {"BENCH_HANDLER_WAIT_MS": str(args.handler_wait),
            "BENCH_HANDLER_CPU_US": str(args.handler_cpu),
            "BENCH_ORDERED_KEYS": str(args.ordered_keys),
            "BENCH_LISTENER": "1" if args.listener else "", "BENCH_STATS": stats}


def run_once(target: str, mode: str, args: argparse.Namespace, pin: bool) -> dict:
    """One run on a fresh server; the generators use its Forward port with --protocol forward.

    ``target`` is "ref" (the no-op eventlet receiver), "asyncio" (scripts/ref_asyncio.py, the
    bench's handlers as tasks under a semaphore of --pool-size), "evserver" or "evserver-Nw"
    (N worker processes, left unpinned so the kernel spreads them over the cores)."""
    workers = int(target[9:-1]) if target.startswith("evserver-") else 1
    port, forward_port, admin_port = free_ports(3)
    native = args.protocol == "native"
    gen_port = port if native else forward_port
    if target in ("ref", "asyncio"):
        script = {"ref": "ref_receiver.py", "asyncio": "ref_asyncio.py"}[target]
        cmd = [sys.executable, str(SCRIPTS / script), "--port", str(gen_port),
               "--protocol", args.protocol,
               *(["--pool-size", str(args.pool_size)] if target == "asyncio" else [])]
    elif args.server_cmd:
        cmd = shlex.split(args.server_cmd.format(port=port, forward_port=forward_port))
    else:
        cmd = [sys.executable, "-m", "evserver.cli", "serve", "bench_app:app",
               "--host", "127.0.0.1", "--port", str(port), "--admin-port", str(admin_port),
               "--workers", str(workers), "--pool-size", str(args.pool_size),
               *([] if native else ["--forward-enabled", "--forward-port", str(forward_port)])]
    conns = args.connections or CONNECTIONS[mode]
    job = dict(payload(args.protocol, "rr" if mode == "idle" else mode, args.batch, args.window,
                       args.ordered_keys),
               cpus={1} if pin else None, hello=native, rate=args.rate * workers)
    checked = target.startswith("evserver") and not args.server_cmd
    settle = (lambda sent: wait_processed(admin_port, sent)) if checked else None
    core = 0 if pin and workers == 1 else None
    with (tempfile.TemporaryDirectory() as stats,
          server(cmd, gen_port, None if core is None else {core}, hello=native,
                 env=handler_env(args, str(Path(stats, "in-flight")))) as proc):
        if mode != "idle":
            res = drive(gen_port, proc.pid, job, conns, args.generators, args.duration, settle,
                        core)
        else:
            rss0, idle = server_rss(proc.pid), []
            try:
                for _ in range(args.idle):
                    try:
                        idle.append(connect(port, timeout=5)[0])
                    except OSError:
                        break  # a limit in the server; report how many it took
                time.sleep(IDLE_SETTLE)
                rss1 = server_rss(proc.pid)
                res = drive(port, proc.pid, job, conns, args.generators, args.duration, settle,
                            core)
            finally:
                for sock in idle:
                    sock.close()
            res.update(idle_conns=len(idle),
                       kib_per_idle_conn=(rss1 - rss0) / 1024 / max(1, len(idle)))
        if (most := max_in_flight(str(Path(stats, "in-flight")))) is not None:
            res["max_in_flight"] = most
        return res


def in_flight_bound(mode: str, args: argparse.Namespace) -> float:
    """Events the generators keep in flight: unbounded for fire-and-forget."""
    conns = args.connections or CONNECTIONS[mode]
    return {"acked": conns * args.window * args.batch, "rr": conns,
            "idle": conns}.get(mode, float("inf"))


def bound(mode: str, args: argparse.Namespace) -> float:
    """The events/s a perfect server reaches with these handlers: as many run at once as the
    pool, the events in flight and (ordered) the keys allow, each taking wait + spin; the
    spins share one core, and --rate caps it."""
    wait, spin = args.handler_wait / 1e3, args.handler_cpu / 1e6
    parallel = min(args.pool_size, in_flight_bound(mode, args), args.ordered_keys or math.inf)
    return min(parallel / (wait + spin), 1 / spin if spin else math.inf, args.rate or math.inf)


# --- reporting ------------------------------------------------------------------------------

COLUMNS = [("events_per_s", "events/s", "{:,.0f}"), ("rt_per_s", "rt/s", "{:,.0f}"),
           ("p50_us", "p50 µs", "{:.0f}"), ("p99_us", "p99 µs", "{:.0f}"),
           ("p999_us", "p99.9 µs", "{:.0f}"), ("srv_us_per_event", "srv µs/ev", "{:.3f}"),
           ("srv_cpu_pct", "srv CPU%", "{:.0f}"), ("srv_rss_mib", "RSS MiB", "{:.1f}"),
           ("gen_cpu_pct", "gen CPU%", "{:.0f}"), ("kib_per_idle_conn", "KiB/idle", "{:.1f}"),
           ("max_in_flight", "max conc", "{:.0f}"), ("others_pct", "others%", "{:.0f}")]

# The acceptance loads of issue 13 (handlers that run in parallel), one row each: (name, what,
# options). Options given with --suite apply to every row unless the row sets them.
SUITES = {"issue13": [
    ("io-acked-64", "1 conn, acked batches of 1,000, 10 ms green wait, pool 64",
     ["--mode", "acked", "--connections", "1", "--batch", "1000", "--handler-wait", "10",
      "--pool-size", "64"]),
    ("io-acked-512", "1 conn, acked batches of 1,000, 10 ms green wait, pool 512",
     ["--mode", "acked", "--connections", "1", "--batch", "1000", "--handler-wait", "10",
      "--pool-size", "512"]),
    ("io-rr-50", "50 conns, request/reply, 10 ms green wait, pool 64",
     ["--mode", "rr", "--connections", "50", "--handler-wait", "10", "--pool-size", "64"]),
    ("ordered-10", "1 conn, acked batches of 1,000, 10 ms, ordered_by over 10 keys",
     ["--mode", "acked", "--connections", "1", "--batch", "1000", "--handler-wait", "10",
      "--ordered-keys", "10", "--pool-size", "64"]),
    ("noop-acked", "no-op, acked batches of 100, 8 conns",
     ["--mode", "acked", "--connections", "8"]),
    ("noop-acked-listener", "no-op processor + matching listener, acked batches of 100, 8 conns",
     ["--mode", "acked", "--connections", "8", "--listener"]),
    ("noop-rr", "no-op, request/reply, 50 conns", ["--mode", "rr", "--connections", "50"]),
    ("noop-rr-listener", "no-op processor + matching listener, request/reply, 50 conns",
     ["--mode", "rr", "--connections", "50", "--listener"]),
]}


def median(runs: list[dict]) -> dict:
    keys = {k for r in runs for k in r}
    return {k: statistics.median(r[k] for r in runs if k in r) for k in sorted(keys)}


def table(report: dict) -> str:
    head = ["mode", "row"] + [c[1] for c in COLUMNS]
    rows = [head]
    for mode, entry in report["modes"].items():
        for name, figs in entry.items():
            ratio = name.endswith("ratio")
            rows.append([mode, name] + [
                ("" if k not in figs else f"{figs[k]:.2f}x" if ratio else fmt.format(figs[k]))
                for k, _, fmt in COLUMNS])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i > 1 else c.ljust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in rows]
    if any("asyncio" in entry for entry in report["modes"].values()):
        lines.append(f"(the asyncio reference ran on {report['config']['asyncio_loop']})")
    return "\n".join(lines)


def ratio(a: dict, b: dict) -> dict:
    """``a`` / ``b`` column by column (not others%: that is the machine's, not the server's)."""
    return {k: a[k] / b[k] for k, *_ in COLUMNS if b.get(k) and k in a and k != "others_pct"}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", default="all",
                    choices=[*dict.fromkeys(MODES["native"] + MODES["forward"]), "all"])
    ap.add_argument("--protocol", choices=MODES, default="native",
                    help="native frames, or Fluentd Forward to evserver's Forward listener")
    ap.add_argument("--target", choices=["evserver", "ref", "asyncio", "both", "workers"],
                    default="both", help="workers: evserver with 1 worker against --workers "
                    "N, unpinned; with --handler-wait, both and evserver also run the asyncio "
                    "reference (scripts/ref_asyncio.py)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes for --target "
                    "workers")
    ap.add_argument("--rate", type=float, default=0,
                    help="fire-and-forget modes: send at most this many events/s (per "
                    "worker with --target workers, so every worker carries the same load)")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    ap.add_argument("--batch", type=int, default=100, help="events per BATCH frame")
    ap.add_argument("--window", type=int, default=2, help="acked: batches in flight per conn")
    ap.add_argument("--connections", type=int, help=f"default per mode: {CONNECTIONS}")
    ap.add_argument("--generators", type=int, default=4, help="max generator processes")
    ap.add_argument("--idle", type=int, default=5000, help="idle mode: connections to open")
    ap.add_argument("--repeat", type=int, default=1, help="report the median of N runs")
    ap.add_argument("--no-pin", action="store_true", help="do not pin server/generators")
    ap.add_argument("--server-cmd", help="evserver command override; {port} and "
                    "{forward_port} are substituted (no processed-count check)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    costs = ap.add_argument_group("handler costs (default: no-op handlers)")
    costs.add_argument("--handler-wait", type=float, default=0, metavar="MS",
                       help="a green wait per event (I/O-bound; time.sleep under monkey "
                       "patching, asyncio.sleep in the asyncio reference)")
    costs.add_argument("--handler-cpu", type=float, default=0, metavar="US",
                       help="a CPU spin per event")
    costs.add_argument("--ordered-keys", type=int, default=0, metavar="K",
                       help="the processor is ordered_by over K keys; events cycle over them "
                       "(request/reply: connection i sends key i %% K)")
    costs.add_argument("--listener", action="store_true",
                       help="the app also has a (no-op) listener matching every event")
    costs.add_argument("--pool-size", type=int, default=64,
                       help="evserver's --pool-size and the asyncio reference's semaphore")
    costs.add_argument("--no-asyncio", action="store_true",
                       help="with --handler-wait, skip the asyncio reference")
    ap.add_argument("--suite", choices=SUITES, help="run a named set of loads, one table each "
                    "(other options apply to every row that does not set them)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    if args.suite:
        return suite(ap, argv, args)
    check(ap, args)
    report = measure(args)
    print(json.dumps(report, indent=2) if args.json else table(report))
    warn(report)
    return 0


def check(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse options that cannot run (exit 2 with one line), note what will be skipped."""
    for name in ("handler_wait", "handler_cpu", "ordered_keys"):
        if getattr(args, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.pool_size < 1:
        ap.error("--pool-size must be >= 1")
    if args.mode not in (*MODES[args.protocol], "all"):
        why = ("Forward has no request/reply" if args.protocol == "forward"
               else "PackedForward is a Forward mode")
        ap.error(f"--mode {args.mode} is not a {args.protocol} mode ({why})")
    if args.mode == "all" and args.protocol == "forward":
        print("note: rr and idle skipped: Forward has no request/reply", file=sys.stderr)
    if costly(args) and not args.rate:
        if args.mode in UNPACED:
            ap.error(f"--mode {args.mode} with handler costs needs --rate: unpaced, the socket "
                     "buffers would queue minutes of handler work")
        if args.mode == "all":
            print("note: fire-and-forget modes skipped: with handler costs they need --rate",
                  file=sys.stderr)


def suite_rows(suite: str, argv: list[str]) -> list[tuple[str, str, list[str]]]:
    """(name, what, options) of each row of ``suite``: ``argv`` without --suite, then the
    row's options, which win (argparse keeps the last)."""
    base = [a for i, a in enumerate(argv) if a != "--suite" and not a.startswith("--suite=")
            and (i == 0 or argv[i - 1] != "--suite")]
    return [(name, what, [*base, *row]) for name, what, row in SUITES[suite]]


def suite(ap: argparse.ArgumentParser, argv: list[str], args: argparse.Namespace) -> int:
    """Each row of the suite as its own measurement, one table each."""
    reports = {}
    for name, what, row in suite_rows(args.suite, argv):
        row_args = ap.parse_args(row)
        if row_args.mode not in MODES[row_args.protocol]:
            print(f"note: {name} skipped: Forward has no request/reply", file=sys.stderr)
            continue
        check(ap, row_args)
        print(f"== {name}: {what}", file=sys.stderr)
        reports[name] = report = measure(row_args)
        if not args.json:
            print(f"\n## {name}: {what}\n$ scripts/bench.py {shlex.join(row)}\n{table(report)}",
                  flush=True)
        warn(report)
    if args.json:
        print(json.dumps(reports, indent=2))
    return 0


def measure(args: argparse.Namespace) -> dict:
    """Run every target on every mode of ``args``, interleaved, and report medians and ratios."""
    protocol_modes = MODES[args.protocol]
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the server
    pin = not args.no_pin and {0, 1} <= os.sched_getaffinity(0)
    modes = protocol_modes if args.mode == "all" else (args.mode,)
    if costly(args) and not args.rate:
        modes = tuple(m for m in modes if m not in UNPACED)
    prefix = "" if args.protocol == "native" else "fwd-"  # in mode names: fwd-single, ...
    targets = {"both": ["ref", "evserver"], "workers": ["evserver", f"evserver-{args.workers}w"]
               }.get(args.target, [args.target])
    if args.handler_wait and args.target in ("both", "evserver") and not args.no_asyncio:
        targets.insert(targets.index("evserver"), "asyncio")
    if args.target == "workers":
        pin = False  # N workers and the generators share the cores: let the kernel place them
    ctx = mp.get_context("spawn")
    runs: dict[tuple[str, str], list[dict]] = {}
    for rep in range(args.repeat):
        for mode in modes:
            if mode != "idle" and not costly(args):  # the ceiling is a no-op loop
                with ctx.Pool(1) as pool:
                    runs.setdefault((mode, "ceiling"), []).append(pool.apply(ceiling_job, (
                        args.protocol, mode, args.batch, args.window, min(args.duration, 2.0),
                        {0} if pin else None)))
            for target in targets:  # interleaved, so drift hits both sides alike
                print(f"[{rep + 1}/{args.repeat}] {prefix}{mode} {target} ...",
                      file=sys.stderr)
                runs.setdefault((mode, target), []).append(run_once(target, mode, args, pin))
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio's own loop"
    report: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "json"}
                              | {"pinned": pin, "asyncio_loop": loop}, "modes": {}}
    for mode in modes:
        entry = {name: median(runs[mode, name]) for name in ("ceiling", *targets)
                 if (mode, name) in runs}
        if "ref" in entry and "ceiling" in entry:
            entry["ref/ceiling ratio"] = {
                "events_per_s": entry["ref"]["events_per_s"] / entry["ceiling"]["events_per_s"]}
        if costly(args):
            entry["bound"] = {"events_per_s": bound(mode, args)}
        for a, b in (("evserver", "ref"), ("evserver", "asyncio"), ("evserver", "bound"),
                     ("asyncio", "bound")):
            if a in entry and b in entry:
                entry[f"{a}/{b} ratio"] = ratio(entry[a], entry[b])
        if args.target == "workers":
            one, many = (entry[t] for t in targets)
            entry[f"{targets[1]}/evserver ratio"] = ratio(many, one)
        report["modes"][prefix + mode] = entry
    return report


def warn(report: dict) -> None:
    for mode, entry in report["modes"].items():
        for name, figs in entry.items():
            if not name.endswith("ratio") and figs.get("others_pct", 0) > NOISY_PCT:
                print(f"warning: {mode}/{name}: other processes took {figs['others_pct']:.0f}% "
                      "of the server's core; its figures are unreliable, ratios of one run less "
                      "so", file=sys.stderr)
            if figs.get("gen_cpu_pct", 0) > 60:
                print(f"warning: {mode}/{name}: generators used {figs['gen_cpu_pct']:.0f}% of a "
                      "core; they may be the limit (try --generators, --no-pin)", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
