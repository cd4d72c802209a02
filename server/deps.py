"""FastAPI dependencies: the state object and the serving check; the API-key check that
AuthMiddleware applies before a request's body is read.

All `async def` although none awaits: FastAPI runs plain `def` dependencies in its thread
pool, which would cost every request three thread hand-offs for microseconds of work."""

import hmac
from collections import Counter
from typing import Annotated

from fastapi import Depends, Request

from mdlserve.server.engine import EngineState
from mdlserve.server.errors import ApiError, EngineDead, bad_request
from mdlserve.server.state import GatewayState


async def get_state(request: Request) -> GatewayState:
    return request.app.state.gateway


State = Annotated[GatewayState, Depends(get_state)]

# Multipart fields that may repeat, one value per part; any other sent twice is refused.
REPEATABLE_FORM_FIELDS = frozenset({"timestamp_granularities[]", "stop"})


async def single_valued_form(request: Request) -> None:
    """A repeated multipart field is read as its last value, the others dropped unseen (of
    two files, the first would never be heard): refuse it by name instead."""
    form = await request.form()
    for key, count in Counter(key for key, _ in form.multi_items()).items():
        if count > 1 and key not in REPEATABLE_FORM_FIELDS:
            raise bad_request(f"{key} is sent {count} times in the form; send it once", param=key)


def _key_matches(candidate: bytes, keys: list[bytes]) -> bool:
    """Compare against every key (no early exit) in constant time per key."""
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(candidate, key)
    return matched


def api_key_error(authorizations: list[str], keys: list[bytes]) -> ApiError | None:
    """The 401 for a request's `Authorization` header values, or None when its one header
    carries a valid key. Two headers are refused, not read first-wins: a proxy in front may
    read the other one."""
    authorization = authorizations[0] if authorizations else ""
    scheme, _, token = authorization.partition(" ")
    how = "'Authorization: Bearer <key>'"
    if len(authorizations) > 1:
        problem = f"{len(authorizations)} Authorization headers: send the API key once, as {how}"
    elif scheme.lower() != "bearer" or not token.strip():
        problem = (
            f"malformed Authorization header: send the API key as {how}"
            if authorization.strip()
            else f"missing API key: send {how}"
        )
    elif not _key_matches(token.strip().encode(), keys):
        problem = "invalid API key"
    else:
        return None
    return ApiError(401, problem, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def require_serving(state: State) -> None:
    """Refuse new work (503) while the engine loads, after it died, or while draining."""
    if state.draining:
        raise ApiError(
            503, "server is shutting down; retry on another replica", code="draining", headers={"Retry-After": "1"}
        )
    if state.engine.state is EngineState.LOADING:
        raise ApiError(
            503, "the model is still loading; retry shortly", code="loading", reason=None, headers={"Retry-After": "5"}
        )
    if not state.engine.up:
        raise EngineDead()
