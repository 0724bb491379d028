"""Each route of the API, declared once for both clients.

A route is a function that turns typed arguments into a `Call` (the path's values, the query,
the JSON body, how to read the answer) under `@endpoint(method, path template)`. That makes it
a `Route`, a descriptor: read from the synchronous client it is a method answering the result,
read from the asynchronous one a method answering a coroutine of it, with the very same
parameters (`typing.ParamSpec`), so mypy checks calls on both clients against one declaration
and the two cannot drift. Each client only decides how a `Call` is sent (`_run`): the token
refresh, the retry after a refused token and the error mapping live there.

Path values are ids, and ids are UUIDs in this API: each is checked and sent in its canonical
form, so no value (`..`, `.`, `a/b`) can change the path a request goes to. The answer is parsed
into the server's own response models (`models.py`).
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, Literal, ParamSpec, TypeVar, overload

from pydantic import BaseModel, TypeAdapter

from phivault.client.answers import Answer
from phivault.client.models import Page

if TYPE_CHECKING:
    from phivault.client.aio import AsyncPhivaultClient
    from phivault.client.sync import PhivaultClient

P = ParamSpec("P")
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

API = "/api/v1"
Auth = Literal["session", "none"]
Parse = Callable[[Answer], T]
Query = dict[str, str | int]


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One request to make and how to read its answer.

    `auth`: `session` sends the session's access token (refreshed as needed), `none` sends
    none (public routes). `bearer` sends that token instead and never refreshes it (an MFA
    enrolment token, the metrics token). `ends_session`: a success ends every session of the
    account (a password change, TOTP turned on, erasure), so the client forgets its tokens.
    `large_answer`: the answer is read up to the client's `max_export_bytes`, not
    `max_answer_bytes` (the GDPR export)."""

    parse: Parse[T]
    path_values: Mapping[str, object] = field(default_factory=dict)
    params: Query | None = None
    json: object | None = None
    auth: Auth = "session"
    bearer: str | None = None
    ends_session: bool = False
    large_answer: bool = False
    method: str = ""
    path: str = ""


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """A route's method and path template, e.g. `GET /api/v1/records/{record_id}`."""

    method: str
    template: str

    def path(self, values: Mapping[str, object]) -> str:
        return self.template.format_map({k: canonical_id(k, v) for k, v in values.items()})


def canonical_id(name: str, value: object) -> str:
    """An id as sent: a UUID in its canonical form, or `ValueError` (naming the parameter, not
    quoting the value) before anything is sent."""
    if isinstance(value, uuid.UUID):
        return str(value)
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise ValueError(f"{name} must be a UUID") from None


class Route(Generic[P, T]):
    """A route as a method of both clients (see the module docstring)."""

    def __init__(self, spec: RouteSpec, build: Callable[P, Call[T]]) -> None:
        self.spec = spec
        self.build = build
        self.__doc__ = build.__doc__

    def call(self, *args: P.args, **kwargs: P.kwargs) -> Call[T]:
        """The `Call` for these arguments, with its method and path filled in."""
        made = self.build(*args, **kwargs)
        return replace(made, method=self.spec.method, path=self.spec.path(made.path_values))

    @overload
    def __get__(self, obj: None, owner: type[Any]) -> Route[P, T]: ...

    @overload
    def __get__(self, obj: PhivaultClient, owner: type[Any]) -> Callable[P, T]: ...

    @overload
    def __get__(self, obj: AsyncPhivaultClient, owner: type[Any]
                ) -> Callable[P, Coroutine[Any, Any, T]]: ...

    def __get__(self, obj: object, owner: type[Any]) -> Any:
        if obj is None:
            return self
        run = obj._run  # type: ignore[attr-defined]  # both clients define it

        @functools.wraps(self.build)
        def method(*args: Any, **kwargs: Any) -> Any:
            return run(self.call(*args, **kwargs))

        return method


def endpoint(method: str, template: str) -> Callable[[Callable[P, Call[T]]], Route[P, T]]:
    """Declare a route: `@endpoint("GET", "/api/v1/me")` above a `@staticmethod`."""
    def declare(build: Callable[P, Call[T]]) -> Route[P, T]:
        return Route(RouteSpec(method, template), build)
    return declare


def declared_routes(cls: type) -> dict[str, RouteSpec]:
    """Every route `cls` (a client or an endpoint group) declares, by method name."""
    return {name: value.spec for klass in reversed(cls.__mro__)
            for name, value in vars(klass).items() if isinstance(value, Route)}


# Reading answers.

def one(model: type[M]) -> Parse[M]:
    return lambda answer: model.model_validate_json(answer.content)


def one_or_none(model: type[M]) -> Parse[M | None]:
    """A 200 with a body, or a 204 without (an approval: token in the answer, or mailed)."""
    return lambda answer: (None if answer.status_code == 204
                           else model.model_validate_json(answer.content))


@functools.cache
def _list_of(model: type[BaseModel]) -> TypeAdapter[list[Any]]:
    return TypeAdapter(list[model])  # type: ignore[valid-type]


def page(model: type[M]) -> Parse[Page[M]]:
    """A list answer, with `X-Total-Count` (absent on the few lists that are not paged)."""
    def parse(answer: Answer) -> Page[M]:
        total = answer.headers.get("x-total-count")
        exact = answer.headers.get("x-total-count-exact", "true") != "false"
        items: list[M] = _list_of(model).validate_json(answer.content)
        return Page(items, int(total) if total and total.isdigit() else None, exact)
    return parse


def nothing(answer: Answer) -> None:
    return None


def json_object(answer: Answer) -> dict[str, Any]:
    value = json.loads(answer.content)
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


def text(answer: Answer) -> str:
    return answer.content.decode("utf-8")


# Building requests.

def paging(limit: int | None, offset: int | None, **more: str | int | None) -> Query | None:
    """Query parameters, leaving out those not given (the server's defaults apply)."""
    values = {"limit": limit, "offset": offset, **more}
    query = {k: v for k, v in values.items() if v is not None}
    return query or None


def instant(value: datetime | None) -> str | None:
    """A time for a query or body: ISO 8601 with its offset (the server refuses naive times)."""
    return None if value is None else value.isoformat()


def body(**values: object) -> dict[str, object]:
    """A JSON body of the fields given (None leaves a field out; `UNSET` marks it the same way
    where None is a value of its own)."""
    return {k: v for k, v in values.items() if v is not None and v is not UNSET}


class _Unset:
    """A field not sent, as distinct from a field sent as null (`PATCH /me` removes a phone
    number sent as null)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


def with_nulls(**values: object) -> dict[str, object]:
    """A JSON body where None is sent as null and only `UNSET` fields are left out."""
    return {k: v for k, v in values.items() if v is not UNSET}


# The routes the clients write out by hand: they keep tokens or stream bodies.
LOGIN = RouteSpec("POST", f"{API}/auth/login")
REFRESH = RouteSpec("POST", f"{API}/auth/refresh")
LOGOUT = RouteSpec("POST", f"{API}/auth/logout")
UPLOAD = RouteSpec("POST", f"{API}/patients/{{patient_id}}/attachments")
DOWNLOAD = RouteSpec("GET", f"{API}/attachments/{{attachment_id}}")
HAND_WRITTEN = {"login": LOGIN, "refresh": REFRESH, "logout": LOGOUT,
                "upload_attachment": UPLOAD, "open_attachment": DOWNLOAD,
                "download_attachment": DOWNLOAD}

__all__ = ["API", "HAND_WRITTEN", "UNSET", "Call", "Route", "RouteSpec", "canonical_id",
           "declared_routes", "endpoint"]
