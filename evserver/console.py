"""The admin's client side: HTTP calls, readable tables and the ``top`` screen.

The CLI's admin commands (``evserver stats``, ``workers``, ``handlers``, ``reload``,
``stop``, ``scale``, ``top``, ``tail``) are thin click wrappers over this module, which only
speaks the admin listener's HTTP API (``evserver.admin``) and never imports the server.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any, TextIO

from .errors import AdminFailure


class AdminClient:
    """Blocking HTTP calls to one admin listener; every failure is an ``AdminFailure``."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 10.0,
                 ssl_context: Any = None) -> None:
        if "://" not in url:
            url = f"http://{url}"
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.ssl_context = ssl_context  # for https:// URLs; None = the system's trust store

    def _open(self, method: str, path: str, params: dict[str, Any] | None = None) -> Any:
        query = urllib.parse.urlencode({k: v for k, v in (params or {}).items()
                                        if v is not None})
        req = urllib.request.Request(f"{self.url}{path}{'?' + query if query else ''}",
                                     method=method, data=b"" if method == "POST" else None)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            return urllib.request.urlopen(req, timeout=self.timeout, context=self.ssl_context)
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read()).get("error") or exc.reason
            except (ValueError, AttributeError, OSError):
                detail = exc.reason
            if exc.code == 401:
                detail = f"{detail} (pass --token or set EVSERVER_ADMIN_TOKEN)"
            raise AdminFailure(f"the admin server refused {method} {path} "
                               f"({exc.code}): {detail}") from None
        except urllib.error.URLError as exc:
            reason = getattr(exc.reason, "strerror", None) or exc.reason
            raise AdminFailure(f"cannot reach the evserver admin at {self.url}: "
                               f"{reason}") from None
        except (TimeoutError, OSError) as exc:
            raise AdminFailure(f"cannot reach the evserver admin at {self.url}: "
                               f"{exc}") from None
        except ValueError as exc:  # http.client.InvalidURL and friends
            raise AdminFailure(f"bad admin URL {self.url!r}: {exc}") from None

    def call(self, method: str, path: str, **params: Any) -> Any:
        """One request; the decoded JSON answer."""
        with self._open(method, path, params) as resp:
            body = resp.read()
        try:
            return json.loads(body)
        except ValueError:
            raise AdminFailure(f"{method} {path}: the answer is not JSON") from None

    def text(self, path: str) -> str:
        with self._open("GET", path) as resp:
            return str(resp.read().decode())

    def stream(self, path: str, **params: Any) -> Iterator[dict[str, Any]]:
        """The JSON lines of a streaming endpoint (blank keep-alive lines skipped)."""
        with self._open("GET", path, params) as resp:
            while True:
                try:
                    line = resp.readline()
                except (TimeoutError, OSError) as exc:
                    raise AdminFailure(f"lost the stream from {self.url}: {exc}") from None
                if not line:
                    return
                if line.strip():
                    yield json.loads(line)


# --------------------------------------------------------------------------- formatting


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """Plain aligned columns: numbers right, text left."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], int | float) or row[i] in (None, "-") for row in rows)
               and bool(rows) for i in range(len(headers))]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric, strict=True)).rstrip()

    return "\n".join([line(headers), *(line(r) for r in cells)])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def ms(seconds: float | None) -> str:
    """A latency in the unit that reads best: 7us, 2.5ms, 1.20s."""
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f}us"
    return f"{seconds * 1e3:.1f}ms" if seconds < 1 else f"{seconds:.2f}s"


#: Shown under latency columns: a "-" there is not an error, just no sample yet.
LATENCY_NOTE = "latency is sampled (about 1 event in 128 per worker): '-' = none sampled yet"
# The Forward listener's counters, in the order docs/forward.md lists them.
_FORWARD = ("connections", "requests", "events", "skipped", "errors", "auth_failures",
            "unacked", "heartbeats")


def _forward_line(counters: dict[str, int]) -> str | None:
    """One line of the ``forward_*`` counters, or None when no Forward listener reported."""
    if not any(key.startswith("forward_") for key in counters):
        return None
    return "forward: " + ", ".join(f"{key.replace('_', ' ')} {counters.get('forward_' + key, 0)}"
                                   for key in _FORWARD)


def format_stats(doc: dict[str, Any]) -> str:
    t = doc["totals"]
    head = (f"{doc['mode']} {doc['pid']}, up {duration(doc['uptime'])}, {t['workers']} "
            f"worker(s)" + (f", {doc['retired_workers']} exited" if doc["retired_workers"]
                            else ""))
    workers = [[w["pid"], duration(w["uptime"]), w["connections"], w["events_in"],
                w["events_out"], w["errors"], w["unrouted"], f"{w['busy']}/{w['pool_size']}",
                w["queued"]] for w in doc["workers"]]
    workers.append(["total", "", t["connections"], t["events_in"], t["events_out"],
                    t["errors"], t["unrouted"], t["busy"], t["queued"]])
    pids = [str(w["pid"]) for w in doc["workers"]]
    types = [[name, ty["events"], ty["errors"], ms(ty["latency"]["p50"]),
              ms(ty["latency"]["p90"]), ms(ty["latency"]["p99"]),
              *(ty["by_worker"].get(pid, 0) for pid in pids)]
             for name, ty in doc["types"].items()]
    return "\n\n".join([
        head,
        table(["WORKER", "UPTIME", "CONNS", "IN", "OUT", "ERRORS", "UNROUTED", "BUSY",
               "QUEUED"], workers),
        table(["TYPE", "EVENTS", "ERRORS", "P50", "P90", "P99", *(f"@{p}" for p in pids)],
              types) + "\n" + LATENCY_NOTE if types else "no events yet",
        *filter(None, [_forward_line(t.get("counters", {}))]),
        f"dead letters: {doc['dead_letters']}",
    ])


def worker_rates(before: dict[str, Any] | None, after: dict[str, Any],
                 seconds: float) -> dict[int, float]:
    """events/s per worker pid between two /stats documents (lifetime average without one)."""
    prev = {w["pid"]: w["events_out"] for w in (before or {}).get("workers", [])}
    out = {}
    for w in after["workers"]:
        if before is not None and w["pid"] in prev and seconds > 0:
            out[w["pid"]] = (w["events_out"] - prev[w["pid"]]) / seconds
        else:
            out[w["pid"]] = w["events_out"] / w["uptime"] if w["uptime"] > 0 else 0.0
    return out


def format_workers(doc: dict[str, Any], rates: dict[int, float]) -> str:
    rows = [[w["pid"], duration(w["uptime"]), w["connections"], w["events_out"],
             round(rates.get(w["pid"], 0.0), 1)] for w in doc["workers"]]
    return table(["PID", "UPTIME", "CONNS", "EVENTS", "EVENTS/S"], rows)


def format_handlers(handlers: list[dict[str, Any]]) -> str:
    rows = [[h["kind"], h["pattern"], h["name"],
             " ".join(f"{k}={'-' if v is None else v}" for k, v in h["options"].items())]
            for h in handlers]
    return table(["KIND", "PATTERN", "HANDLER", "OPTIONS"], rows)


def _fit(items: list[str], width: int, sep: str = "  ") -> list[str]:
    """Join ``items`` with ``sep`` into as few lines of at most ``width`` as they allow."""
    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + len(sep) + len(item) <= width:
            lines[-1] += sep + item
        else:
            lines.append(item)
    return lines


def format_top(url: str, before: dict[str, Any] | None, after: dict[str, Any],
               seconds: float, width: int = 80) -> str:
    """One screen of ``evserver top``: rates between two /stats documents, latencies, errors.

    No line is wider than ``width`` (the terminal's): the header and summary wrap between
    their items, table rows are cut, so nothing wraps on its own and scrolls the screen.
    """

    def rate(new: int, old: int | None) -> float | None:
        return None if old is None or seconds <= 0 else (new - old) / seconds

    t, bt = after["totals"], (before or {}).get("totals", {})
    btypes = (before or {}).get("types", {})
    head = _fit([f"evserver top - {url}", f"{after['mode']} {after['pid']} up "
                 f"{duration(after['uptime'])}", f"{t['workers']} worker(s), "
                 f"{t['connections']} connection(s)", "q quits"], width, " - ")
    summary = _fit([f"events/s {_cell(rate(t['events_out'], bt.get('events_out')))}",
                    f"errors/s {_cell(rate(t['errors'], bt.get('errors')))}",
                    f"total {t['events_out']}", f"errors {t['errors']}",
                    f"unrouted {t['unrouted']}", f"dead letters {t['dead_letters']}",
                    f"busy {t['busy']}", f"queued {t['queued']}"], width)
    types = [[name, rate(ty["events"], btypes.get(name, {}).get("events", 0)
                         if before else None),
              rate(ty["errors"], btypes.get(name, {}).get("errors", 0) if before else None),
              ty["events"], ty["errors"], ms(ty["latency"]["p50"]), ms(ty["latency"]["p99"])]
             for name, ty in after["types"].items()]
    rates = worker_rates(before, after, seconds)
    workers = [[w["pid"], duration(w["uptime"]), w["connections"], round(rates[w["pid"]], 1),
                f"{w['busy']}/{w['pool_size']}", w["queued"], w["errors"]]
               for w in after["workers"]]
    forward = _forward_line(t.get("counters", {}))
    screen = "\n\n".join([
        "\n".join(head), "\n".join(summary),
        table(["TYPE", "EVENTS/S", "ERRORS/S", "EVENTS", "ERRORS", "P50", "P99"], types)
        + "\n" + "\n".join(_fit(LATENCY_NOTE.split(" "), width, " ")) if types
        else "no events yet",
        table(["WORKER", "UPTIME", "CONNS", "EVENTS/S", "BUSY", "QUEUED", "ERRORS"], workers),
        *(["\n".join(_fit(forward.split(", "), width, ", "))] if forward else []),
    ])
    return "\n".join(line[:width] for line in screen.split("\n")) + "\n"


def format_waiting(url: str, reason: str, width: int = 80) -> str:
    """The screen ``top`` shows while the server is unreachable (restarting, stopped)."""
    lines = [*_fit([f"evserver top - {url}", "q quits"], width, " - "), "",
             *_fit(f"waiting for the server: {reason}".split(" "), width, " "), "",
             "retrying every interval; the numbers start afresh when it is back"[:width]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- top


def run_top(client: AdminClient, interval: float, stdin: TextIO = sys.stdin,
            stdout: TextIO = sys.stdout, iterations: int | None = None) -> None:
    """Redraw until q, Ctrl-C or ``iterations`` screens; the terminal is always restored.

    On a terminal, stdin is put in cbreak mode (keys arrive unbuffered and unechoed, while
    Ctrl-C still raises KeyboardInterrupt) and the screen switches to the alternate buffer.
    """
    fd = stdin.fileno()
    saved = None
    if os.isatty(fd):
        import termios
        import tty

        saved = termios.tcgetattr(fd)
        tty.setcbreak(fd)
    watch_keys = True
    stdout.write("\x1b[?1049h\x1b[?25l")  # alternate screen, hide the cursor
    try:
        before: dict[str, Any] | None = None
        taken = 0.0
        shown = 0
        while iterations is None or shown < iterations:
            width = shutil.get_terminal_size().columns
            try:
                after = client.call("GET", "/stats")
            except AdminFailure as exc:  # restarting: keep watching, as top(1) would
                screen, before = format_waiting(client.url, str(exc), width), None
            else:
                now = time.monotonic()
                if before is not None and before["pid"] != after["pid"]:
                    before = None  # another server: its counters restarted from zero
                screen = format_top(client.url, before, after, now - taken, width)
                before, taken = after, now
            stdout.write("\x1b[H\x1b[2J" + screen)
            stdout.flush()
            shown += 1
            if not watch_keys:
                time.sleep(interval)
                continue
            ready, _, _ = select.select([fd], [], [], interval)
            if ready:
                keys = os.read(fd, 64)
                if not keys:
                    watch_keys = False  # stdin closed: only Ctrl-C or iterations end it
                elif b"q" in keys.lower():
                    return
    except KeyboardInterrupt:
        return
    finally:
        stdout.write("\x1b[?25h\x1b[?1049l")
        stdout.flush()
        if saved is not None:
            import termios

            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
