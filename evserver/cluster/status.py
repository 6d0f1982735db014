"""What ``evserver cluster status`` shows: the live nodes, and per partition its owner, its
lag (entries appended but not yet delivered to an owner) and its pending entries (delivered,
not yet acknowledged). Read straight from Redis, so it works with every node down."""

from __future__ import annotations

from typing import Any

from ..console import table
from .keys import GROUP, Keys


def gather(redis: Any, name: str, partitions: int) -> dict[str, Any]:
    """The cluster's state as plain data (``--json`` prints it as is)."""
    keys = Keys(name)
    stored = redis.hget(keys.meta, "partitions")
    count = int(stored) if stored is not None else partitions
    pipe = redis.pipeline(transaction=False)
    pipe.time()
    pipe.zrange(keys.nodes, 0, -1, withscores=True)
    pipe.xlen(keys.dead)
    for p in range(count):
        pipe.get(keys.lease(p))
        pipe.pttl(keys.lease(p))
        pipe.xlen(keys.stream(p))
        pipe.xinfo_groups(keys.stream(p))
    answers = pipe.execute(raise_on_error=False)
    seconds, micros = answers[0]
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    nodes = [{"id": _text(node), "last_seen_ms": now_ms - int(score)}
             for node, score in answers[1]]
    rows = []
    for p in range(count):
        owner, ttl, length, groups = answers[3 + 4 * p: 7 + 4 * p]
        found = groups if isinstance(groups, list) else []  # an error: no stream yet
        group: dict[str, Any] = next((g for g in found if _text(g["name"]) == GROUP), {})
        rows.append({"partition": p, "owner": _text(owner) if owner else None,
                     "lease_ms": ttl if owner else None,
                     "length": length if isinstance(length, int) else 0,
                     "lag": group.get("lag"), "pending": group.get("pending", 0)})
    return {"name": name, "partitions": count, "stored_partitions": stored is not None,
            "nodes": nodes, "partition_owners": rows,
            "dead_letters": answers[2] if isinstance(answers[2], int) else 0}


def format_status(doc: dict[str, Any]) -> str:
    lines = [f"cluster {doc['name']!r}: {len(doc['nodes'])} node(s), {doc['partitions']} "
             f"partitions, {doc['dead_letters']} dead letter(s)", ""]
    owned: dict[str, int] = {}
    for row in doc["partition_owners"]:
        if row["owner"]:
            owned[row["owner"]] = owned.get(row["owner"], 0) + 1
    lines.append(table(["NODE", "LAST SEEN", "PARTITIONS"],
                       [[n["id"], f"{n['last_seen_ms']}ms ago", owned.get(n["id"], 0)]
                        for n in doc["nodes"]]))
    lines.append("")
    lines.append(table(["PARTITION", "OWNER", "LEASE", "LAG", "PENDING", "LENGTH"], [
        [r["partition"], r["owner"] or "-", f"{r['lease_ms']}ms" if r["lease_ms"] else "-",
         "?" if r["lag"] is None else r["lag"], r["pending"], r["length"]]
        for r in doc["partition_owners"]]))
    return "\n".join(lines)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
