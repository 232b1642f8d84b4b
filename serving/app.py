"""The recommendation API (FastAPI): one merchant's view of the shared federated export.

Routes under /v1 answer from the `LoadedExport` picked up at the start of the request (see
serving/state.py for the reload rule). Every failure a client can cause is a JSON 404 or 422
naming what was wrong; /healthz, /readyz and /metrics are for the orchestrator.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import uuid
from collections.abc import AsyncIterator
from importlib import resources
from typing import Annotated, Any

import faiss
import numpy as np
import orjson
from fastapi import FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from threadpoolctl import threadpool_limits

from fedrec.serving import metrics
from fedrec.serving.batcher import BasketQuery, FoldInBatcher
from fedrec.serving.export_store import LoadedExport
from fedrec.serving.limits import RequestLimits, shown
from fedrec.serving.recommend import customer_vector, purchased_rows, results
from fedrec.serving.recommend import similar_items as similar_items_of
from fedrec.serving.schemas import (
    MAX_K,
    POPULARITY_WEIGHT,
    BasketRequest,
    CustomerList,
    CustomerRecommendations,
    ErrorBody,
    Item,
    ItemList,
    Recommendations,
    ReloadResult,
    SimilarItems,
)
from fedrec.serving.search_batcher import SearchBatcher
from fedrec.serving.settings import ServeSettings
from fedrec.serving.state import ExportHolder

log = logging.getLogger("fedrec.serving")
ERRORS = {
    404: {"model": ErrorBody},
    413: {"model": ErrorBody},
    414: {"model": ErrorBody},
    422: {"model": ErrorBody},
    503: {"model": ErrorBody},
}
K = Annotated[int, Query(ge=1, le=MAX_K, description="number of items to return")]


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str) -> None:
        self.status, self.error, self.detail = status, error, detail


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            parts.append(f"body: malformed JSON ({err.get('ctx', {}).get('error', 'decode error')})")
            continue
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def limit_threads(threads: int) -> None:
    """One BLAS/OpenMP thread per worker by default: with several workers (or the fold-in thread
    beside the event loop) more threads only oversubscribe the cores."""
    threadpool_limits(threads)
    faiss.omp_set_num_threads(threads)


def served_weight_of(export: LoadedExport, asked: float | None) -> float:
    """The popularity weight a request ranks with: its own, else the merchant's served one."""
    if asked is not None:
        return asked
    return export.merchant.popularity_weight if export.merchant is not None else 1.0


def create_app(settings: ServeSettings, holder: ExportHolder | None = None) -> FastAPI:
    holder = holder or ExportHolder(settings)
    batcher = FoldInBatcher(settings.foldin_config(), settings.foldin_batch)
    searcher = SearchBatcher()  # known customers: concurrent searches as one FAISS call

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        limit_threads(settings.threads)
        if holder.current is None:
            await asyncio.to_thread(holder.reload, False)
        watcher = None
        if settings.watch_interval > 0 and (settings.export_path / "LATEST").exists():
            watcher = asyncio.create_task(_watch(holder, settings.watch_interval))
        await batcher.start()
        yield
        await batcher.stop()
        if watcher:
            watcher.cancel()

    # FastAPIOffline serves Swagger UI and ReDoc from the assets its package ships: /docs works on
    # a serving host without internet access.
    app = FastAPIOffline(
        title="fedrec recommendation API",
        version="1",
        description="Recommendations from the federated item tower and this merchant's own user vectors.",
        lifespan=lifespan,
    )
    app.state.holder = holder
    app.add_middleware(
        RequestLimits,
        max_body_bytes=settings.max_body_bytes,
        max_path_bytes=settings.max_path_bytes,
        max_query_bytes=settings.max_query_bytes,
    )
    app.add_middleware(metrics.MetricsMiddleware)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> Response:
        return _json({"error": exc.error, "detail": exc.detail}, exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> Response:
        return _json({"error": "invalid_request", "detail": _validation_message(exc)}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400:  # Starlette could not even decode the body
            return _json({"error": "invalid_request", "detail": f"body: malformed request body ({exc.detail})"}, 422)
        names = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 414: "uri_too_long"}
        detail = f"no route {request.method} {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        response = _json({"error": names.get(exc.status_code, "http_error"), "detail": detail}, exc.status_code)
        response.headers.update(exc.headers or {})  # e.g. Allow on a 405
        return response

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        """The client learns only that it failed and a request id; the detail goes to the log."""
        request_id = uuid.uuid4().hex[:16]
        log.error(
            "request %s: %s %s failed",
            request_id,
            request.method,
            request.url.path,
            exc_info=(type(exc), exc, exc.__traceback__),
        )
        response = _json({"error": "internal", "detail": "internal error", "request_id": request_id}, 500)
        response.headers["X-Request-ID"] = request_id
        return response

    def ready() -> LoadedExport:
        export = holder.current
        if export is None:
            raise ApiError(503, "not_ready", f"no export loaded yet: {holder.last_error or 'loading'}")
        return export

    def item_row(export: LoadedExport, item: str) -> int:
        row = export.item_rows.get(item)
        if row is None:
            raise ApiError(
                404, "item_not_found", f"item {shown(item)} is not in the catalogue of export {export.version}"
            )
        return row

    def merchant_of(export: LoadedExport, merchant: str):
        if export.merchant is None:
            raise ApiError(
                404, "merchant_not_found", f"merchant {shown(merchant)}: this service was started without a merchant"
            )
        if merchant != export.merchant.name:
            raise ApiError(
                404,
                "merchant_not_found",
                f"merchant {shown(merchant)} is not served here (this service serves {export.merchant.name!r})",
            )
        return export.merchant

    # ---- operations ------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def demo() -> HTMLResponse:
        return HTMLResponse(resources.files("fedrec.serving").joinpath("static/index.html").read_text(encoding="utf-8"))

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict:
        """The process is up (it may still be loading its first export)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], responses={503: {"model": ErrorBody}})
    async def readyz() -> Response:
        """An export is loaded and searchable."""
        export = holder.current
        if export is None:
            return _json({"error": "not_ready", "detail": holder.last_error or "loading"}, 503)
        return _json({"status": "ready", "version": export.version, "items": export.n_items, "index": export.kind})

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.post(
        "/v1/admin/reload",
        tags=["operations"],
        response_model=ReloadResult,
        responses={401: {"model": ErrorBody}, 403: {"model": ErrorBody}, 409: {"model": ErrorBody}},
    )
    async def admin_reload(authorization: Annotated[str | None, Header()] = None) -> Response:
        """Load the export LATEST names now (beside the current one) and swap it in."""
        if not settings.admin_token:
            raise ApiError(403, "admin_disabled", "admin reload is off: start the server with FEDREC_ADMIN_TOKEN set")
        scheme, _, given = (authorization or "").strip().partition(" ")
        # RFC 9110: the scheme is case-insensitive; the token is compared in constant time.
        token_ok = hmac.compare_digest(given.strip().encode(), settings.admin_token.encode())
        if scheme.lower() != "bearer" or not token_ok:
            raise ApiError(401, "unauthorized", "missing or wrong admin token (Authorization: Bearer <token>)")
        outcome = await asyncio.to_thread(holder.reload, True)
        if outcome.error:
            raise ApiError(409, "export_invalid", f"{outcome.error}; still serving {outcome.previous}")
        return _json({"previous": outcome.previous, "current": outcome.current, "changed": outcome.changed})

    # ---- model and catalogue -----------------------------------------------------------------

    @app.get("/v1/model", tags=["model"], responses=ERRORS)
    async def model_info() -> Response:
        """The served export's model card: version, rounds, merchants, offline metrics, privacy."""
        export = ready()
        card = export.card
        keys = (
            "version",
            "created",
            "dataset",
            "items",
            "dim",
            "index",
            "score",
            "rounds",
            "best_round",
            "refit_rounds",
            "merchants",
            "metrics",
            "federation",
            "privacy",
            "protocol",
            "fedrec_version",
        )
        info = {k: card[k] for k in keys if k in card}
        info.update(
            served_merchant=export.merchant.name if export.merchant else None,
            customers=len(export.merchant.user_ids) if export.merchant else 0,
            # the default w of u . v + w b (None: no merchant bias, so no popularity term)
            popularity_weight=served_weight_of(export, None) if export.merchant and export.merchant.index else None,
            index=export.kind,
            similar_items=export.similar_items_rule,
            foldin={"method": settings.foldin_method, "reg": settings.foldin_reg},
        )
        return _json(info)

    @app.get("/v1/items", tags=["catalogue"], response_model=ItemList, responses=ERRORS)
    async def list_items(
        q: Annotated[str, Query(max_length=200, description="case-insensitive text in id or title")] = "",
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
    ) -> Response:
        """Find catalogue items by id or title (for the demo page's product picker)."""
        export = ready()
        needle = q.strip().lower().replace("\x00", "")
        # one vectorised scan (polars) of "id NUL title", never a Python loop over the catalogue
        hits = export.search_text.str.contains(needle, literal=True).to_numpy() if needle else None
        rows = np.arange(export.n_items) if hits is None else np.flatnonzero(hits)
        found = rows[:limit].tolist()
        return _json({"version": export.version, "total": len(rows), "items": [export.item_record(r) for r in found]})

    # Ids are the shop's own and may hold "/" (a partition's customers are "<merchant>/<customer>"),
    # which arrives decoded in the path: `:path` takes it whole. /similar is matched first, so the
    # catalogue route below never reads "<id>/similar" as an id (an id that itself ends in
    # "/similar" is found by GET /v1/items?q= instead).
    @app.get(
        "/v1/items/{item_id:path}/similar", tags=["recommendations"], response_model=SimilarItems, responses=ERRORS
    )
    async def similar_items(item_id: str, k: K = 10) -> Response:
        """Items closest to this item by cosine of the item vectors (the item itself left out);
        `score` is the cosine (on a large catalogue exported before the cosine index, the inner
        product: `GET /v1/model` says which, under `similar_items`)."""
        export = ready()
        row = item_row(export, item_id)
        rows, scores = similar_items_of(export, row, k)
        return _json({"version": export.version, "item": item_id, "k": k, "items": results(export, rows, scores)})

    @app.get("/v1/items/{item_id:path}", tags=["catalogue"], response_model=Item, responses=ERRORS)
    async def get_item(item_id: Annotated[str, Path(description="catalogue item id")]) -> Response:
        export = ready()
        return _json(export.item_record(item_row(export, item_id)))

    # ---- recommendations ----------------------------------------------------------------------

    @app.get("/v1/merchants/{merchant}/customers", tags=["customers"], response_model=CustomerList, responses=ERRORS)
    async def list_customers(
        merchant: str,
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> Response:
        """Customer ids this merchant's user vectors cover (paged)."""
        export = ready()
        files = merchant_of(export, merchant)
        page = files.user_ids[offset : offset + limit]
        return _json({"version": export.version, "merchant": merchant, "total": len(files.user_ids), "customers": page})

    @app.get(
        "/v1/merchants/{merchant}/customers/{customer:path}/recommendations",
        tags=["recommendations"],
        response_model=CustomerRecommendations,
        responses=ERRORS,
    )
    async def recommend_customer(
        merchant: str,
        customer: str,
        k: K = 10,
        exclude_purchased: Annotated[bool, Query(description="leave out items the customer already bought")] = True,
        popularity_weight: Annotated[
            float | None, Query(ge=0, le=1, allow_inf_nan=False, description=POPULARITY_WEIGHT)
        ] = None,
    ) -> Response:
        """Top-k items for a known customer, from the merchant's own user vector."""
        export = ready()
        files = merchant_of(export, merchant)
        user_row = files.user_rows.get(customer)
        if user_row is None:
            raise ApiError(
                404, "customer_not_found", f"customer {shown(customer)} is not a customer of merchant {merchant!r}"
            )
        exclude = purchased_rows(export, user_row) if exclude_purchased else None
        weight = served_weight_of(export, popularity_weight)
        rows, scores = await searcher.search(export, customer_vector(export, user_row), k, exclude, weight)
        return _json(
            {
                "version": export.version,
                "merchant": merchant,
                "customer": customer,
                "k": k,
                "items": results(export, rows, scores),
            }
        )

    @app.post("/v1/recommendations", tags=["recommendations"], response_model=Recommendations, responses=ERRORS)
    async def recommend_basket(body: BasketRequest) -> Response:
        """Top-k items for an anonymous basket: a user vector is folded in from the items.

        Concurrent baskets are solved together in micro-batches (serving/batcher.py).
        """
        export = ready()
        unknown = [i for i in body.items if i not in export.item_rows]
        if unknown:
            listed = ", ".join(shown(i) for i in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise ApiError(
                404,
                "item_not_found",
                f"{len(unknown)} item(s) not in the catalogue of export {export.version}: {listed}",
            )
        rows = np.array([export.item_rows[i] for i in body.items], dtype=np.int64)
        found, scores = await batcher.submit(
            export, BasketQuery(rows, body.k, body.exclude_items, served_weight_of(export, body.popularity_weight))
        )
        return _json({"version": export.version, "k": body.k, "items": results(export, found, scores)})

    return app


async def _watch(holder: ExportHolder, interval: float) -> None:
    """Poll LATEST; a new version is loaded in a thread, beside the one serving."""
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(holder.reload, True)
        except Exception:  # the watcher must outlive any surprise
            log.exception("export watcher")


def create_app_from_env() -> FastAPI:
    """Factory for uvicorn workers (`fedrec serve` passes settings in the environment)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return create_app(ServeSettings.from_env())
