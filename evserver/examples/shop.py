"""A small shop: processors answer requests, listeners observe, patterns route.

Serve it with ``evserver serve evserver.examples.shop:app`` and try::

    evserver request order.created '{"id": 42, "items": ["tea"]}'
    evserver send order.shipped '{"id": 42}' --ack
    evserver request stats.orders
"""

from __future__ import annotations

import logging
from collections import Counter

from evserver import App, Event

app = App("shop")
log = logging.getLogger("shop")

orders: dict[int, dict] = {}
seen: Counter[str] = Counter()


@app.processor("order.created")
def create_order(event: Event) -> dict:
    """Exact type: this processor answers ``order.created`` requests."""
    order = {"id": event.data["id"], "items": event.data.get("items", []), "status": "new"}
    orders[order["id"]] = order
    return order


@app.processor("order.*")
def update_order(event: Event) -> dict:
    """Pattern: any other ``order.<something>`` sets the status to <something>."""
    status = event.type.split(".", 1)[1]
    order = orders.setdefault(event.data["id"], {"id": event.data["id"], "items": []})
    order["status"] = status
    return order


@app.processor("stats.orders")
def order_stats(event: Event) -> dict:
    return {"orders": len(orders), "events_seen": dict(seen)}


@app.listener("order.**")
def audit(event: Event) -> None:
    """Every order event, at any depth, is counted; listeners never change replies."""
    seen[event.type] += 1


@app.listener("**")
def trace(event: Event) -> None:
    log.debug("event %s %s", event.type, event.id)
