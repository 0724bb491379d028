"""The OpenAPI document explains itself: every operation has a description (what it does, who
may call it, its notable errors), and every JSON request body an example, made of obviously
fake data, that the route would accept."""

from __future__ import annotations

import importlib
import pkgutil
import re
from typing import Any

import pytest
from pydantic import BaseModel

import phivault
from phivault.runtime import Runtime
from phivault.schemas import RequestModel
from phivault.web.app import create_app

METHODS = {"get", "put", "post", "patch", "delete"}
# Bodies that are a file, not JSON: an example of one would be binary noise.
FILE_BODIES = {"multipart/form-data"}
FAKE_EMAIL = re.compile(r"@(example\.(org|com|net)|[a-z]+\.example)$")


def _operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method.upper(), path, operation) for path, item in spec["paths"].items()
            for method, operation in item.items() if method in METHODS]


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    resolved: dict[str, Any] = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
    return resolved


def test_every_operation_has_a_description(runtime: Runtime) -> None:
    spec = create_app(runtime=runtime).openapi()
    operations = _operations(spec)
    assert len(operations) > 40
    bare = [f"{method} {path}" for method, path, operation in operations
            if len(operation.get("description", "").strip()) < 20]
    assert bare == []


def test_every_api_description_says_who_may_call_it(runtime: Runtime) -> None:
    who = re.compile(r"\b(public|any signed-in user|patients?|doctors?|admins?|auditors?|"
                     r"parties|the caller|the patient|owner)\b", re.IGNORECASE)
    spec = create_app(runtime=runtime).openapi()
    silent = [f"{method} {path}" for method, path, operation in _operations(spec)
              if path.startswith("/api/") and not who.search(operation["description"])]
    assert silent == []


def test_every_json_request_body_has_an_example(runtime: Runtime) -> None:
    spec = create_app(runtime=runtime).openapi()
    missing = []
    for method, path, operation in _operations(spec):
        for media, content in operation.get("requestBody", {}).get("content", {}).items():
            if media in FILE_BODIES:
                continue
            schema = _resolve(spec, content["schema"])
            alternatives = [_resolve(spec, s) for s in schema.get("oneOf", [])] or [schema]
            missing += [f"{method} {path} ({s.get('title')})" for s in alternatives
                        if not s.get("examples")]
    assert missing == []


def _request_models() -> list[type[RequestModel]]:
    for module in pkgutil.walk_packages(phivault.__path__, "phivault."):
        if not module.name.startswith("phivault.client"):
            importlib.import_module(module.name)
    found: list[type[RequestModel]] = []
    pending: list[type[BaseModel]] = list(RequestModel.__subclasses__())
    while pending:
        model = pending.pop()
        pending += model.__subclasses__()
        # The client's models are answers' mirrors; the portal's are HTML forms, not in the
        # OpenAPI document (their examples would be shown nowhere).
        if model.__module__.startswith("phivault.") and \
                not model.__module__.startswith(("phivault.client", "phivault.portal")):
            found.append(model)  # type: ignore[arg-type]
    return found


MODELS = _request_models()


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_each_example_is_a_valid_request_of_fake_data(model: type[RequestModel]) -> None:
    examples = model.model_json_schema().get("examples")
    assert examples, f"{model.__name__} has no example"
    for example in examples:
        model.model_validate(example)  # accepted as the route would (Python mode, strict)
        for value in _strings(example):
            if "@" in value:
                assert FAKE_EMAIL.search(value), value


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


def test_the_request_models_are_all_found() -> None:
    names = {model.__name__ for model in MODELS}
    assert {"RegisterRequest", "PatientBooking", "DoctorProposal", "ConsentChoice",
            "BreakGlassRequest", "CreateStaff"} <= names
