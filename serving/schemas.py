"""Request and response bodies of the /v1 API (they also make the OpenAPI schema at /docs)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MAX_K = 1000


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


class BasketRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[str] = Field(
        min_length=1, max_length=MAX_K, description="item ids of a basket or recent views", examples=[["P00001"]]
    )
    k: int = Field(10, ge=1, le=MAX_K)
    exclude_items: bool = Field(True, description="leave the given items out of the answer")


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
