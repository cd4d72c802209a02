"""The gateway's HTTP routes. Every path is declared here once: the routers register
these constants and the middleware (metrics labels, the admission gate) reads them."""

CHAT_COMPLETIONS = "/v1/chat/completions"
TRANSCRIPTIONS = "/v1/audio/transcriptions"
TRANSLATIONS = "/v1/audio/translations"
AUDIO_ANALYSIS = "/v1/audio/analysis"
AUDIO_CHAT = "/v1/audio/chat"  # the old name of AUDIO_ANALYSIS, kept as an alias
MODELS = "/v1/models"
MODEL = MODELS + "/{model_id:path}"  # served names may hold "/" (org/model)
HEALTH = "/health"  # vLLM's probe
HEALTH_LIVE = "/health/live"
HEALTH_READY = "/health/ready"
METRICS = "/metrics"
VERSION = "/version"
OPENAPI = "/openapi.json"
DOCS = "/docs"

# Routes that run the model: authenticated, admitted (429 when full), refused while not serving.
WORK_PATHS = frozenset({CHAT_COMPLETIONS, TRANSCRIPTIONS, TRANSLATIONS, AUDIO_ANALYSIS, AUDIO_CHAT})
# Need an API key when keys are configured (and so does every path under MODELS + "/").
API_PATHS = WORK_PATHS | {MODELS}
# Open unless --auth-health-metrics.
OPS_PATHS = frozenset({HEALTH, HEALTH_LIVE, HEALTH_READY, METRICS})
# Always open: what the server is (no model, no data).
DISCOVERY_PATHS = frozenset({VERSION, OPENAPI, DOCS})
# Every path the app serves (others, /v1/models/{id} included, are labelled "other" in metrics).
ALL_PATHS = API_PATHS | OPS_PATHS | DISCOVERY_PATHS
# The GET routes, MODEL too (is_read_path): HEAD on them is answered as GET without the body.
READ_PATHS = OPS_PATHS | DISCOVERY_PATHS | {MODELS}


def is_read_path(path: str) -> bool:
    return path in READ_PATHS or path.startswith(MODELS + "/")


def needs_api_key(path: str, protected: frozenset[str]) -> bool:
    return path in protected or path.startswith(MODELS + "/")
