"""The `helm test` pod's script, run as rendered against a local stub of the gateway."""

import base64
import http.server
import json
import subprocess
import sys
import threading

import pytest
from .manifests import find


class Gateway(http.server.BaseHTTPRequestHandler):
    ready = 200
    content = "a short tone"
    seen: list

    def do_GET(self):
        self.send_response(self.ready if self.path == "/health/ready" else 404)
        self.end_headers()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": self.content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def script(helm) -> tuple[list[str], dict]:
    pod = find(helm.render({"auth": {"apiKeys": ["key-aaaaaaaaaaaaaaaa"]}}), "Pod", "-test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    c = pod["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["MDL_TEST_URL"] == "http://rel-midashenglm-serve.ml.svc:8000"
    return c["command"] + c["args"], env


def run_against(script, ready=200, content="a short tone", key="key-aaaaaaaaaaaaaaaa"):
    command, env = script
    handler = type("G", (Gateway,), {"ready": ready, "content": content, "seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {**env, "MDL_TEST_URL": f"http://127.0.0.1:{server.server_address[1]}", "MDL_API_KEY": key,
           "MDL_TEST_READY_ATTEMPTS": "1"}
    try:
        assert command[0] == "python3"
        out = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    return out, handler.seen


def test_smoke_passes_and_sends_audio_with_key(script):
    out, seen = run_against(script)
    assert out.returncode == 0, out.stderr
    (req,) = seen
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer key-aaaaaaaaaaaaaaaa"
    assert req["body"]["model"] == "midashenglm-7b" and req["body"]["max_tokens"] == 8
    audio = req["body"]["messages"][0]["content"][0]["audio_url"]["url"]
    wav = base64.b64decode(audio.split(",", 1)[1])
    assert audio.startswith("data:audio/wav;base64,") and wav[:4] == b"RIFF" and len(wav) > 32000


def test_smoke_fails_when_not_ready(script):
    out, seen = run_against(script, ready=503)
    assert out.returncode != 0 and "FAIL /health/ready: 503" in out.stderr and not seen


def test_smoke_fails_on_empty_completion(script):
    out, _ = run_against(script, content="  ")
    assert out.returncode != 0 and "empty content" in out.stderr
