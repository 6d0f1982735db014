"""A test app for cluster mode: which node ran what, in which order, surviving SIGKILL.

Set ``CLUSTER_RECORD=/path`` (one file shared by every node): each processed event appends
``id<TAB>key<TAB>n<TAB>pid`` with one ``os.write`` (O_APPEND: lines of several processes
never interleave) before its processor returns, so a line means "this event ran".
"""

from __future__ import annotations

import os
from typing import Any

from evserver import App, Event

app = App("cluster")
_record = os.environ.get("CLUSTER_RECORD")
_fd = os.open(_record, os.O_WRONLY | os.O_APPEND | os.O_CREAT) if _record else None


def _write(event: Event) -> None:
    if _fd is not None:
        data = event.data if isinstance(event.data, dict) else {}
        os.write(_fd, f"{event.id}\t{data.get('key', '')}\t{data.get('n', '')}\t"
                      f"{os.getpid()}\n".encode())


@app.processor("pid")
def pid(event: Event) -> int:
    return os.getpid()


@app.processor("count")
def count(event: Event) -> None:
    _write(event)


@app.processor("seq", ordered_by="key")
def seq(event: Event) -> int:
    _write(event)
    return os.getpid()


@app.processor("flaky")
def flaky(event: Event) -> None:
    """Fails while the file named by ``CLUSTER_FAIL_WHILE`` exists, then records."""
    flag = os.environ.get("CLUSTER_FAIL_WHILE")
    if flag and os.path.exists(flag):
        raise RuntimeError("failing on purpose")
    _write(event)


@app.processor("job.*", ordered_by="key")
def job(event: Event) -> Any:
    """``job.die`` kills its process (a poison event); ``job.ok`` is recorded."""
    if event.type == "job.die":
        os._exit(1)
    _write(event)
    return os.getpid()
