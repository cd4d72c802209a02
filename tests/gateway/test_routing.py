"""Routing that probes and hand-written clients rely on, in process with the fake engine:
HEAD on the GET routes, paths with a trailing slash, served model names holding "/"."""

import pytest

from mdlserve.server.routes import READ_PATHS

from .inprocess import MODEL, chat_body, running_gateway

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def test_head_on_a_get_route_is_answered_as_the_get():
    async with running_gateway() as gw:
        for path in sorted(READ_PATHS | {f"/v1/models/{MODEL}"}):
            head, get = await gw.client.head(path), await gw.client.get(path)
            assert (head.status_code, head.headers["content-type"]) == (get.status_code, get.headers["content-type"])
            assert head.status_code == 200, path
        assert (await gw.client.head("/v1/chat/completions")).status_code == 405  # a POST route


async def test_a_known_path_with_a_trailing_slash_is_served_as_the_path():
    async with running_gateway() as gw:
        answer = await gw.client.post("/v1/chat/completions/", json=chat_body())
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"].startswith("w0 ")
        assert (await gw.client.get("/v1/models/")).json()["data"][0]["id"] == MODEL
        assert (await gw.client.get("/health/ready/")).json()["status"] == "ready"
        metrics = (await gw.client.get("/metrics")).text
        assert 'mdl_requests_total{route="/v1/chat/completions",status="200"} 1.0' in metrics
        unknown = await gw.client.post("/v1/nothing/", json={})
        assert unknown.status_code == 404 and "location" not in unknown.headers


async def test_a_trailing_slash_does_not_get_past_the_api_key():
    async with running_gateway(api_keys=["sk-test"]) as gw:
        refused = await gw.client.post("/v1/chat/completions/", json=chat_body())
        assert refused.status_code == 401
        answered = await gw.client.post("/v1/chat/completions/", json=chat_body(),
                                        headers={"Authorization": "Bearer sk-test"})  # fmt: skip
        assert answered.status_code == 200


async def test_a_served_name_holding_a_slash_can_be_retrieved():
    async with running_gateway(served_model_name="org/midashenglm") as gw:
        for path in ("/v1/models/org/midashenglm", "/v1/models/org%2Fmidashenglm"):
            card = await gw.client.get(path)
            assert card.status_code == 200 and card.json()["id"] == "org/midashenglm", path
        missing = await gw.client.get("/v1/models/org/other")
        assert missing.status_code == 404
        assert missing.json()["error"]["message"] == "model 'org/other' does not exist; this server serves 'org/midashenglm'"
