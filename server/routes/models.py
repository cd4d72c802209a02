"""GET /v1/models."""

from fastapi import APIRouter

from mdlserve.server.deps import State
from mdlserve.server.routes import MODELS
from mdlserve.server.schemas import ModelCard, ModelList

router = APIRouter()


@router.get(MODELS, response_model=ModelList)
async def list_models(state: State) -> ModelList:
    created = int(state.engine.started_at or 0)
    card = ModelCard(id=state.settings.served_model_name, created=created, max_model_len=state.settings.max_model_len)
    return ModelList(data=[card])
