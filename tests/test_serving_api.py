"""The recommendation API against a real export of a tiny training run (in-process client)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from fedrec.serving.app import create_app
from fedrec.serving.export_store import ExportError, load_export
from fedrec.serving.settings import ServeSettings
from fedrec.serving.state import ExportHolder

MERCHANT = "big"


@pytest.fixture
def root(served_root, tmp_path):
    """A private copy, so tests may move LATEST or break files."""
    return shutil.copytree(served_root, tmp_path / "artifacts")


def make_client(root, **overrides) -> TestClient:
    settings = ServeSettings(export=str(root / "exports"), merchant=MERCHANT, watch_interval=0, **overrides)
    return TestClient(create_app(settings))


@pytest.fixture
def client(root):
    with make_client(root, admin_token="s3cret") as c:
        yield c


def files(root, version="v0002"):
    mdir = root / "merchants" / MERCHANT / version
    users = pl.read_parquet(mdir / "users.parquet")["user"].to_list()
    items = pl.read_parquet(root / "exports" / version / "items.parquet")["item"].to_list()
    return {
        "users": users,
        "items": items,
        "U": np.load(mdir / "user_embeddings.npy"),
        "V": np.load(root / "exports" / version / "item_embeddings.npy"),
        "bought": sp.load_npz(mdir / "purchased.npz").tocsr(),
    }


def test_customer_recommendations_are_the_exact_top_k_without_purchases(client, root):
    f = files(root)
    user = 3
    r = client.get(f"/v1/merchants/{MERCHANT}/customers/{f['users'][user]}/recommendations", params={"k": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == "v0002" and body["k"] == 7 and len(body["items"]) == 7
    scores = f["V"] @ f["U"][user]
    bought = f["bought"][user].indices
    scores[bought] = -np.inf
    expected = [f["items"][i] for i in np.argsort(-scores)[:7]]
    assert [it["id"] for it in body["items"]] == expected
    got = np.array([it["score"] for it in body["items"]])
    np.testing.assert_allclose(got, np.sort(scores)[::-1][:7], rtol=1e-5)
    assert {"title", "category", "price"} <= set(body["items"][0])
    assert not {f["items"][i] for i in bought} & {it["id"] for it in body["items"]}


def test_a_merchant_item_bias_enters_customer_and_basket_ranking(root):
    """With the shop's own item bias (model.merchant_item_bias), the API ranks by u . v + b exactly."""
    f = files(root)
    bias = np.random.default_rng(3).normal(scale=1.0, size=len(f["items"])).astype(np.float32)
    np.save(root / "merchants" / MERCHANT / "v0002" / "item_bias.npy", bias)
    user = 5
    with make_client(root) as client:
        r = client.get(f"/v1/merchants/{MERCHANT}/customers/{f['users'][user]}/recommendations", params={"k": 9})
        assert r.status_code == 200, r.text
        scores = f["V"] @ f["U"][user] + bias
        scores[f["bought"][user].indices] = -np.inf
        assert [it["id"] for it in r.json()["items"]] == [f["items"][i] for i in np.argsort(-scores)[:9]]
        np.testing.assert_allclose([it["score"] for it in r.json()["items"]], np.sort(scores)[::-1][:9], rtol=1e-5)
        unbiased = f["V"] @ f["U"][user]
        unbiased[f["bought"][user].indices] = -np.inf
        assert [it["id"] for it in r.json()["items"]] != [f["items"][i] for i in np.argsort(-unbiased)[:9]]
        # popularity_weight w scales the bias: u . v + w b, exactly (0: the shared vectors alone)
        for w in (0.0, 0.4):
            r = client.get(
                f"/v1/merchants/{MERCHANT}/customers/{f['users'][user]}/recommendations",
                params={"k": 9, "popularity_weight": w},
            )
            assert r.status_code == 200, r.text
            damped = f["V"] @ f["U"][user] + np.float32(w) * bias
            damped[f["bought"][user].indices] = -np.inf
            assert [it["id"] for it in r.json()["items"]] == [f["items"][i] for i in np.argsort(-damped)[:9]]
            np.testing.assert_allclose([it["score"] for it in r.json()["items"]], np.sort(damped)[::-1][:9], rtol=1e-5)
        basket = client.post("/v1/recommendations", json={"items": f["items"][:3], "k": 5})
        assert basket.status_code == 200, basket.text
        assert len(basket.json()["items"]) == 5
        # a basket's ranking takes the weight too: its scores fall by (1 - w) b of each item
        basket = client.post("/v1/recommendations", json={"items": f["items"][:3], "k": 40})
        damped = client.post("/v1/recommendations", json={"items": f["items"][:3], "k": 40, "popularity_weight": 0})
        assert damped.status_code == 200, damped.text
        rows = {it: i for i, it in enumerate(f["items"])}
        got = {it["id"]: it["score"] for it in basket.json()["items"]}
        both = [it for it in damped.json()["items"] if it["id"] in got]
        assert len(both) >= 5, "too few items in both top-40 lists to compare"
        for it in both:  # the same folded-in u, so the scores differ by the item's bias alone
            np.testing.assert_allclose(got[it["id"]] - it["score"], bias[rows[it["id"]]], rtol=1e-4, atol=1e-4)
        # similar items stay a property of the shared item vectors alone
        sim = client.get(f"/v1/items/{f['items'][0]}/similar", params={"k": 4}).json()
        item_scores = cosine_to(f["V"], 0)
        assert [it["id"] for it in sim["items"]] == [f["items"][i] for i in np.argsort(-item_scores)[:4]]


def test_a_request_without_a_weight_ranks_with_the_merchants_served_weight(root):
    """The export's served_weight.json sets the default w of u . v + w b; a request's own w wins."""
    f = files(root)
    mdir = root / "merchants" / MERCHANT / "v0002"
    bias = np.random.default_rng(4).normal(scale=2.0, size=len(f["items"])).astype(np.float32)
    np.save(mdir / "item_bias.npy", bias)
    (mdir / "served_weight.json").write_text(json.dumps({"popularity_weight": 0.25}))
    user = 7
    url = f"/v1/merchants/{MERCHANT}/customers/{f['users'][user]}/recommendations"

    def expected(w):
        scores = f["V"] @ f["U"][user] + np.float32(w) * bias
        scores[f["bought"][user].indices] = -np.inf
        return [f["items"][i] for i in np.argsort(-scores)[:9]]

    assert expected(0.25) != expected(1.0), "the bias must change the ranking for this test to mean anything"
    with make_client(root) as client:
        assert client.get("/v1/model").json()["popularity_weight"] == 0.25
        default = client.get(url, params={"k": 9}).json()["items"]
        assert [it["id"] for it in default] == expected(0.25)
        asked = client.get(url, params={"k": 9, "popularity_weight": 1}).json()["items"]
        assert [it["id"] for it in asked] == expected(1.0)
        basket = {"items": f["items"][:3], "k": 40}
        served = {it["id"]: it["score"] for it in client.post("/v1/recommendations", json=basket).json()["items"]}
        explicit = client.post("/v1/recommendations", json={**basket, "popularity_weight": 0.25}).json()["items"]
        assert {it["id"]: it["score"] for it in explicit} == served


@pytest.mark.parametrize("content", ['{"popularity_weight": 1.5}', '{"popularity_weight": true}', "not json", "[]"])
def test_a_bad_served_weight_file_is_refused_with_its_path(root, content):
    mdir = root / "merchants" / MERCHANT / "v0002"
    np.save(mdir / "item_bias.npy", np.zeros(len(files(root)["items"]), dtype=np.float32))
    (mdir / "served_weight.json").write_text(content)
    with pytest.raises(ExportError, match=r"served_weight\.json"):
        load_export(root / "exports", MERCHANT, root / "merchants" / MERCHANT)


def test_exclude_purchased_false_ranks_the_whole_catalogue(client, root):
    f = files(root)
    user = int(np.argmax(f["bought"].getnnz(axis=1)))
    r = client.get(
        f"/v1/merchants/{MERCHANT}/customers/{f['users'][user]}/recommendations",
        params={"k": 20, "exclude_purchased": "false"},
    )
    expected = [f["items"][i] for i in np.argsort(-(f["V"] @ f["U"][user]))[:20]]
    assert [it["id"] for it in r.json()["items"]] == expected


def test_k_may_exceed_what_is_left_and_returns_all_of_it(client, root):
    f = files(root)
    n_items = len(f["items"])
    r = client.get(f"/v1/merchants/{MERCHANT}/customers/{f['users'][0]}/recommendations", params={"k": 1000})
    assert r.status_code == 200
    assert len(r.json()["items"]) == n_items - f["bought"][0].nnz


def test_basket_recommendations_leave_the_basket_out_and_follow_the_basket(client, root):
    f = files(root)
    basket = f["items"][:3]
    r = client.post("/v1/recommendations", json={"items": basket, "k": 10})
    assert r.status_code == 200, r.text
    got = [it["id"] for it in r.json()["items"]]
    assert len(got) == 10 and not set(got) & set(basket)
    scores = [it["score"] for it in r.json()["items"]]
    assert scores == sorted(scores, reverse=True)
    kept = client.post("/v1/recommendations", json={"items": basket, "k": 10, "exclude_items": False}).json()
    assert len(kept["items"]) == 10


def test_an_id_listed_twice_in_a_basket_weighs_twice(client, root):
    """The README's promise: a repeated id counts as often as it is listed (recent views), so
    listing one id twice changes the scores, where asking again with each id once does not."""
    items = files(root)["items"]

    def scores(basket: list[str]) -> dict[str, float]:
        r = client.post("/v1/recommendations", json={"items": basket, "k": 50})
        assert r.status_code == 200, r.text
        return {it["id"]: it["score"] for it in r.json()["items"]}

    once, doubled = scores(items[:2]), scores([items[0], items[0], items[1]])
    assert scores(items[:2]) == once
    shared = set(once) & set(doubled)
    assert len(shared) >= 10
    assert max(abs(once[i] - doubled[i]) for i in shared) > 1e-4


def cosine_to(vectors: np.ndarray, row: int) -> np.ndarray:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    scores = unit @ unit[row]
    scores[row] = -np.inf
    return scores


def test_similar_items_are_the_exact_cosine_top_k_without_the_item_itself(client, root):
    f = files(root)
    item = f["items"][5]
    r = client.get(f"/v1/items/{item}/similar", params={"k": 5})
    assert r.status_code == 200
    got = [it["id"] for it in r.json()["items"]]
    scores = cosine_to(f["V"], 5)
    assert got == [f["items"][i] for i in np.argsort(-scores)[:5]]
    np.testing.assert_allclose([it["score"] for it in r.json()["items"]], np.sort(scores)[::-1][:5], rtol=1e-5)
    # not the inner-product ranking, which favours long (popular) vectors
    raw = f["V"] @ f["V"][5]
    raw[5] = -np.inf
    assert got != [f["items"][i] for i in np.argsort(-raw)[:5]]


@pytest.mark.parametrize(
    ("path", "names"),
    [
        ("/v1/merchants/nowhere/customers/x/recommendations", ["merchant", "nowhere", "big"]),
        (f"/v1/merchants/{MERCHANT}/customers/ghost/recommendations", ["customer", "ghost", MERCHANT]),
        ("/v1/items/NOPE/similar", ["item", "NOPE"]),
        ("/v1/items/NOPE", ["item", "NOPE"]),
        ("/v1/merchants/nowhere/customers", ["merchant", "nowhere"]),
        ("/v1/no/such/route", ["/v1/no/such/route"]),
    ],
)
def test_unknown_things_are_404_naming_them(client, path, names):
    r = client.get(path)
    assert r.status_code == 404
    body = r.json()
    assert body["error"].endswith("not_found")
    for name in names:
        assert name in body["detail"]


def test_ids_with_a_slash_are_served_on_every_id_route(root, tmp_path):
    """A partition's customers are "<merchant>/<customer>" and a shop's SKUs may hold "/": sent
    percent-encoded, they arrive decoded in the path, and each route must still take them whole."""
    f = files(root)
    # the same export with one item and one customer renamed to ids holding "/"
    items = root / "exports" / "v0002" / "items.parquet"
    pl.read_parquet(items).with_columns(pl.col("item").replace(f["items"][0], "a/b")).write_parquet(items)
    users = root / "merchants" / MERCHANT / "v0002" / "users.parquet"
    pl.read_parquet(users).with_columns(pl.col("user").replace(f["users"][0], "north/c1")).write_parquet(users)
    with make_client(root) as client:
        got = client.get("/v1/items/a%2Fb")
        assert got.status_code == 200 and got.json()["id"] == "a/b", got.text
        similar = client.get("/v1/items/a%2Fb/similar", params={"k": 3})
        assert similar.status_code == 200 and similar.json()["item"] == "a/b", similar.text
        assert len(similar.json()["items"]) == 3 and "a/b" not in [it["id"] for it in similar.json()["items"]]
        rec = client.get(f"/v1/merchants/{MERCHANT}/customers/north%2Fc1/recommendations", params={"k": 3})
        assert rec.status_code == 200 and rec.json()["customer"] == "north/c1", rec.text
        missing = client.get(f"/v1/merchants/{MERCHANT}/customers/north%2Fc2/recommendations")
        assert missing.status_code == 404 and "'north/c2'" in missing.json()["detail"]


def test_unknown_basket_items_are_404_naming_them(client, root):
    known = files(root)["items"][0]
    r = client.post("/v1/recommendations", json={"items": [known, "BOGUS-1", "BOGUS-2"]})
    assert r.status_code == 404
    assert "BOGUS-1" in r.json()["detail"] and "BOGUS-2" in r.json()["detail"] and known not in r.json()["detail"]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "word"),
    [
        ("get", f"/v1/merchants/{MERCHANT}/customers/C1/recommendations", {"params": {"k": 0}}, "k"),
        ("get", f"/v1/merchants/{MERCHANT}/customers/C1/recommendations", {"params": {"k": 1001}}, "k"),
        ("get", f"/v1/merchants/{MERCHANT}/customers/C1/recommendations", {"params": {"k": "ten"}}, "k"),
        ("get", "/v1/items/P1/similar", {"params": {"k": -3}}, "k"),
        ("post", "/v1/recommendations", {"json": {"items": []}}, "items"),
        ("post", "/v1/recommendations", {"json": {"items": ["a"], "k": 5000}}, "k"),
        ("post", "/v1/recommendations", {"json": {"k": 5}}, "items"),
        ("post", "/v1/recommendations", {"json": {"items": "P1"}}, "items"),
        ("post", "/v1/recommendations", {"json": {"items": ["a"], "popularity_weight": 1.5}}, "popularity_weight"),
        ("post", "/v1/recommendations", {"json": {"items": ["a"], "popularity_weight": "0.5"}}, "popularity_weight"),
        (
            "get",
            f"/v1/merchants/{MERCHANT}/customers/C1/recommendations",
            {"params": {"popularity_weight": -1}},
            "popularity_weight",
        ),
        (
            "get",
            f"/v1/merchants/{MERCHANT}/customers/C1/recommendations",
            {"params": {"popularity_weight": "nan"}},
            "popularity_weight",
        ),
        (
            "post",
            "/v1/recommendations",
            {"content": b'{"items": [', "headers": {"content-type": "application/json"}},
            "JSON",
        ),
        (
            "post",
            "/v1/recommendations",
            {"content": b"SI\xff4\x14", "headers": {"content-type": "application/json"}},
            "body",
        ),
    ],
)
def test_bad_requests_are_422_with_a_clear_message(client, method, path, kwargs, word):
    r = getattr(client, method)(path, **kwargs)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid_request"
    assert word in r.json()["detail"]


def test_model_info_health_and_readiness(client):
    info = client.get("/v1/model").json()
    assert info["version"] == "v0002" and info["served_merchant"] == MERCHANT
    assert set(info["merchants"]) == {"big", "small_a", "small_b"}
    assert info["rounds"] >= 1 and "recall@20" in info["metrics"]["test"]
    assert info["privacy"]["user_embeddings"].startswith("kept by each merchant")
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["version"] == "v0002"


def test_prometheus_metrics_count_requests_and_describe_the_index(client, root):
    n_items = len(files(root)["items"])
    client.get("/v1/items/NOPE/similar")
    client.get("/v1/model")
    text = client.get("/metrics").text
    # the route as the API docs name it ({item_id}, not the router's {item_id:path})
    assert 'fedrec_requests_total{method="GET",route="/v1/items/{item_id}/similar",status="404"}' in text
    assert 'fedrec_request_latency_seconds_bucket{le="0.005",route="/v1/model"}' in text
    assert f"fedrec_index_items {float(n_items)}" in text
    assert "fedrec_export_version 2.0" in text


def test_customer_listing_pages_through_all_customers(client, root):
    users = files(root)["users"]
    first = client.get(f"/v1/merchants/{MERCHANT}/customers", params={"limit": 5}).json()
    assert first["customers"] == users[:5] and first["total"] == len(users)
    second = client.get(f"/v1/merchants/{MERCHANT}/customers", params={"offset": 5, "limit": 5}).json()
    assert second["customers"] == users[5:10]


def test_item_search_finds_by_title_words(client, root):
    title = pl.read_parquet(root / "exports" / "v0002" / "items.parquet")["title"][0]
    word = title.split()[-1].lower()
    found = client.get("/v1/items", params={"q": word, "limit": 100}).json()
    assert found["total"] >= 1 and all(word in it["title"].lower() for it in found["items"])


def test_admin_reload_needs_the_token_and_swaps_versions(client, root):
    assert client.post("/v1/admin/reload").status_code == 401
    assert client.post("/v1/admin/reload", headers={"Authorization": "Bearer wrong"}).status_code == 401
    (root / "exports" / "LATEST").write_text("v0001\n")
    r = client.post("/v1/admin/reload", headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200 and r.json() == {"previous": "v0002", "current": "v0001", "changed": True}
    assert client.get("/readyz").json()["version"] == "v0001"
    again = client.post("/v1/admin/reload", headers={"Authorization": "Bearer s3cret"}).json()
    assert again["changed"] is False


def test_admin_reload_is_off_without_a_token(root):
    with make_client(root) as c:
        r = c.post("/v1/admin/reload", headers={"Authorization": "Bearer anything"})
    assert r.status_code == 403 and "FEDREC_ADMIN_TOKEN" in r.json()["detail"]


def test_a_broken_new_export_is_refused_and_the_old_one_keeps_serving(client, root):
    failed_before = REGISTRY.get_sample_value("fedrec_reloads_total", {"outcome": "failed"}) or 0.0
    broken = root / "exports" / "v0003"
    shutil.copytree(root / "exports" / "v0002", broken)
    (broken / "index.faiss").unlink()
    (broken / "model_card.json").write_text((broken / "model_card.json").read_text().replace("v0002", "v0003"))
    (root / "exports" / "LATEST").write_text("v0003\n")
    r = client.post("/v1/admin/reload", headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 409
    assert "index.faiss" in r.json()["detail"] and "still serving v0002" in r.json()["detail"]
    assert client.get("/readyz").json()["version"] == "v0002"
    users = files(root)["users"]
    assert client.get(f"/v1/merchants/{MERCHANT}/customers/{users[0]}/recommendations").status_code == 200
    assert f'fedrec_reloads_total{{outcome="failed"}} {failed_before + 1}' in client.get("/metrics").text


def test_not_ready_is_503_not_500(tmp_path):
    settings = ServeSettings(export=str(tmp_path / "missing"), merchant=MERCHANT, watch_interval=0)
    holder = ExportHolder(settings)
    with TestClient(create_app(settings, holder)) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and "no such directory" in r.json()["detail"]
        assert c.get("/v1/model").status_code == 503


def test_item_only_service_without_a_merchant(root):
    settings = ServeSettings(export=str(root / "exports"), watch_interval=0)
    with TestClient(create_app(settings)) as c:
        item = files(root)["items"][0]
        assert c.post("/v1/recommendations", json={"items": [item]}).status_code == 200
        r = c.get(f"/v1/merchants/{MERCHANT}/customers/x/recommendations")
        assert r.status_code == 404 and "without a merchant" in r.json()["detail"]


def test_demo_page_is_served(client):
    r = client.get("/")
    assert r.status_code == 200 and "<title>fedrec demo</title>" in r.text
    assert "/v1/recommendations" in r.text


def test_item_search_matches_ids_case_insensitively_and_counts_every_hit(client, root):
    items = pl.read_parquet(root / "exports" / "v0002" / "items.parquet")
    item = items["item"][7]
    found = client.get("/v1/items", params={"q": item.lower(), "limit": 1}).json()
    assert found["items"][0]["id"] == item
    expected = sum(
        item.lower() in i.lower() or item.lower() in (t or "").lower()
        for i, t in zip(items["item"], items["title"], strict=True)
    )
    assert found["total"] == expected
    everything = client.get("/v1/items", params={"limit": 5}).json()
    assert everything["total"] == items.height and len(everything["items"]) == 5


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "ivfpq"])
def test_similar_items_on_an_approximate_export_rank_by_cosine_through_its_second_index(served_root, tmp_path, kind):
    """An export whose index is approximate also holds cosine.faiss (the unit-length vectors), and
    /similar ranks by cosine through it, not by the inner product that favours long vectors."""
    from typer.testing import CliRunner

    from fedrec.training.cli import app

    root = shutil.copytree(served_root, tmp_path / "a" / "file")
    csv = served_root.parent.parent / "purchases.csv"  # what the checkpoint trained on
    settings = (f"data.path={csv}", f"output.artifacts_dir={root.parent}", f"output.index={kind}")
    result = CliRunner().invoke(app, ["export", "--dataset", "file", *(x for s in settings for x in ("--set", s))])
    assert result.exit_code == 0, result.output
    version = (root / "exports" / "LATEST").read_text().strip()
    assert version == "v0003" and (root / "exports" / version / "cosine.faiss").is_file()
    f = files(root, version)
    with make_client(root) as c:
        info = c.get("/v1/model").json()
        assert info["index"] == kind and info["similar_items"].startswith(f"cosine ({kind} index")
        overlap, differs_from_inner_product = [], 0
        for row in range(0, len(f["items"]), 7):
            r = c.get(f"/v1/items/{f['items'][row]}/similar", params={"k": 10})
            assert r.status_code == 200, r.text
            got = [f["items"].index(it["id"]) for it in r.json()["items"]]
            cosine = cosine_to(f["V"], row)
            assert row not in got and len(got) == 10
            np.testing.assert_allclose([it["score"] for it in r.json()["items"]], cosine[got], rtol=1e-4, atol=1e-5)
            overlap.append(len(set(got) & set(np.argsort(-cosine)[:10])) / 10)
            raw = f["V"] @ f["V"][row]
            raw[row] = -np.inf
            differs_from_inner_product += set(got) != set(np.argsort(-raw)[:10])
    assert np.mean(overlap) >= 0.9, overlap
    assert differs_from_inner_product > 0
    # serve's --nprobe / --ef-search reach the cosine index as they reach the shared one
    from fedrec.serving.index import search_depth

    holder = ExportHolder(ServeSettings(export=str(root / "exports"), merchant=MERCHANT, watch_interval=0,
                                        nprobe=5, ef_search=17))  # fmt: skip
    assert holder.reload(False).error is None
    knob = {"ef_search": 17} if kind == "hnsw" else {"nprobe": 5}
    assert search_depth(holder.current.cosine_index) == search_depth(holder.current.index) == knob


def test_a_cosine_index_that_does_not_match_the_export_is_refused_by_name(served_root, tmp_path):
    import faiss

    root = shutil.copytree(served_root, tmp_path / "artifacts")
    version = root / "exports" / "v0002"
    faiss.write_index(faiss.IndexFlatIP(3), str(version / "cosine.faiss"))
    with pytest.raises(ExportError, match=r"cosine\.faiss: index dimension 3 differs"):
        load_export(version)
