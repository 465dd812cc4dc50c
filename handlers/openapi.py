"""The OpenAPI 3.1 document of `/api/v1`, generated from the routes and the handlers.

Each REST handler declares `openapi_path` (the path with named parameters) and `openapi`
(one `Operation` per HTTP method); request bodies come from the same pydantic models the
handlers validate with, so the document cannot drift from the code. A test checks that every
`/api/v1` route is documented, every documented method is implemented, and the document is
valid OpenAPI 3.1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import tornado.web
from pydantic import BaseModel

from handlers.base import BaseHandler

Auth = Literal["none", "optional", "user", "admin"]
_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
_PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "RFC 9457 problem details (every error answer has these fields), with "
    "fields of its kind where useful (`available`, `errors`, `allowed`, ...).",
    "properties": {
        "type": {"type": "string", "description": "`/problems/<kind>`"},
        "title": {"type": "string", "description": "the status phrase"},
        "status": {"type": "integer"},
        "detail": {"type": "string", "description": "what is wrong and what would be right"},
        "request_id": {"type": "string", "description": "also the `X-Request-Id` header"},
    },
    "required": ["type", "title", "status", "detail", "request_id"],
}
_AUTH_PROBLEMS: dict[Auth, dict[int, str]] = {
    "none": {},
    "optional": {401: "the token given is unknown, expired or revoked"},
    "user": {401: "not signed in", 403: "cookie request without the CSRF token"},
    "admin": {401: "not signed in", 403: "not an administrator, or no CSRF token"},
}


@dataclass(frozen=True)
class Query:
    """A query parameter whose schema is more than a string: written from the constants its
    validator checks against (`page_size_schema`), so the two agree."""

    description: str
    schema: dict[str, Any]


def page_size_schema(default: int, maximum: int) -> dict[str, Any]:
    """The schema of a `first` parameter: an integer from 1 to `maximum`."""
    return {"type": "integer", "minimum": 1, "maximum": maximum, "default": default}


@dataclass(frozen=True)
class Operation:
    """One documented operation of a handler."""

    summary: str
    ok: int = 200
    body: type[BaseModel] | None = None
    auth: Auth = "optional"
    query: dict[str, str | Query] = field(default_factory=dict)  # name -> description
    problems: dict[int, str] = field(default_factory=dict)  # extra statuses -> when
    headers: dict[str, str] = field(default_factory=dict)  # request headers -> description
    upload: str | None = None  # the multipart/form-data field carrying a file, if any
    answer: type[BaseModel] | None = None  # the success body's schema, where one is written


class Documented:
    """Mixin of REST handlers: where the handler lives in the document and what it does."""

    openapi_path: ClassVar[str | None] = None
    openapi: ClassVar[dict[str, Operation]] = {}


def _operation(op: Operation, path: str, schemas: dict[str, Any]) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in _path_params(path)
    ]
    params += [
        {
            "name": name,
            "in": "query",
            "required": False,
            "description": text if isinstance(text, str) else text.description,
            "schema": {"type": "string"} if isinstance(text, str) else text.schema,
        }
        for name, text in op.query.items()
    ]
    params += [
        {
            "name": name,
            "in": "header",
            "required": not text.startswith("optional"),
            "description": text,
            "schema": {"type": "string"},
        }
        for name, text in op.headers.items()
    ]
    problems = {429: "rate limited (Retry-After, RateLimit headers)", **_AUTH_PROBLEMS[op.auth]}
    if op.body is not None:
        problems |= {
            400: "malformed JSON",
            413: "body over 1 MiB",
            415: "not JSON",
            422: "invalid body (errors[] names each field)",
        }
    problems |= op.problems
    responses: dict[str, Any] = {
        str(op.ok): {"description": "success", "content": {"application/json": {}}}
        if op.ok != 204
        else {"description": "success, no content"}
    }
    if op.answer is not None:
        name = _add_schema(op.answer, schemas)
        responses[str(op.ok)]["content"]["application/json"] = {
            "schema": {"$ref": f"#/components/schemas/{name}"}
        }
    for status, text in sorted(problems.items()):
        responses[str(status)] = {
            "description": text,
            "content": {"application/problem+json": {"schema": _PROBLEM_REF}},
        }
    document: dict[str, Any] = {"summary": op.summary, "responses": responses}
    if op.upload is not None:
        upload_schema = {"type": "string", "contentMediaType": "application/octet-stream"}
        document["requestBody"] = {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {op.upload: upload_schema},
                        "required": [op.upload],
                    }
                }
            },
        }
    if params:
        document["parameters"] = params
    if op.auth in ("user", "admin"):
        document["security"] = [{"bearer": []}, {"cookie": []}]
    if op.body is not None:
        name = op.body.__name__
        schemas[name] = op.body.model_json_schema(ref_template="#/components/schemas/{model}")
        document["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}},
        }
    return document


def _add_schema(model: type[BaseModel], schemas: dict[str, Any]) -> str:
    """Put `model`'s JSON Schema (and the models it uses, as siblings) in `schemas`."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(schema.pop("$defs", {}))
    schemas[model.__name__] = schema
    return model.__name__


def _path_params(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]


def documented_handlers(app: tornado.web.Application) -> list[type[Documented]]:
    """The REST handler classes routed by `app`, in route order."""
    found: list[type[Documented]] = []

    def walk(router: Any) -> None:
        for rule in getattr(router, "rules", []):
            target = rule.target
            if isinstance(target, type) and issubclass(target, Documented):
                found.append(target)
            else:
                walk(target)

    walk(app.default_router)
    walk(app.wildcard_router)
    return found


def build_document(app: tornado.web.Application) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every documented route of `app`."""
    schemas: dict[str, Any] = {"Problem": _PROBLEM_SCHEMA}
    paths: dict[str, Any] = {}
    for handler in documented_handlers(app):
        if handler.openapi_path is None:
            continue
        item = paths.setdefault(handler.openapi_path, {})
        for method, op in handler.openapi.items():
            item[method.lower()] = _operation(op, handler.openapi_path, schemas)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Final Market API",
            "version": "1.0.0",
            "description": "REST surface of Final Market; errors are RFC 9457 problem details.",
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "cookie": {"type": "apiKey", "in": "cookie", "name": "fm_session"},
            },
        },
    }


class OpenApiHandler(BaseHandler):
    """`GET /api/v1/openapi.json`: the document, built once per application."""

    def get(self) -> None:
        cached = self.application.settings.get("openapi_json")
        if cached is None:
            cached = json.dumps(build_document(self.application)).encode()
            self.application.settings["openapi_json"] = cached
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "public, max-age=300")
        self.finish(cached)
