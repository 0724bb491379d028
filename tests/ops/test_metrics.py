"""`GET /metrics` (issue 11, item 3): Prometheus text from this host or with the metrics token,
labels from closed sets only (no PHI, no ids), and the sums of every worker of a server."""

from __future__ import annotations

import re
import secrets
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from phivault.config import ConfigError
from phivault.runtime import Runtime
from tests.cli.test_shutdown import Served, serve  # noqa: F401 - the fixture
from tests.conftest import build_settings, client_for
from tests.factories import PASSWORD, signed_in

TOKEN = secrets.token_hex(16)  # a test's own token, made now
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


async def scrape(rt: Runtime) -> str:
    async with client_for(rt, ip="127.0.0.1") as local:
        answer = await local.get("/metrics")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return answer.text


async def test_only_this_host_or_the_token_reads_the_metrics(
        fresh_runtime: Callable[..., Awaitable[Runtime]]) -> None:
    rt = await fresh_runtime(metrics_token=TOKEN)
    user = await signed_in(rt, "admin")
    async with client_for(rt) as remote:  # 203.0.113.7
        for headers in ({}, {"Authorization": "Bearer wrong-token"}, user.headers,
                        {"Authorization": f"Basic {TOKEN}"}):
            refused = await remote.get("/metrics", headers=headers)
            assert refused.status_code == 403 and refused.json()["error"] == "forbidden"
        allowed = await remote.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert allowed.status_code == 200 and "phivault_http_requests_total" in allowed.text
    assert "phivault_audit_queue_depth" in await scrape(rt)


async def test_labels_hold_route_templates_never_ids_or_phi(runtime: Runtime) -> None:
    patient = await signed_in(runtime, "patient", full_name="Metrics Person")
    record = uuid.uuid4()
    async with client_for(runtime) as client:
        await client.get(f"/api/v1/records/{record}", headers=patient.headers)
        await client.get(f"/api/v1/no-such/{patient.email}")
        await client.post("/api/v1/auth/login", json={"email": patient.email,
                                                      "password": "wrong " + PASSWORD})
    text = await scrape(runtime)
    assert not UUID.search(text) and patient.email not in text and "Metrics Person" not in text
    routes = {dict(labels)["route"] for labels in
              samples(text, "phivault_http_requests_total")}
    assert "/api/v1/records/{record_id}" in routes and "unmatched" in routes
    assert all(route == "unmatched" or route.startswith("/") for route in routes)
    failures = samples(text, "phivault_auth_failures_total")
    assert failures[(("reason", "bad_password"),)] >= 1
    assert samples(text, "phivault_db_connections")  # the pool's gauges


async def test_a_lockout_counts(fresh_runtime: Callable[..., Awaitable[Runtime]]) -> None:
    rt = await fresh_runtime()
    before = samples(await scrape(rt), "phivault_lockouts_total").get((), 0.0)
    async with client_for(rt) as client:
        for _ in range(7):
            await client.post("/api/v1/auth/login", json={
                "email": "nobody@clinic.example", "password": "wrong " + PASSWORD})
    assert samples(await scrape(rt), "phivault_lockouts_total")[()] > before


async def test_the_metrics_add_up_every_worker(
        serve: Callable[..., Awaitable[Any]]) -> None:  # noqa: F811 - the imported fixture
    served: Served = await serve("--workers", "2")
    for _ in range(30):  # new connections: both workers answer some
        with served.client() as client:
            assert client.get(served.url("/healthz")).status_code == 200
    totals = set()
    for _ in range(6):
        with served.client() as client:
            text = client.get(served.url("/metrics")).text
        counts = samples(text, "phivault_http_requests_total")
        totals.add(counts[(("method", "GET"), ("route", "/healthz"), ("status", "200"))])
    # Whichever worker answers the scrape, it adds up both workers' counts: every /healthz
    # the server logged (ours, and the fixture's while it waited for the server to answer).
    assert totals == {served.log.read_text().count('"path": "/healthz"')}


# An outside review of the first version.

async def test_a_client_cannot_make_its_own_label_values(runtime: Runtime) -> None:
    """h11 takes any method word: each would have been a new series, with the client's text."""
    async with client_for(runtime) as client:
        for word in ("JANE-DOE-DOB-1984", "BREW", "PROPFIND"):
            await client.request(word, "/healthz")
    methods = {dict(labels)["method"] for labels in
               samples(await scrape(runtime), "phivault_http_requests_total")}
    assert "JANE-DOE-DOB-1984" not in methods and "other" in methods
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}


async def test_a_blank_token_opens_nothing_and_a_short_one_is_refused(
        fresh_runtime: Callable[..., Awaitable[Runtime]], keys_env: dict[str, str]) -> None:
    rt = await fresh_runtime(metrics_token="")
    async with client_for(rt) as remote:
        assert (await remote.get("/metrics", headers={"Authorization": "Bearer"})
                ).status_code == 403
    with pytest.raises(ConfigError, match="at least 32 characters"):
        build_settings(keys_env, "sqlite+aiosqlite:///unused.db", metrics_token="too short")


async def test_a_forwarded_request_is_never_this_host(runtime: Runtime) -> None:
    """A proxy on loopback forwards a header its rules could not use: the proxy's own address
    is left as the client's, which must not count as this host."""
    async with client_for(runtime, ip="127.0.0.1") as via_proxy:
        for header in ({"X-Forwarded-For": "not an address"}, {"Forwarded": "for=unknown"}):
            assert (await via_proxy.get("/metrics", headers=header)).status_code == 403
