"""OpenAPI 3.1, generated from the pydantic models that validate requests; `/docs` offline.

The spec is never written by hand: each view declares its inputs and answers with
``@endpoint(...)``, the decorator validates requests with exactly those models, and
``GET /openapi.json`` assembles pydantic's JSON Schema of the same models. A route without a
declaration fails ``tests/test_openapi.py::test_every_route_is_described``.

How a blueprint describes an endpoint (put ``@endpoint`` *below* the route decorator)::

    from pydantic import BaseModel
    from .openapi import Content, endpoint

    class Thing(BaseModel):              # a response: only described, never enforced
        id: str

    def thing_request(app):              # a request model may depend on the app's settings
        s = app.config["S2I_SETTINGS"]
        return create_model("ThingRequest", size=(Annotated[int, Field(le=s.max_width)], 64))

    @bp.post("/things/<thing_id>")
    @endpoint(
        body=thing_request,              # JSON body: a model, or app -> model (built once per app)
        query=None,                      # query string model (lax: "5" is 5)
        form=None,                       # multipart/form-data model; files typed with `Upload`
        responses={200: Thing, 202: JobAccepted, 204: None,
                   201: Content({"text/plain": {"type": "string"}})},
        errors=(404, 409),               # statuses beyond the automatic ones (below)
        tags=("things",),
        path={"thing_id": "The thing's id."},
        public=False,                    # True: no API key needed (no 401 documented)
        rate_limited=True,               # False for routes the limiter exempts (no 429)
        operators=False,                 # True for @operators_only views (403 documented)
    )
    def make_thing(thing_id: str, body, query=None) -> ResponseReturnValue:
        ...                              # body/query/form arrive validated, as model instances

Validation errors of all declared parts come back at once as one 400 in the error shape of
``api/errors.py``, ``details.errors`` listing each ``{"field", "message"}``. Every operation
documents 400 (when it takes input), 401 (when API keys are configured and it is not
public), 403 (operators), 413 (with a body), 429 (rate limited), 500 and the ``errors``
given, all with the ``Error`` schema. The summary is the view's docstring's first line.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any

from flask import Blueprint, Flask, current_app, jsonify, request
from flask.typing import ResponseReturnValue
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
)
from pydantic.json_schema import models_json_schema
from werkzeug.datastructures import FileStorage

from .. import __version__
from ..errors import InvalidRequest
from ..schemas import invalid_request

__all__ = [
    "Content",
    "Endpoint",
    "ErrorBody",
    "Upload",
    "bp",
    "build_spec",
    "endpoint",
    "json_body",
    "register_openapi",
]

bp = Blueprint("openapi", __name__)

ModelSource = type[BaseModel] | Callable[[Any], type[BaseModel]]
INPUT_PARTS = ("body", "query", "form")


def _is_upload(value: Any) -> Any:
    if not isinstance(value, FileStorage):
        raise ValueError("must be a file part of a multipart/form-data upload")
    return value


#: A file part of a multipart form (a werkzeug ``FileStorage`` once validated).
Upload = Annotated[
    Any,
    AfterValidator(_is_upload),
    WithJsonSchema({"type": "string", "format": "binary"}),
]


class ErrorDetail(BaseModel):
    """One field's problem."""

    field: str
    message: str


class ErrorDetails(BaseModel):
    """Extra facts about an error; for a 400, the fields at fault."""

    model_config = ConfigDict(extra="allow")

    field: str | None = Field(None, description="The first field at fault.")
    errors: list[ErrorDetail] | None = Field(None, description="Every field at fault.")


class ErrorInfo(BaseModel):
    """What went wrong, with a stable code and the request id to quote in a report."""

    model_config = ConfigDict(extra="allow")

    status: int = Field(description="The HTTP status, repeated.")
    code: str = Field(description="Stable machine-readable code, e.g. invalid_request.")
    message: str = Field(description="For people; names the field and the allowed range.")
    request_id: str | None = Field(description="X-Request-ID of this request.")
    details: ErrorDetails | None = Field(
        None, description="Extra facts; for 400: `field` (the first) and `errors`."
    )


class ErrorBody(BaseModel):
    """The one error shape of every endpoint."""

    error: ErrorInfo


IDEMPOTENCY_PARAMETER = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Retry-safe submission: the same key from the same caller returns the job "
    "it made the first time instead of making a second (409 if that job was of another kind).",
    "schema": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[!-~]+$"},
}


@dataclasses.dataclass(frozen=True)
class Content:
    """A response by media type: ``{"text/plain": schema, "application/json": Model}``."""

    media: Mapping[str, Any]
    description: str = ""
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """What ``@endpoint`` recorded about one view."""

    body: ModelSource | None = None
    query: ModelSource | None = None
    form: ModelSource | None = None
    responses: Mapping[int, Any] = dataclasses.field(default_factory=dict)
    errors: tuple[int, ...] = ()
    tags: tuple[str, ...] = ()
    path: Mapping[str, str] = dataclasses.field(default_factory=dict)
    public: bool = False
    rate_limited: bool = True
    operators: bool = False
    idempotent: bool = False  # takes an Idempotency-Key header (it makes a job)
    summary: str = ""
    description: str = ""


class _Models:
    """Request models built from the app (its settings), once per app; and its spec, once."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self._built: dict[Any, type[BaseModel]] = {}
        self._spec: dict[str, Any] | None = None
        # Concurrent first requests must share one class per source: the spec's schema refs
        # are keyed by class, and a second class built meanwhile has none (a KeyError, 500).
        self._lock = threading.RLock()

    def get(self, source: ModelSource) -> type[BaseModel]:
        if isinstance(source, type) and issubclass(source, BaseModel):
            return source
        built = self._built.get(source)
        if built is None:
            with self._lock:
                built = self._built.get(source)
                if built is None:
                    built = self._built[source] = source(self.app)
        return built

    def spec(self) -> dict[str, Any]:
        """The app's OpenAPI document, built by the first caller while the others wait."""
        if self._spec is None:
            with self._lock:
                if self._spec is None:
                    self._spec = build_spec(self.app)
        return self._spec


def _models(app: Flask) -> _Models:
    return app.extensions["openapi_models"]


def json_body(field: str = "body") -> Any:
    """The request's JSON, or a 400 (not JSON, malformed, or nested too deeply to parse)."""
    if not request.is_json:
        raise InvalidRequest(
            "send a JSON object (Content-Type: application/json)", details={"field": field}
        )
    data = request.get_data(cache=True)
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise InvalidRequest(
            "the body is not valid JSON (or is nested too deeply)", details={"field": field}
        ) from None


def _form_data() -> dict[str, Any]:
    data: dict[str, Any] = {}
    for name in request.form:
        data[name] = request.form.get(name)
    for name in request.files:
        data[name] = request.files.get(name)
    return data


def endpoint(
    *,
    body: ModelSource | None = None,
    query: ModelSource | None = None,
    form: ModelSource | None = None,
    responses: Mapping[int, Any] | None = None,
    errors: Iterable[int] = (),
    tags: Iterable[str] = (),
    path: Mapping[str, str] | None = None,
    public: bool = False,
    rate_limited: bool = True,
    operators: bool = False,
    idempotent: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Describe a view for the spec and validate its inputs with the same models."""

    def decorate(view: Callable[..., Any]) -> Callable[..., Any]:
        doc = (view.__doc__ or "").strip()
        summary, _, rest = doc.partition("\n")
        spec = Endpoint(
            body=body,
            query=query,
            form=form,
            responses=dict(responses or {200: None}),
            errors=tuple(errors),
            tags=tuple(tags),
            path=dict(path or {}),
            public=public,
            rate_limited=rate_limited,
            operators=operators,
            idempotent=idempotent,
            summary=summary.strip(),
            description=rest.strip(),
        )

        @functools.wraps(view)
        def validated(*args: Any, **kwargs: Any) -> Any:
            models = _models(current_app)
            problems: list[dict[str, Any]] = []
            for part in INPUT_PARTS:
                source = getattr(spec, part)
                if source is None:
                    continue
                model = models.get(source)
                if part == "body":
                    raw: Any = json_body()
                    if not isinstance(raw, dict):
                        raise InvalidRequest(
                            "the body must be a JSON object", details={"field": "body"}
                        )
                elif part == "query":
                    raw = request.args.to_dict()
                else:
                    raw = _form_data()
                try:
                    kwargs[part] = model.model_validate(raw)
                except ValidationError as exc:
                    problems.extend(invalid_request(exc, model).details["errors"])
            if problems:
                raise InvalidRequest(
                    "; ".join(p["message"] for p in problems),
                    details={"field": problems[0]["field"], "errors": problems},
                )
            return view(*args, **kwargs)

        validated.__openapi__ = spec  # type: ignore[attr-defined]
        return validated

    return decorate


# --- the spec -----------------------------------------------------------------------------

_STATUS_TEXT = {
    200: "OK",
    201: "Created",
    202: "Accepted: the job runs; poll `Location`",
    204: "No content",
    400: "Invalid request: every problem, each naming its field",
    401: "Missing or wrong API key",
    403: "An operator endpoint: needs an admin key",
    404: "Not found (or not the caller's)",
    405: "Method not allowed",
    409: "Conflict",
    413: "Body or upload too large",
    415: "Not an accepted media type",
    422: "Understood but unusable",
    429: "Rate limit or per-client queue full; see Retry-After",
    499: "Client closed the connection",
    500: "Unexpected server error (logged with the request id)",
    503: "A dependency or model is unavailable, or the queue is full; see Retry-After",
    507: "Storage full",
}

_RULE_ARG = {"int": {"type": "integer"}, "float": {"type": "number"}}


_RULE_VARIABLE = re.compile(r"<(?:[a-z_]+(?:\([^)]*\))?:)?([A-Za-z_][A-Za-z0-9_]*)>")


def _openapi_path(rule: Any) -> str:
    return _RULE_VARIABLE.sub(r"{\1}", rule.rule)


def _converter_schema(rule: Any, name: str) -> dict[str, Any]:
    converter = rule._converters.get(name)
    kind = type(converter).__name__.lower().removesuffix("converter")
    return dict(_RULE_ARG.get(kind, {"type": "string"}))


def build_spec(app: Flask) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``app``: every described route, with this app's ranges."""
    settings = app.config["S2I_SETTINGS"]
    auth_on = bool(settings.api_keys or settings.admin_api_keys)
    models = _models(app)
    wanted: list[tuple[type[BaseModel], Any]] = [(ErrorBody, "validation")]
    operations: list[tuple[Any, str, Endpoint]] = []
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        view = app.view_functions.get(rule.endpoint)
        spec: Endpoint | None = getattr(view, "__openapi__", None)
        if spec is None:
            continue
        for part in INPUT_PARTS:
            source = getattr(spec, part)
            if source is not None:
                wanted.append((models.get(source), "validation"))
        for answer in spec.responses.values():
            for schema in _answer_media(answer).values():
                if isinstance(schema, type) and issubclass(schema, BaseModel):
                    wanted.append((schema, "serialization"))
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            operations.append((rule, method.lower(), spec))

    refs, defs = models_json_schema(
        list(dict.fromkeys(wanted)), ref_template="#/components/schemas/{model}"
    )

    def schema_of(thing: Any, mode: str = "serialization") -> dict[str, Any]:
        if isinstance(thing, type) and issubclass(thing, BaseModel):
            return dict(refs[(thing, mode)])
        return dict(thing) if thing is not None else {}

    error_ref = schema_of(ErrorBody, "validation")
    paths: dict[str, dict[str, Any]] = {}
    for rule, method, spec in operations:
        operation: dict[str, Any] = {
            "operationId": f"{rule.endpoint.replace('.', '_')}_{method}",
            "summary": spec.summary or rule.endpoint,
            "tags": list(spec.tags) or [rule.endpoint.split(".", 1)[0]],
        }
        if spec.description:
            operation["description"] = spec.description
        params = [
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": _converter_schema(rule, name),
                **({"description": spec.path[name]} if name in spec.path else {}),
            }
            for name in sorted(rule.arguments)
        ]
        if spec.query is not None:
            query_schema = models.get(spec.query).model_json_schema(
                ref_template="#/components/schemas/{model}"
            )
            required = set(query_schema.get("required", []))
            for name, prop in query_schema.get("properties", {}).items():
                param: dict[str, Any] = {
                    "name": name,
                    "in": "query",
                    "required": name in required,
                    "schema": {k: v for k, v in prop.items() if k != "description"},
                }
                if "description" in prop:
                    param["description"] = prop["description"]
                params.append(param)
        if spec.idempotent:
            params.append(IDEMPOTENCY_PARAMETER)
        if params:
            operation["parameters"] = params
        if spec.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {"schema": schema_of(models.get(spec.body), "validation")}
                },
            }
        elif spec.form is not None:
            form_model = models.get(spec.form)
            form_schema = form_model.model_json_schema()
            # Object fields of a form travel as JSON parts.
            encoding = {
                name: {"contentType": "application/json"}
                for name, prop in form_schema.get("properties", {}).items()
                if prop.get("type") == "object"
            }
            media: dict[str, Any] = {"schema": schema_of(form_model, "validation")}
            if encoding:
                media["encoding"] = encoding
            operation["requestBody"] = {
                "required": True,
                "content": {"multipart/form-data": media},
            }
        responses: dict[str, Any] = {}
        for status, answer in sorted(spec.responses.items()):
            responses[str(status)] = _response(status, answer, schema_of)
        statuses = set(spec.errors) | {500}
        if method != "get":
            # Writes meet a database that does not answer or a read-only disk (503), and new
            # work a full disk (507, before anything is written).
            statuses |= {503, 507} if method == "post" else {503}
        if spec.body or spec.form or spec.query or rule.arguments:
            statuses.add(400)
        if spec.body or spec.form:
            statuses.add(413)
        if auth_on and not spec.public:
            statuses.add(401)
        if spec.operators and auth_on:
            statuses.add(403)
        # Routes exempt from the request limits still meet the failed-authentication one.
        if settings.ratelimit_enabled and (spec.rate_limited or (auth_on and not spec.public)):
            statuses.add(429)
        for status in sorted(statuses):
            if str(status) not in responses:
                responses[str(status)] = {
                    "description": _STATUS_TEXT.get(status, "Error"),
                    "content": {"application/json": {"schema": error_ref}},
                }
        operation["responses"] = responses
        if auth_on and not spec.public:
            operation["security"] = [{"bearer": []}, {"apiKey": []}]
        elif auth_on:
            operation["security"] = []
        paths.setdefault(_openapi_path(rule), {})[method] = operation

    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "speech2image",
            "version": __version__,
            "description": "Speech in, images out: Whisper transcription and Stable Diffusion "
            "generation, with a per-client history. Ranges and defaults below are this "
            "server's settings.",
        },
        "paths": paths,
        "components": {"schemas": defs.get("$defs", {})},
    }
    if auth_on:
        document["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        }
    return document


def _answer_media(answer: Any) -> Mapping[str, Any]:
    if isinstance(answer, Content):
        return answer.media
    if answer is None:
        return {}
    return {"application/json": answer}


def _response(status: int, answer: Any, schema_of: Callable[..., Any]) -> dict[str, Any]:
    description = _STATUS_TEXT.get(status, "")
    headers: Mapping[str, str] = {}
    if isinstance(answer, Content):
        description = answer.description or description
        headers = answer.headers
    elif isinstance(answer, type) and answer.__doc__:
        description = answer.__doc__.strip().splitlines()[0]
    body: dict[str, Any] = {"description": description or "OK"}
    media = _answer_media(answer)
    if media:
        body["content"] = {kind: {"schema": schema_of(schema)} for kind, schema in media.items()}
    if headers:
        body["headers"] = {
            name: {"description": text, "schema": {"type": "string"}}
            for name, text in headers.items()
        }
    return body


@bp.get("/openapi.json")
@endpoint(
    responses={200: {"type": "object", "description": "This document."}},
    tags=("docs",),
    public=True,
)
def spec() -> ResponseReturnValue:
    """The OpenAPI 3.1 description of this server, with its configured ranges and models."""
    return jsonify(_models(current_app).spec())


def register_openapi(app: Flask) -> None:
    """Serve /openapi.json and the Swagger UI at /docs (files from the package, no CDN)."""
    from flask_swagger_ui import get_swaggerui_blueprint

    app.extensions["openapi_models"] = _Models(app)
    app.register_blueprint(bp)
    docs = get_swaggerui_blueprint(
        "/docs",
        "/openapi.json",
        config={"app_name": "speech2image API", "deepLinking": True},
        blueprint_name="docs",
    )
    app.register_blueprint(docs)
