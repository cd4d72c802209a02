"""`helm test` smoke test: /health/ready answers 200, then one chat completion with a short
generated audio clip returns a non-empty assistant message. Standard library only; exits 0
on success, 1 with a reason on failure."""
import base64, io, json, math, os, struct, sys, time, urllib.error, urllib.request, wave

base = os.environ["MDL_TEST_URL"].rstrip("/")
key = os.environ.get("MDL_API_KEY", "").split(",")[0].strip()
model = os.environ.get("MDL_MODEL_NAME", "midashenglm-7b")
max_tokens = int(os.environ.get("MDL_TEST_MAX_TOKENS", "8"))
attempts = int(os.environ.get("MDL_TEST_READY_ATTEMPTS", "6"))


def call(method, path, body=None, timeout=10):
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if key:
        headers["Authorization"] = "Bearer " + key
    req = urllib.request.Request(base + path, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except OSError as err:
        return None, str(err).encode()


for i in range(attempts):
    status, body = call("GET", "/health/ready")
    if status == 200:
        break
    time.sleep(5 if i + 1 < attempts else 0)
else:
    sys.exit("FAIL /health/ready: %s %s" % (status, body[:200]))
print("ok /health/ready")

buf = io.BytesIO()
with wave.open(buf, "wb") as w:  # one second of a 440 Hz tone, 16 kHz mono
    w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
    w.writeframes(b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * t / 16000))) for t in range(16000)))
audio = "data:audio/wav;base64," + base64.b64encode(buf.getvalue()).decode()
request = {
    "model": model,
    "max_tokens": max_tokens,
    "temperature": 0,
    "messages": [{"role": "user", "content": [
        {"type": "audio_url", "audio_url": {"url": audio}},
        {"type": "text", "text": "Describe the audio."}]}],
}
status, body = call("POST", "/v1/chat/completions", json.dumps(request).encode(), timeout=120)
if status != 200:
    sys.exit("FAIL /v1/chat/completions: %s %s" % (status, body[:300]))
try:
    message = json.loads(body)["choices"][0]["message"]
except (ValueError, KeyError, IndexError, TypeError):
    sys.exit("FAIL /v1/chat/completions: unexpected body %s" % body[:300])
if not isinstance(message.get("content"), str) or not message["content"].strip():
    sys.exit("FAIL /v1/chat/completions: empty content")
print("ok /v1/chat/completions: %r" % message["content"][:80])
