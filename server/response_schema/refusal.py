"""The words every response_format refusal shares: the request field it names, where in it
the schema is, a limit's message, and a value as a message shows it."""

import json

from mdlserve.server.errors import ApiError, bad_request

PARAM = "response_format"
WHERE = "response_format.json_schema.schema"


def limit_refusal(what: str, found: int | str, limit: int, hint: str = "") -> ApiError:
    return bad_request(
        f"{WHERE} has {found} {what}; the limit is {limit}{hint} (docs/gateway.md, response_format)", param=PARAM
    )


def shown_value(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."
