"""The gateway's HTTP routes. Every path is declared here once: the routers register
these constants and the middleware (metrics labels, the admission gate) reads them."""

CHAT_COMPLETIONS = "/v1/chat/completions"
TRANSCRIPTIONS = "/v1/audio/transcriptions"
AUDIO_CHAT = "/v1/audio/chat"
MODELS = "/v1/models"
HEALTH_LIVE = "/health/live"
HEALTH_READY = "/health/ready"
METRICS = "/metrics"

# Routes that run the model: authenticated, admitted (429 when full), refused while not serving.
WORK_PATHS = frozenset({CHAT_COMPLETIONS, TRANSCRIPTIONS, AUDIO_CHAT})
# Need an API key when keys are configured.
API_PATHS = WORK_PATHS | {MODELS}
# Open unless --auth-health-metrics.
OPS_PATHS = frozenset({HEALTH_LIVE, HEALTH_READY, METRICS})
# Every path the app serves (others are labelled "other" in metrics).
ALL_PATHS = API_PATHS | OPS_PATHS
