"""GET /v1/models, GET /v1/models/{model_id} (OpenAI's 404 envelope for other ids), GET /version."""

from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter

from mdlserve.server.deps import State
from mdlserve.server.errors import ApiError
from mdlserve.server.routes import MODEL, MODELS, VERSION
from mdlserve.server.schemas import ErrorResponse, ModelCard, ModelList, VersionInfo

router = APIRouter()


def _card(state: State) -> ModelCard:
    created = int(state.engine.started_at or 0)
    return ModelCard(id=state.settings.served_model_name, created=created, max_model_len=state.settings.max_model_len)


@router.get(MODELS, response_model=ModelList)
async def list_models(state: State) -> ModelList:
    return ModelList(data=[_card(state)])


@router.get(MODEL, response_model=ModelCard, responses={404: {"model": ErrorResponse}})
async def retrieve_model(model_id: str, state: State) -> ModelCard:
    served = state.settings.served_model_name
    if model_id != served:
        raise ApiError(
            404, f"model {model_id!r} does not exist; this server serves {served!r}", param="model",
            code="model_not_found",
        )  # fmt: skip
    return _card(state)


def _version_of(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


@router.get(VERSION, response_model=VersionInfo)
async def server_version() -> VersionInfo:
    return VersionInfo(version=_version_of("midashenglm-serve"), vllm=_version_of("vllm"))
