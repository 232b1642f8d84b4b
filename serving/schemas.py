"""Request and response bodies of the /v1 API (they also make the OpenAPI schema at /docs)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictFloat, StrictStr

MAX_K = 1000
MAX_BASKET = 500  # items in one anonymous basket
POPULARITY_WEIGHT = (
    "weight w of the merchant's item popularity term in the score u . v + w b, 0 to 1: 1 ranks as the "
    "model was trained; lower values put fewer customers on the same top product, at some cost in "
    "accuracy (measured in the README). Left out: the merchant's served weight, chosen on its "
    "validation slice at training (GET /v1/model, `popularity_weight`; 1 where none was chosen). "
    "No effect for a merchant whose export has no item bias."
)


class Item(BaseModel):
    """A catalogue item with whatever metadata the export holds."""

    model_config = ConfigDict(extra="allow")
    id: str
    title: str | None = None
    description: str | None = None
    category: str | None = None
    price: float | None = None


class ScoredItem(Item):
    score: float = Field(description="inner product of the query vector and the item vector")


class Recommendations(BaseModel):
    version: str = Field(description="export version that produced this answer")
    k: int
    items: list[ScoredItem]


class CustomerRecommendations(Recommendations):
    merchant: str
    customer: str


class SimilarItems(Recommendations):
    item: str


def _integer_only(value: Any) -> Any:
    if isinstance(value, bool | str):
        raise ValueError(f"expected an integer, got a {'boolean' if isinstance(value, bool) else 'string'}")
    return value


class BasketRequest(BaseModel):
    # Typed strictly: `"k": true`, `"k": "5"` or `"exclude_items": "yes"` is a 422, never coerced.
    # (Not pydantic's strict mode as a whole: JSON Schema counts 5.0 as an integer, and so do we.)
    model_config = ConfigDict(extra="forbid")
    items: list[StrictStr] = Field(
        min_length=1,
        max_length=MAX_BASKET,
        description="item ids of a basket or recent views",
        examples=[["P00001"]],
    )
    k: Annotated[int, BeforeValidator(_integer_only)] = Field(10, ge=1, le=MAX_K)
    exclude_items: StrictBool = Field(True, description="leave the given items out of the answer")
    popularity_weight: StrictFloat | None = Field(None, ge=0, le=1, allow_inf_nan=False, description=POPULARITY_WEIGHT)


class ItemList(BaseModel):
    version: str
    total: int
    items: list[Item]


class CustomerList(BaseModel):
    version: str
    merchant: str
    total: int
    customers: list[str]


class ReloadResult(BaseModel):
    previous: str | None
    current: str | None
    changed: bool


class ErrorBody(BaseModel):
    error: str
    detail: str
    request_id: str | None = Field(None, description="on a 500 only: find the detail in the server log by it")
