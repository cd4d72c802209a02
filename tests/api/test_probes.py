"""Probes and discovery: /health (vLLM's), /v1/models/{id}, /version, /openapi.json, /docs."""

import socket
from importlib.metadata import version

import httpx
import openai
import pytest
from gateway.helpers import MODEL

from mdlserve.server.routes import ALL_PATHS, DOCS, OPENAPI, WORK_PATHS


def test_health_is_200_while_the_engine_lives(api_server):
    response = httpx.get(api_server.url + "/health", timeout=30)
    assert response.status_code == 200 and response.json()["status"] == "ok"


def test_a_head_probe_gets_the_get_answer_without_its_body(api_server):
    """Load balancers probe with HEAD: the status and headers of the GET, and no body sent."""
    host, port = httpx.URL(api_server.url).host, httpx.URL(api_server.url).port
    with socket.create_connection((host, port), timeout=30) as connection:
        connection.sendall(b"HEAD /health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while data := connection.recv(65536):
            answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-type: application/json" in head, answer
    assert body == b""


def test_model_by_id(oai):
    card = oai.models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model"
    with pytest.raises(openai.NotFoundError) as err:
        oai.models.retrieve("gpt-4o")
    assert err.value.body["code"] == "model_not_found" and "gpt-4o" in err.value.body["message"]


def test_model_by_id_needs_the_key(api_server):
    assert httpx.get(f"{api_server.url}/v1/models/{MODEL}", timeout=30).status_code == 401


def test_version(api_server):
    body = httpx.get(api_server.url + "/version", timeout=30).json()
    assert body == {"version": version("midashenglm-serve"), "vllm": version("vllm")}


def test_openapi_describes_every_endpoint_truthfully(api_server):
    document = httpx.get(api_server.url + OPENAPI, timeout=30).json()
    paths = document["paths"]
    assert set(paths) == (ALL_PATHS - {OPENAPI, DOCS}) | {"/v1/models/{model_id}"}
    for path in WORK_PATHS:
        operation = paths[path]["post"]
        content = operation["requestBody"]["content"]
        assert list(content) == ["application/json" if path == "/v1/chat/completions" else "multipart/form-data"]
        assert "422" not in operation["responses"]  # validation errors are 400s
        assert operation["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
        assert "text/event-stream" in operation["responses"]["200"]["content"]
    assert paths["/v1/audio/chat"]["post"]["deprecated"] is True
    form = document["components"]["schemas"]["TranscriptionForm"]["properties"]
    assert form["file"]["contentMediaType"] == "application/octet-stream"
    assert "404" in paths["/v1/models/{model_id}"]["get"]["responses"]


def test_docs_page(api_server):
    page = httpx.get(api_server.url + DOCS, timeout=30)
    assert page.status_code == 200 and OPENAPI in page.text and "swagger" in page.text.lower()
