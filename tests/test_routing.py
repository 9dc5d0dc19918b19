"""Routing: first match per recipient, domains, globs, sender conditions, splits."""

from __future__ import annotations

from bridge.config import Route, RouteMatch
from bridge.routing import matches, resolve, split_by_route

ROUTES = (
    Route(match=RouteMatch(recipients=("*@eu.example.org",)), provider="eu"),
    Route(match=RouteMatch(recipients=("example.org",)), provider="org"),
    Route(match=RouteMatch(recipients=("*",), sender=("alerts@example.com", "<>")), provider="ops"),
    Route(match=RouteMatch(recipients=("@example.net",)), provider="net"),
)


def test_first_matching_route_wins() -> None:
    """A recipient matching two routes takes the first."""
    assert 0 == resolve("a@eu.example.org", "x@example.com", ROUTES)


def test_bare_domain_and_at_domain_patterns() -> None:
    """`example.org` and `@example.net` mean every address at that domain, case-insensitively."""
    assert 1 == resolve("Bob@Example.ORG", "x@example.com", ROUTES)
    assert 3 == resolve("c@example.net", "x@example.com", ROUTES)
    assert not matches("a@sub.example.org", ["example.org"])


def test_sender_condition_limits_a_route() -> None:
    """A route with match.sender applies only to those senders; <> names the null sender."""
    assert 2 == resolve("z@elsewhere.jp", "alerts@example.com", ROUTES)
    assert 2 == resolve("z@elsewhere.jp", "", ROUTES)
    assert resolve("z@elsewhere.jp", "someone@example.com", ROUTES) is None


def test_split_keeps_order_and_drops_unroutable() -> None:
    """Recipients are grouped per route in their RCPT order."""
    groups = split_by_route(
        ["a@example.org", "b@eu.example.org", "c@example.org", "d@nowhere.jp"], "x@y.com", ROUTES
    )

    assert {1: ["a@example.org", "c@example.org"], 0: ["b@eu.example.org"]} == groups
