"""`service.schemas`: the directly written response JSON equals the pydantic model's."""

from __future__ import annotations

import json

from service.retriever import Recommendation
from service.schemas import RecommendResponse, ScoredItem, recommendation_json


def test_recommendation_json_is_the_response_model_json() -> None:
    result = Recommendation(
        item_ids=["a", 'quote"d', "ünï"],
        scores=[0.1234567, -2.5e-08, 3.0],
        path="known_user",
        model_version="m1",
        index_version="idx-1",
    )
    for user_id, degraded in ((None, False), ("u\\1", True)):
        model = RecommendResponse(
            user_id=user_id,
            items=[ScoredItem(item_id=i, score=s) for i, s in zip(result.item_ids, result.scores, strict=True)],
            model_version="m1",
            index_version="idx-1",
            path="known_user",
            degraded=degraded,
            exact_fallback=False,
        )
        written = recommendation_json(user_id, result, degraded)
        assert json.loads(written) == json.loads(model.model_dump_json())
        assert list(json.loads(written)) == list(RecommendResponse.model_fields)
