"""The OpenAPI document (/openapi.json, rendered at /docs), made to say what the server does.

FastAPI's generated document is wrong in two ways for this gateway: a form declared as one
pydantic model is described as `application/x-www-form-urlencoded` even when it holds a
file (the endpoints take `multipart/form-data`), and every operation lists a 422 that the
gateway never sends (validation errors are 400s in OpenAI's envelope, errors.py). This
module corrects both and lists the error statuses each kind of route can answer.
"""

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from mdlserve.server.routes import API_PATHS, MODEL, WORK_PATHS

FORM = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data"
ENVELOPE = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
# Statuses in OpenAI's error envelope, by the kind of route.
WORK_ERRORS = {
    "400": "invalid request (names the field)",
    "401": "missing or wrong API key",
    "404": "unknown model",
    "408": "request body not received in time",
    "413": "request body too large",
    "429": "at capacity; retry after Retry-After seconds",
    "503": "loading, draining, or the engine stopped",
    "504": "request timed out",
}
API_ERRORS = {"401": WORK_ERRORS["401"], "404": "no such model"}


def _has_file(schema: dict, components: dict) -> bool:
    ref = schema.get("$ref", "")
    target = components.get(ref.rsplit("/", 1)[-1], {}) if ref else schema
    return any("contentMediaType" in p or p.get("format") == "binary" for p in target.get("properties", {}).values())


def _errors(path: str) -> dict[str, str]:
    if path in WORK_PATHS:
        return WORK_ERRORS
    if path in API_PATHS or path == MODEL:
        return API_ERRORS
    return {}


def build_openapi(app: FastAPI) -> dict:
    if app.openapi_schema is not None:
        return app.openapi_schema
    document = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = document.get("components", {}).get("schemas", {})
    for path, operations in document["paths"].items():
        for operation in operations.values():
            content = operation.get("requestBody", {}).get("content", {})
            if FORM in content and _has_file(content[FORM]["schema"], components):
                content[MULTIPART] = content.pop(FORM)
            responses = operation["responses"]
            responses.pop("422", None)
            for status, description in _errors(path).items():
                responses.setdefault(status, {"description": description, "content": ENVELOPE})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    app.openapi_schema = document
    return document


def install_openapi(app: FastAPI) -> None:
    app.openapi = lambda: build_openapi(app)  # type: ignore[method-assign]
