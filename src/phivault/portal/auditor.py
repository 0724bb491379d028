"""The auditor's pages of the portal (SPEC §15): the audit trail searched, the chain verified,
and its head signed as a checkpoint, through the very services of `GET /api/v1/audit`,
`GET /api/v1/audit/verify` and `phivault audit checkpoint`, so that what the pages show and what
they audit is theirs.

An auditor sees no PHI (SPEC §7): the search page shows a subset of the API's answer, and the
one piece of PHI in it, a break-glass reason, is opened and audited by the search service
exactly as for the API (`VIEW_BREAK_GLASS_REASON`, in the patient's access log).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from fastapi import Request
from fastapi.responses import HTMLResponse
from pydantic import ValidationError

from phivault import errors
from phivault.audit import checkpoint, search, service
from phivault.audit.actions import Action, Outcome
from phivault.audit.api import verification_gate
from phivault.audit.chain import VerifyResult
from phivault.audit.schemas import AuditEventView, AuditSearch, SortOrder
from phivault.portal.sessions import Visit
from phivault.portal.web import PREFIX, Auditor, render, router
from phivault.web.dependencies import RuntimeDep, SessionDep
from phivault.web.pagination import MAX_OFFSET

SEARCH_PATH = f"{PREFIX}/audit"
PAGE_SIZE = 50
# The deepest page whose offset the API would still take.
MAX_PAGE = MAX_OFFSET // PAGE_SIZE + 1
FILTERS = tuple(AuditSearch.model_fields)
PAGE = "page"
BUSY = "A verification is already running; try again when it ends."

ACTIONS = sorted(str(action) for action in Action)
OUTCOMES = [str(outcome) for outcome in Outcome]
ORDERS = [(str(SortOrder.DESC), "Newest first"), (str(SortOrder.ASC), "Oldest first")]

# What the page says of a field it could not take: in the auditor's words, never the value.
_ID_EXAMPLE = "6a1d0f3e-8d5c-4a7e-9a53-0f1c2b3d4e5f"
_TIME_EXAMPLE = "2031-05-04T10:00:00Z or 2031-05-04T12:00:00+02:00"
LABELS = {"actor_id": "Actor id", "patient_id": "Patient id", "action": "Action",
          "outcome": "Outcome", "resource_type": "Resource type", "resource_id": "Resource id",
          "since": "Since", "until": "Until", "order": "Order"}
PROBLEMS = {
    "actor_id": f"must be a user id, like {_ID_EXAMPLE}",
    "patient_id": f"must be a patient's user id, like {_ID_EXAMPLE}",
    "resource_id": f"must be an id, like {_ID_EXAMPLE}",
    "action": "choose one of the list",
    "outcome": "choose success, denied or error",
    "resource_type": "lowercase letters and underscores, at most 48, like medical_record",
    "since": f"a time with its offset, like {_TIME_EXAMPLE}",
    "until": f"a time with its offset, like {_TIME_EXAMPLE}",
    "order": "newest first or oldest first",
}
COHERENCE = {"since must be before until": "Since must be before Until.",
             "resource_id needs resource_type": "A resource id needs its resource type."}


# Reading the search from the query string.

@dataclass(frozen=True, slots=True)
class SearchQuery:
    """A search as the page reads it: the filters (None when the query could not be taken,
    then `problems` says why), the page number, and the values given that were valid, to refill
    the form and to build the page links."""

    search: AuditSearch | None
    page: int
    given: dict[str, str]
    problems: tuple[str, ...]


def read_search(request: Request) -> SearchQuery:
    """The filters of the query string, through `AuditSearch` and its rules, as the API takes
    them. An empty field (a form sends `actor_id=` for a field left blank) is no filter. A
    field given twice or unknown, or a value the model refuses, makes `problems`."""
    items = request.query_params.multi_items()
    names = [name for name, _ in items]
    if len(set(names)) != len(names):
        return SearchQuery(None, 1, {}, ("Give each field of the search at most once.",))
    if set(names) - {*FILTERS, PAGE}:
        return SearchQuery(None, 1, {}, ("The search holds a field this page does not know: "
                                         "start again from the form.",))
    given = {name: value.strip() for name, value in items if value.strip()}
    problems: list[str] = []
    page_text = given.pop(PAGE, "1")
    page = int(page_text) if page_text.isascii() and page_text.isdigit() \
        and len(page_text) <= 7 else 0
    if not 1 <= page <= MAX_PAGE:
        problems.append(f"Page: a whole number from 1 to {MAX_PAGE}.")
        page = 1
    try:
        found: AuditSearch | None = AuditSearch.model_validate(given)
    except ValidationError as exc:
        found = None
        refused = _refused_fields(exc)
        problems += _problems(exc)
        given = {name: value for name, value in given.items() if name not in refused}
    if problems:
        return SearchQuery(None, page, given, tuple(problems))
    return SearchQuery(found, page, given, ())


def _refused_fields(exc: ValidationError) -> set[str]:
    return {str(error["loc"][0]) for error in exc.errors() if error["loc"]}


def _problems(exc: ValidationError) -> list[str]:
    """One line per refused field, in the form's order; the model's own rules (a window that
    ends before it starts) in their words. No line repeats the value given."""
    refused = _refused_fields(exc)
    lines = [f"{LABELS.get(name, name)}: {_problem_of(name, exc)}." for name in FILTERS
             if name in refused]
    for error in exc.errors():
        if not error["loc"]:
            text = str(error["msg"])
            lines.append(next((said for rule, said in COHERENCE.items() if rule in text),
                              "The search could not be read."))
    return lines


def _problem_of(name: str, exc: ValidationError) -> str:
    if name in ("since", "until"):
        # The time rules' own words (the offset needed, the range of UTC) are the clearest,
        # and they never hold the value; other refusals get the form's example.
        for error in exc.errors():
            if error["loc"] and error["loc"][0] == name and error["type"] == "value_error":
                return str(error["msg"]).removeprefix("Value error, ")
    return PROBLEMS.get(name, "not accepted")


# The search page.

@dataclass(frozen=True, slots=True)
class EventRow:
    """One row of the results: the API's fields an auditor reads at a glance (the answer's
    other fields stay with the API), with links that search by its actor or patient."""

    seq: int
    at: str
    at_text: str
    actor_role: str | None
    actor_id: str | None
    actor_url: str | None
    action: str
    resource_type: str | None
    resource_id: str | None
    patient_id: str | None
    patient_url: str | None
    outcome: str
    break_glass_reason: str | None


def search_url(given: dict[str, str], page: int = 1) -> str:
    """The link of a search: its non-empty filters in the form's order, and its page."""
    pairs = [(name, given[name]) for name in FILTERS if given.get(name)]
    if page > 1:
        pairs.append((PAGE, str(page)))
    return f"{SEARCH_PATH}?{urlencode(pairs)}" if pairs else SEARCH_PATH


def _in_utc(at: datetime) -> datetime:
    return at.astimezone(UTC) if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _row(event: AuditEventView) -> EventRow:
    at = _in_utc(event.at)
    actor = str(event.actor_id) if event.actor_id else None
    patient = str(event.patient_id) if event.patient_id else None
    return EventRow(
        seq=event.seq, at=at.isoformat(), at_text=at.strftime("%Y-%m-%d %H:%M:%S UTC"),
        actor_role=event.actor_role, actor_id=actor,
        actor_url=search_url({"actor_id": actor}) if actor else None,
        action=event.action, resource_type=event.resource_type,
        resource_id=event.resource_id, patient_id=patient,
        patient_url=search_url({"patient_id": patient}) if patient else None,
        outcome=event.outcome, break_glass_reason=event.break_glass_reason)


@dataclass(frozen=True, slots=True)
class Results:
    rows: list[EventRow]
    total: int
    exact: bool
    page: int
    pages: int  # at least this many when the total is not exact
    first: int  # the position of the page's first event (1-based)
    previous_url: str | None
    next_url: str | None
    first_url: str


def _results(query: SearchQuery, found: search.SearchPage) -> Results:
    total, exact, page = found.total.count, found.total.exact, query.page
    pages = max(1, -(-total // PAGE_SIZE))
    shown = (page - 1) * PAGE_SIZE + len(found.events)
    more = len(found.events) == PAGE_SIZE and (shown < total or not exact) \
        and page < MAX_PAGE
    return Results(
        rows=[_row(event) for event in found.events], total=total, exact=exact, page=page,
        pages=pages, first=(page - 1) * PAGE_SIZE + 1,
        previous_url=search_url(query.given, page - 1) if page > 1 else None,
        next_url=search_url(query.given, page + 1) if more else None,
        first_url=search_url(query.given))


def _search_page(request: Request, visit: Visit, query: SearchQuery, *, status: int = 200,
                 results: Results | None = None) -> HTMLResponse:
    form = {name: query.given.get(name, "") for name in FILTERS}
    form["order"] = form["order"] or str(SortOrder.DESC)
    return render(request, "audit_search.html", status=status, visit=visit, form=form,
                  problems=query.problems, results=results, actions=ACTIONS,
                  outcomes=OUTCOMES, orders=ORDERS, page_size=PAGE_SIZE)


@router.get("/audit")
async def audit_search(request: Request, visit: Auditor, runtime: RuntimeDep,
                       session: SessionDep) -> HTMLResponse:
    """Search the audit trail: the filters of `GET /api/v1/audit` as a GET form (a search is a
    link to keep), 50 events a page, newest first unless asked otherwise. Audited as the API's
    search is (`VIEW_AUDIT_TRAIL` with its filters, `VIEW_BREAK_GLASS_REASON` for each reason
    shown); a query the API would refuse is a 400 page naming the fields to correct."""
    query = read_search(request)
    if query.search is None:
        return _search_page(request, visit, query, status=400)
    found = await search.search_events(session, runtime.sequencer, runtime.envelope,
                                       runtime.reason_mac, query.search, PAGE_SIZE,
                                       (query.page - 1) * PAGE_SIZE)
    return _search_page(request, visit, query, results=_results(query, found))


# Verification and checkpoints: one at a time per server process, with the API's.

def _claim_gate(request: Request) -> asyncio.Lock:
    """The API's verification gate: a verification (or a checkpoint, which verifies the whole
    chain first) asked while one runs, here or through the API, is refused at once (429)."""
    gate = verification_gate(request)
    if gate.locked():
        raise errors.RateLimited(10, BUSY)
    return gate


def _result_metadata(result: VerifyResult) -> dict[str, Any]:
    return {"ok": result.ok, "events": result.events, "first_bad_seq": result.first_bad_seq}


@router.get("/audit/verify")
async def audit_verify(request: Request, visit: Auditor, runtime: RuntimeDep,
                       session: SessionDep) -> HTMLResponse:
    """Recompute the chain as `GET /api/v1/audit/verify` does (what is committed chained first,
    every queued event's MAC checked): whether it holds, how many events, the first bad `seq`,
    and what was found in the queue. Audited as `VERIFY_AUDIT_CHAIN`."""
    async with _claim_gate(request):
        result = await service.verify_snapshot(runtime.sessions, runtime.audit_key,
                                               runtime.sequencer, runtime.queue_key)
    service.record(session, Action.VERIFY_AUDIT_CHAIN, metadata=_result_metadata(result))
    return render(request, "audit_verify.html", visit=visit, result=result)


@router.get("/audit/checkpoint")
async def audit_checkpoint(request: Request, visit: Auditor, runtime: RuntimeDep,
                           session: SessionDep) -> HTMLResponse:
    """The chain's head signed with `PHIVAULT_AUDIT_SIGNING_KEY`, made as `phivault audit
    checkpoint` makes it: what is committed chained, the whole chain verified, and only a
    chain that holds signed. Recorded as `AUDIT_CHECKPOINT` (outcome `error` for a broken
    chain, as the CLI does). Without a key, the page says so."""
    signer = runtime.settings.checkpoint_signer
    if not signer.keys:
        return render(request, "audit_checkpoint.html", visit=visit, configured=False,
                      signed=None, result=None)
    async with _claim_gate(request):
        try:
            signed, result = await checkpoint.take_checkpoint(
                runtime.sessions, signer, runtime.audit_key, runtime.sequencer)
        except checkpoint.ChainBroken as broken:
            signed, result = None, broken.result
    service.record(session, Action.AUDIT_CHECKPOINT,
                   outcome=Outcome.SUCCESS if signed else Outcome.ERROR,
                   resource_type="audit_chain", resource_id=str(result.head_seq),
                   metadata=_result_metadata(result))
    return render(request, "audit_checkpoint.html", visit=visit, configured=True,
                  signed=signed, result=result, text=signed.dumps() if signed else "",
                  taken=signed.to_json()["at"] if signed else "")

