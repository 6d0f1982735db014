"""Registration and routing: patterns, specificity, duplicates, caching."""

from __future__ import annotations

import pytest

from evserver import App, Event
from evserver.app import matches
from evserver.errors import RegistrationError


@pytest.mark.parametrize(("pattern", "type", "expected"), [
    ("order.created", "order.created", True),
    ("order.created", "order.created.x", False),
    ("order.*", "order.created", True),
    ("order.*", "order", False),
    ("order.*", "order.a.b", False),
    ("*.created", "order.created", True),
    ("order.**", "order.a", True),
    ("order.**", "order.a.b.c", True),
    ("order.**", "order", False),
    ("**", "anything.at.all", True),
    ("a.*.c", "a.b.c", True),
    ("a.*.c", "a.b.d", False),
])
def test_pattern_matching(pattern, type, expected):
    assert matches(pattern, type) is expected


@pytest.mark.parametrize("bad", ["", "a..b", "a.**.b", "a*", "a.b*", ".a", 3])
def test_bad_patterns_are_refused_at_registration(bad):
    with pytest.raises(RegistrationError):
        App().processor(bad)


def test_decorators_return_the_function_unchanged():
    app = App()

    def f(event):
        return event.data * 2

    assert app.processor("x")(f) is f
    assert app.listener("x")(f) is f
    assert f(Event("x", 21)) == 42


def test_second_processor_for_the_same_pattern_is_an_error():
    app = App()
    app.processor("order.created")(lambda e: 1)
    with pytest.raises(RegistrationError, match="already registered"):
        app.processor("order.created")(lambda e: 2)


def test_most_specific_processor_wins():
    app = App()
    names = {}
    for pattern in ["order.**", "*.created", "order.*", "order.created", "*.*", "**"]:
        names[pattern] = (lambda p: (lambda e: p))(pattern)
        app.processor(pattern)(names[pattern])
    pick = {t: app.route(t).processor.pattern for t in
            ["order.created", "order.paid", "user.created", "order.a.b", "user.x", "x"]}
    assert pick == {
        "order.created": "order.created",  # exact beats every pattern
        "order.paid": "order.*",           # literal first segment beats '*'
        "user.created": "*.created",
        "order.a.b": "order.**",
        "user.x": "*.*",                   # '*' beats '**'
        "x": "**",
    }


def test_listeners_all_see_matches_in_registration_order():
    app = App()
    a = app.listener("order.**")(lambda e: None)
    b = app.listener("order.created")(lambda e: None)
    c = app.listener("user.*")(lambda e: None)
    route = app.route("order.created")
    assert [h.func for h in route.listeners] == [a, b]
    assert route.processor is None
    assert app.route("user.x").listeners[0].func is c
    assert app.route("nobody").empty


def test_routes_are_cached_and_refreshed_on_registration():
    app = App()
    app.listener("a.*")(lambda e: None)
    first = app.route("a.b")
    assert app.route("a.b") is first
    app.processor("a.b")(lambda e: None)
    assert app.route("a.b") is not first
    assert app.route("a.b").processor is not None


def test_route_cache_is_bounded():
    app = App()
    app.listener("**")(lambda e: None)
    for i in range(10_000):
        app.route(f"t{i}")
    assert len(app._routes) <= 4096
