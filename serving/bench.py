"""`make bench-serve`: load-test `fedrec serve` from a second process and time FAISS alone.

For each catalogue (the shipped export, and synthetic 1,000,000-item catalogues on one index kind) it
1. measures the index's recall@10 against exact inner-product search and the FAISS-only
   queries per second for the very queries the server will answer (same k, same over-fetch);
2. starts the server as a separate process on loopback and drives it with wrk at each
   concurrency, cycling through the merchant's customers (top-10, already-bought excluded);
3. writes results/bench-serve.json (a list of runs) and results/bench-serve.md.
The 1M catalogue is the shipped item vectors plus generated ones, of two kinds (cached under
artifacts/bench/): "copies", perturbed and rescaled copies of the real vectors (tight clusters of
near-ties, hard for HNSW), and "gaussian", draws from a normal distribution with the real vectors'
mean and covariance (a spread-out catalogue of distinct products). Neither is real data, so the
benchmark reports both.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import httpx
import numpy as np
import polars as pl
import scipy.sparse as sp

from fedrec.atomic import atomic_dir, write_json, write_text
from fedrec.errors import FedrecError
from fedrec.serving.export_store import LoadedExport, load_export, next_version
from fedrec.serving.foldin import FoldInConfig, fold_in_many
from fedrec.serving.index import (
    AnyIndex,
    IndexParams,
    build_index,
    index_kind,
    ivfpq_lists,
    save_index,
    search_depth,
    search_index,
    set_search_depth,
)
from fedrec.serving.recommend import basket_vectors, served_index

K = 10


@dataclass(frozen=True)
class BenchConfig:
    export: str = "artifacts/synthetic/exports"
    merchant: str = "northwind"
    large_items: int = 1_000_000
    noise: float = 0.5  # perturbation of the copies, in units of each dimension's std
    large_kinds: tuple[str, ...] = ("copies", "gaussian")
    large_index: str = "ivfpq"  # the large catalogues' index: ivfpq (the export default), hnsw or ivf (MIPS-to-L2)
    hnsw_m: int = 48
    ef_construction: int = 500  # measured: 200 needed efSearch 512 for recall 0.95, 500 about 320
    ef_search: int = 128  # stored in an HNSW index
    nprobe: int = IndexParams.nprobe  # stored in an IVF index
    k_factor: int = IndexParams.k_factor  # stored in an ivfpq index (its nprobe starts at half the lists)
    depths: tuple[int, ...] = ()  # efSearch (hnsw) or nprobe (ivf, ivfpq) values to measure; () = DEPTHS[large_index]
    concurrencies: tuple[int, ...] = (1, 16, 64)
    duration_s: int = 10
    workers: int = 2
    recall_queries: int = 2000
    seed: int = 0
    cache_dir: str = "artifacts/bench"
    results: str = "results/bench-serve.json"
    basket_depth: int = 0  # the basket rows run at the serving setting; 0 = the export default
    soak_s: int = 300  # the mixed-load soak (CI runs a 20 s variant)
    soak_warmup_s: int = 10
    foldin_check_baskets: int = 40  # baskets whose served fold-in is compared with the full-catalogue solve


PARTS = ("customer", "basket", "soak")
DEPTHS = {"hnsw": (256, 320, 384), "ivf": (16, 32, 64), "ivfpq": (96, 128, 160)}  # ivfpq: of 256 lists at 1M
SERVING_DEPTH = {"hnsw": IndexParams.ef_search, "ivf": IndexParams.nprobe, "ivfpq": ivfpq_lists(1_000_000) // 2}


# ---- the synthetic large catalogue --------------------------------------------------------------


def large_catalogue_vectors(
    base: np.ndarray, n_items: int, noise: float, seed: int, kind: str = "copies"
) -> tuple[np.ndarray, np.ndarray]:
    """The base vectors, then generated rows (pure): "copies" perturbs and rescales random base
    rows; "gaussian" draws from N(mean, covariance) of the base rows.

    Returns the vectors and, for each row, a base row whose title and category it borrows.
    """
    rng = np.random.default_rng(seed)
    extra = n_items - base.shape[0]
    pick = rng.integers(0, base.shape[0], extra)
    if kind == "copies":
        scale = rng.uniform(0.8, 1.2, (extra, 1)).astype(np.float32)
        jitter = rng.standard_normal((extra, base.shape[1]), dtype=np.float32) * (noise * base.std(axis=0))
        new = base[pick] * scale + jitter
    elif kind == "gaussian":
        cov = np.cov(base.astype(np.float64), rowvar=False) + 1e-6 * np.eye(base.shape[1])
        new = base.mean(axis=0) + rng.standard_normal((extra, base.shape[1])) @ np.linalg.cholesky(cov).T
    else:
        raise ValueError(f"unknown catalogue kind {kind!r}; choose copies or gaussian")
    vectors = np.vstack([base, new]).astype(np.float32)
    return vectors, np.concatenate([np.arange(base.shape[0]), pick])


def write_large_export(base: LoadedExport, cfg: BenchConfig, kind: str = "copies") -> Path:
    """A complete export (plus the merchant's files) for the large catalogue; reused when cached."""
    knobs = {"hnsw": ("hnsw_m", "ef_construction", "ef_search"), "ivf": ("nprobe",), "ivfpq": ("k_factor",)}[
        cfg.large_index
    ]
    params = {k: getattr(cfg, k) for k in ("large_items", "noise", *knobs, "seed")}
    params["base_version"] = base.version
    suffix = "" if kind == "copies" else f"-{kind}"  # "copies" on HNSW keeps the cache name it always had
    if kind != "copies":
        params["kind"] = kind
    if cfg.large_index != "hnsw":
        params["index"] = cfg.large_index
    index_suffix = "" if cfg.large_index == "hnsw" else f"-{cfg.large_index}"
    root = Path(cfg.cache_dir) / f"catalogue{suffix}-{cfg.large_items}{index_suffix}"
    exports = root / "exports"
    card_path = exports / "v0001" / "model_card.json"
    if card_path.exists() and json.loads(card_path.read_text()).get("bench") == params:
        return exports
    shutil.rmtree(root, ignore_errors=True)
    print(f"building the {cfg.large_items:,}-item catalogue and its {cfg.large_index} index (cached)...", flush=True)
    vectors, source = large_catalogue_vectors(base.item_vectors, cfg.large_items, cfg.noise, cfg.seed, kind)
    n_base = base.n_items
    titles = base.metadata.get("title") or base.item_ids
    items = pl.DataFrame(
        {
            "item_index": np.arange(cfg.large_items, dtype=np.uint32),
            "item": base.item_ids + [f"X{i:07d}" for i in range(n_base, cfg.large_items)],
            "title": pl.Series(titles)[source].to_list(),
            "category": pl.Series(base.metadata.get("category") or [None] * n_base)[source].to_list(),
        }
    )
    start = time.perf_counter()
    knobs = IndexParams(
        nprobe=cfg.nprobe,
        hnsw_m=cfg.hnsw_m,
        ef_construction=cfg.ef_construction,
        ef_search=cfg.ef_search,
        k_factor=cfg.k_factor,
    )
    index = build_index(vectors, cfg.large_index, knobs)
    build_s = time.perf_counter() - start
    with atomic_dir(exports / "v0001") as tmp:
        np.save(tmp / "item_embeddings.npy", vectors)
        save_index(index, tmp / "index.faiss")
        items.write_parquet(tmp / "items.parquet")
        card = {
            "format": 1,
            "version": "v0001",
            "items": cfg.large_items,
            "dim": int(vectors.shape[1]),
            "index": index_kind(index),
            "dataset": f"synthetic {cfg.large_items:,}-item benchmark catalogue ({kind}) from export {base.version}",
            "index_build_seconds": round(build_s, 1),
            "bench": params,
            "config": base.card.get("config", {}),
        }
        write_json(tmp / "model_card.json", card)
    m = base.merchant
    with atomic_dir(root / "merchants" / m.name / "v0001") as tmp:
        np.save(tmp / "user_embeddings.npy", m.user_vectors)
        pl.DataFrame({"user": m.user_ids}).with_row_index("user_index").write_parquet(tmp / "users.parquet")
        p = m.purchased
        wide = sp.csr_matrix((p.data, p.indices, p.indptr), shape=(p.shape[0], cfg.large_items))
        sp.save_npz(tmp / "purchased.npz", wide)
    write_text(exports / "LATEST", "v0001\n")
    print(f"index built in {build_s:.0f} s", flush=True)
    return exports


# ---- FAISS alone ---------------------------------------------------------------------------------


def served_index_and_items(export: LoadedExport, queries: np.ndarray) -> tuple[AnyIndex, np.ndarray, np.ndarray]:
    """The index customer requests go to (the server's own rule, `recommend.served_index`), the
    vectors it holds, and the queries as the server sends them.

    With a merchant item bias that is the merchant's own [v, b] index, queried with [u, 1].
    """
    index, served_queries = served_index(export, queries)
    m = export.merchant
    items = export.item_vectors if index is export.index else np.hstack([export.item_vectors, m.item_bias[:, None]])
    return index, items, served_queries


def recall_vs_exact(index: AnyIndex, items: np.ndarray, queries: np.ndarray, k: int = K) -> float:
    """Mean overlap of the served index's top-k with exact inner-product top-k."""
    exact = faiss.IndexFlatIP(items.shape[1])
    exact.add(np.ascontiguousarray(items, dtype=np.float32))
    _, truth = exact.search(queries, k)
    _, found = search_index(index, queries, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(truth, found, strict=True)]))


def faiss_only_qps(index: AnyIndex, queries: np.ndarray, fetch: np.ndarray) -> float:
    """One query per call on one thread, as a worker does, with the same over-fetch for exclusions."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        start = time.perf_counter()
        for q, n in zip(queries, fetch, strict=True):
            search_index(index, q.reshape(1, -1), int(n), kept=K)
        return len(queries) / (time.perf_counter() - start)
    finally:
        faiss.omp_set_num_threads(threads)


# ---- HTTP load -------------------------------------------------------------------------------------

# Each request is {method, path, body}; wrk cycles through them. Status classes are counted per
# thread (wrk's `done` runs in another Lua state, so it reads them back through `thread:get`).
WRK_SCRIPT = """
local reqs = {%s}
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) counter = 0; s2 = 0; s4 = 0; s5 = 0; bad = 0 end
request = function()
  counter = counter + 1
  local r = reqs[(counter %% #reqs) + 1]
  if r.bad then bad = bad + 1 end
  if r.body then
    return wrk.format(r.method, r.path, {["Content-Type"] = "application/json"}, r.body)
  end
  return wrk.format(r.method, r.path)
end
response = function(status, headers, body)
  if status >= 500 then s5 = s5 + 1 elseif status >= 400 then s4 = s4 + 1 else s2 = s2 + 1 end
end
done = function(summary, latency, requests)
  local c2, c4, c5, b = 0, 0, 0, 0
  for _, t in ipairs(threads) do
    c2 = c2 + t:get("s2"); c4 = c4 + t:get("s4"); c5 = c5 + t:get("s5"); b = b + t:get("bad")
  end
  local e = summary.errors
  io.write(string.format('WRK_JSON {"requests": %%d, "duration_us": %%d, "errors": %%d, "socket_errors": %%d, ' ..
    '"http_2xx": %%d, "http_4xx": %%d, "http_5xx": %%d, "bad_sent": %%d, "p50_us": %%f, ' ..
    '"p95_us": %%f, "p99_us": %%f, "mean_us": %%f}\\n', summary.requests, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout, e.connect + e.read + e.write + e.timeout, c2, c4, c5, b,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.mean))
end
"""


@dataclass(frozen=True)
class Req:
    method: str
    path: str
    body: dict | None = None
    bad: bool = False  # sent on purpose to get a 4xx

    def lua(self) -> str:
        fields = [f"method = {json.dumps(self.method)}", f"path = {json.dumps(self.path)}"]
        if self.body is not None:
            fields.append(f"body = {json.dumps(json.dumps(self.body))}")
        if self.bad:
            fields.append("bad = true")
        return "{" + ", ".join(fields) + "}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    exports: Path,
    merchant: str,
    workers: int,
    port: int,
    depth: dict[str, int] | None = None,
    watch_interval: float = 0,
) -> subprocess.Popen:
    """The server as its own process group; `depth` ({"nprobe": n} or {"ef_search": n}) overrides the export's."""
    cmd = [
        sys.executable, "-m", "fedrec.training.cli", "serve", "--export", str(exports), "--merchant", merchant,
        "--port", str(port), "--workers", str(workers), "--watch-interval", str(watch_interval),
        "--log-level", "warning",
    ]  # fmt: skip
    for name, value in (depth or {}).items():
        cmd += [f"--{name.replace('_', '-')}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FedrecError(f"the server exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                time.sleep(2 if workers == 1 else 5)  # let every worker finish loading
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise FedrecError("the server did not become ready within 10 minutes")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def run_wrk(base_url: str, requests: list[Req], concurrency: int, duration_s: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT % ", ".join(r.lua() for r in requests))
        script = f.name
    try:
        cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{duration_s}s", "--timeout", "5s", "-s", script, base_url]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(script)
    line = next(x for x in out.splitlines() if x.startswith("WRK_JSON "))
    return json.loads(line.removeprefix("WRK_JSON "))


def customer_requests(export: LoadedExport, order: np.ndarray) -> list[Req]:
    m = export.merchant
    return [Req("GET", f"/v1/merchants/{m.name}/customers/{m.user_ids[u]}/recommendations?k={K}") for u in order]


def basket_requests(export: LoadedExport, order: np.ndarray, seed: int) -> list[Req]:
    """Anonymous baskets as a shop sees them: 1 to 5 items a customer bought (drawn, seeded)."""
    rng = np.random.default_rng(seed)
    p = export.merchant.purchased
    out = []
    for u in order:
        bought = p.indices[p.indptr[u] : p.indptr[u + 1]]
        if len(bought):
            pick = rng.choice(bought, size=min(len(bought), int(rng.integers(1, 6))), replace=False)
            out.append(Req("POST", "/v1/recommendations", {"items": [export.item_ids[i] for i in pick], "k": K}))
    return out


def foldin_agreement(export: LoadedExport, baskets: list[Req], cfg: FoldInConfig, k: int = K) -> float:
    """For baskets on a large catalogue: mean overlap of the top-k (basket left out) from the served
    fold-in with the top-k from the exact solve over the whole catalogue (about 0.25 s a basket)."""
    temperature = export.temperature
    bias = export.merchant.item_bias if export.merchant is not None else None
    rows = [np.array([export.item_rows[i] for i in r.body["items"]]) for r in baskets]
    served = basket_vectors(export, rows, cfg)
    full = np.vstack(  # 4 baskets at a time: each holds a softmax over the whole catalogue
        [fold_in_many(export.item_vectors, rows[i : i + 4], "softmax", cfg.reg, temperature, item_bias=bias)
         for i in range(0, len(rows), 4)]
    )  # fmt: skip
    exact = faiss.IndexFlatIP(export.dim)
    exact.add(export.item_vectors)

    def top(vectors: np.ndarray) -> list[set]:
        _, found = exact.search(np.ascontiguousarray(vectors, dtype=np.float32), k + 5)
        return [set([x for x in f if x not in set(r.tolist())][:k]) for f, r in zip(found, rows, strict=True)]

    return float(np.mean([len(a & b) / k for a, b in zip(top(served), top(full), strict=True)]))


ENDPOINTS = {
    "customer": "GET /v1/merchants/{merchant}/customers/{customer}/recommendations?k=10",
    "basket": "POST /v1/recommendations (1-5 items a customer bought, k=10)",
}


# ---- one catalogue, all concurrencies --------------------------------------------------------------


def bench_catalogue(
    name: str,
    exports: Path,
    cfg: BenchConfig,
    meta: dict,
    depth: int | None = None,
    endpoint: str = "customer",
) -> list[dict]:
    """Recall and FAISS-only speed (customer queries), then wrk at each concurrency against a
    fresh server, on one endpoint: "customer" (known customers) or "basket" (anonymous baskets)."""
    export = load_export(exports, cfg.merchant)
    set_search_depth(export.index, nprobe=depth, ef_search=depth)
    m = export.merchant
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(m.user_ids))
    recall = qps = old_rule = None
    if endpoint == "customer":
        queries = m.user_vectors[order[: cfg.recall_queries]]
        fetch = np.minimum(K + m.purchased.getnnz(axis=1)[order[: cfg.recall_queries]], export.n_items)
        index, items, served_queries = served_index_and_items(export, queries)
        recall = recall_vs_exact(index, items, served_queries)
        qps = faiss_only_qps(index, served_queries, fetch)
        print(f"{name}: {export.n_items:,} items, {export.kind} index {search_depth(export.index) or ''}, "
              f"recall@10 vs exact {recall:.4f}, FAISS alone {qps:,.0f} queries/s", flush=True)  # fmt: skip
        requests = customer_requests(export, order)
    elif endpoint == "basket":
        requests = basket_requests(export, order, cfg.seed)
        if export.n_items > FoldInConfig().full_items:
            recall = foldin_agreement(export, requests[: cfg.foldin_check_baskets], FoldInConfig())
            old_rule = foldin_agreement(
                export, requests[: cfg.foldin_check_baskets], FoldInConfig(candidates=5_000, sample=0)
            )
            print(f"{name}: top-10 of the served fold-in vs the full-catalogue solve {recall:.3f} "
                  f"(5,000 nearest items alone: {old_rule:.3f})", flush=True)  # fmt: skip
    else:
        raise ValueError(f"unknown endpoint {endpoint!r}; choose one of {sorted(ENDPOINTS)}")
    info = {
        "endpoint": endpoint,
        "request": ENDPOINTS[endpoint],
        "catalogue": name,
        "catalogue_size": export.n_items,
        "index": export.kind,
        "export_version": export.version,
    }
    served_depth = search_depth(export.index)
    info.update(served_depth)
    if export.kind == "hnsw":
        info.update(hnsw_m=cfg.hnsw_m)
    del export
    port = free_port()
    proc = start_server(exports, cfg.merchant, cfg.workers, port, served_depth)
    runs = []
    try:
        base_url = f"http://127.0.0.1:{port}"
        run_wrk(base_url, requests, 16, 2)  # warm-up
        for c in cfg.concurrencies:
            r = run_wrk(base_url, requests, c, cfg.duration_s)
            seconds = r["duration_us"] / 1e6
            run = {
                **info,
                "concurrency": c,
                "workers": cfg.workers,
                "duration_s": round(seconds, 2),
                "requests": r["requests"],
                "rps": round(r["requests"] / seconds, 1),
                "p50_ms": round(r["p50_us"] / 1000, 3),
                "p95_ms": round(r["p95_us"] / 1000, 3),
                "p99_ms": round(r["p99_us"] / 1000, 3),
                "mean_ms": round(r["mean_us"] / 1000, 3),
                "errors": r["errors"],
                "http_5xx": r["http_5xx"],
                "recall_at_10_vs_exact": None if recall is None else round(recall, 4),
                **(
                    {"foldin_5000_nearest_only_vs_exact": round(old_rule, 4)} if endpoint == "basket" and recall else {}
                ),
                "faiss_only_qps": None if qps is None else round(qps, 1),
                "faiss_only_ms": None if qps is None else round(1000 / qps, 4),
                **meta,
            }
            print(f"  {endpoint} c={c:>3}: {run['rps']:>8,.0f} req/s  p50 {run['p50_ms']:.2f} ms  "
                  f"p95 {run['p95_ms']:.2f} ms  p99 {run['p99_ms']:.2f} ms  errors {run['errors']}",
                  flush=True)  # fmt: skip
            runs.append(run)
    finally:
        stop_server(proc)
    return runs


# ---- soak: a long mixed load with a hot reload in the middle ----------------------------------------


def mixed_requests(export: LoadedExport, order: np.ndarray, seed: int, n: int = 5000, bad_every: int = 50) -> list[Req]:
    """Known customers 40%, baskets 30%, similar items 15%, catalogue search 15%; every
    `bad_every`-th request is a bad one (unknown item or customer, k out of range, broken JSON)."""
    rng = np.random.default_rng(seed)
    customers = customer_requests(export, order)
    baskets = basket_requests(export, order, seed)
    titles = export.metadata.get("title") or export.item_ids
    bad = [
        Req("GET", "/v1/items/NO-SUCH-ITEM/similar?k=10", bad=True),
        Req("GET", f"/v1/merchants/{export.merchant.name}/customers/NO-SUCH-CUSTOMER/recommendations", bad=True),
        Req("GET", f"/v1/items/{export.item_ids[0]}/similar?k=0", bad=True),
        Req("POST", "/v1/recommendations", {"items": [], "k": 10}, bad=True),
        Req("POST", "/v1/recommendations", {"items": ["NO-SUCH-ITEM"], "k": 10}, bad=True),
    ]
    out = []
    for i in range(n):
        if (i + 1) % bad_every == 0:
            out.append(bad[(i // bad_every) % len(bad)])
            continue
        kind = rng.choice(4, p=[0.4, 0.3, 0.15, 0.15])
        if kind == 0:
            out.append(customers[i % len(customers)])
        elif kind == 1:
            out.append(baskets[i % len(baskets)])
        elif kind == 2:
            out.append(Req("GET", f"/v1/items/{export.item_ids[rng.integers(export.n_items)]}/similar?k={K}"))
        else:
            word = str(titles[rng.integers(len(titles))]).split()[-1].lower()
            out.append(Req("GET", f"/v1/items?q={word}&limit=20"))
    return out


def process_group_rss_mb(pgid: int) -> float:
    """Resident memory of every process in a process group (the server and its workers)."""
    total_kb = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:
                continue
            status = (stat.parent / "status").read_text()
        except (OSError, IndexError, ValueError):
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total_kb += int(line.split()[1])
    return total_kb / 1024


def publish_copy_of_latest(exports: Path, merchant: str) -> str:
    """A new export version (a copy of the newest, renamed) and the merchant's files for it, then
    LATEST: what a training run does, so the server's watcher hot-reloads mid-load."""
    current = (exports / "LATEST").read_text().strip()
    version = next_version(exports)
    mroot = exports.parent / "merchants" / merchant
    with atomic_dir(mroot / version) as tmp:
        for f in (mroot / current).iterdir():
            shutil.copy2(f, tmp / f.name)
    with atomic_dir(exports / version) as tmp:
        for f in (exports / current).iterdir():
            shutil.copy2(f, tmp / f.name)
        card = json.loads((tmp / "model_card.json").read_text())
        card["version"] = version
        write_json(tmp / "model_card.json", card)
    write_text(exports / "LATEST", version + "\n")
    return version


def soak(cfg: BenchConfig, meta: dict) -> dict:
    """`cfg.soak_s` seconds of mixed load at concurrency 16 on a copy of the shipped export, a new
    export published halfway; RSS of the server's processes after warm-up and at the end."""
    source = Path(cfg.export)
    current = (source / "LATEST").read_text().strip()
    with tempfile.TemporaryDirectory(prefix="fedrec-soak-") as tmp:
        exports = Path(tmp) / "exports"
        shutil.copytree(source / current, exports / current)
        shutil.copytree(
            source.parent / "merchants" / cfg.merchant / current, Path(tmp) / "merchants" / cfg.merchant / current
        )
        write_text(exports / "LATEST", current + "\n")
        export = load_export(exports, cfg.merchant)
        order = np.random.default_rng(cfg.seed).permutation(len(export.merchant.user_ids))
        requests = mixed_requests(export, order, cfg.seed)
        del export
        port = free_port()
        proc = start_server(exports, cfg.merchant, cfg.workers, port, None, watch_interval=1.0)
        base_url = f"http://127.0.0.1:{port}"
        try:
            run_wrk(base_url, requests, 16, cfg.soak_warmup_s)
            rss_start = process_group_rss_mb(proc.pid)
            samples: list[float] = []
            published: dict = {}

            def background() -> None:
                t0 = time.monotonic()
                while time.monotonic() - t0 < cfg.soak_s:
                    if not published and time.monotonic() - t0 >= cfg.soak_s / 2:
                        published["version"] = publish_copy_of_latest(exports, cfg.merchant)
                        published["at_s"] = round(time.monotonic() - t0, 1)
                    samples.append(process_group_rss_mb(proc.pid))
                    time.sleep(1.0)

            watcher = threading.Thread(target=background, daemon=True)
            watcher.start()
            r = run_wrk(base_url, requests, 16, cfg.soak_s)
            watcher.join(timeout=10)
            rss_end = process_group_rss_mb(proc.pid)
            served = {httpx.get(f"{base_url}/readyz", timeout=5).json().get("version") for _ in range(8)}
        finally:
            stop_server(proc)
    seconds = r["duration_us"] / 1e6
    row = {
        "endpoint": "mixed",
        "request": "40% customers, 30% baskets, 15% similar items, 15% catalogue search; every 50th a bad request",
        "catalogue": "shipped export",
        "concurrency": 16,
        "workers": cfg.workers,
        "duration_s": round(seconds, 2),
        "warmup_s": cfg.soak_warmup_s,
        "requests": r["requests"],
        "rps": round(r["requests"] / seconds, 1),
        "p50_ms": round(r["p50_us"] / 1000, 3),
        "p99_ms": round(r["p99_us"] / 1000, 3),
        "http_2xx": r["http_2xx"],
        "http_4xx": r["http_4xx"],
        "http_5xx": r["http_5xx"],
        "bad_requests_sent": r["bad_sent"],
        "socket_errors": r["socket_errors"],
        "reload": {
            "from": current,
            "to": published.get("version"),
            "at_s": published.get("at_s"),
            "served_after": sorted(v for v in served if v),
        },  # fmt: skip
        "rss_start_mb": round(rss_start, 1),
        "rss_end_mb": round(rss_end, 1),
        "rss_max_mb": round(max(samples, default=rss_end), 1),
        "rss_growth_pct": round(100 * (rss_end - rss_start) / rss_start, 2) if rss_start else None,
        **{k: v for k, v in meta.items() if k != "load_generator"},
        "load_generator": meta.get("load_generator", "").split(",")[0] + f", 1 thread, {cfg.soak_s} s",
    }
    print(f"soak: {row['rps']:,.0f} req/s, p99 {row['p99_ms']:.1f} ms, 4xx {row['http_4xx']} "
          f"(bad sent {row['bad_requests_sent']}), 5xx {row['http_5xx']}, socket errors {row['socket_errors']}, "
          f"reload {current} -> {row['reload']['to']} at {row['reload']['at_s']} s, RSS {row['rss_start_mb']} -> "
          f"{row['rss_end_mb']} MB ({row['rss_growth_pct']}%)", flush=True)  # fmt: skip
    return row


# ---- report ------------------------------------------------------------------------------------------


def markdown(runs: list[dict]) -> str:
    out = []
    for endpoint in ("customer", "basket"):
        rows = [r for r in runs if r.get("endpoint", "customer") == endpoint]
        if not rows:
            continue
        out.append(
            f"{ENDPOINTS[endpoint]}\n\n"
            "| catalogue | items | index | concurrency | req/s | p50 ms | p95 ms | p99 ms | errors "
            "| recall@10 vs exact | FAISS alone q/s |\n|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
            + "\n".join(
                f"| {r['catalogue']} | {r['catalogue_size']:,} "
                f"| {r['index']}{' ef ' + str(r['ef_search']) if 'ef_search' in r else ''}"
                f"{' nprobe ' + str(r['nprobe']) if 'nprobe' in r else ''} "
                f"| {r['concurrency']} | {r['rps']:,.0f} "
                f"| {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} "
                f"| {_num(r.get('recall_at_10_vs_exact'), '.4f')} | {_num(r.get('faiss_only_qps'), ',.0f')} |"
                for r in rows
            )
            + "\n"
        )
    for r in (r for r in runs if r.get("endpoint") == "mixed"):
        out.append(
            f"Soak ({r['request']}), concurrency {r['concurrency']}, {r['workers']} workers, "
            f"{r['duration_s']:.0f} s after {r['warmup_s']} s warm-up: {r['rps']:,.0f} req/s, "
            f"p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms; "
            f"{r['http_2xx']} 2xx, {r['http_4xx']} 4xx ({r['bad_requests_sent']} bad requests sent), "
            f"{r['http_5xx']} 5xx, {r['socket_errors']} socket errors; hot reload {r['reload']['from']} -> "
            f"{r['reload']['to']} at {r['reload']['at_s']} s (serving {', '.join(r['reload']['served_after'])} after); "
            f"RSS {r['rss_start_mb']} MB after warm-up, {r['rss_end_mb']} MB at the end "
            f"({r['rss_growth_pct']:+.2f}%), at most {r['rss_max_mb']} MB.\n"
        )
    return "\n".join(out)


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def merge_runs(old: list[dict], new: list[dict]) -> list[dict]:
    """Rows of a partial run replace the rows they re-measure; the others stay, each with its date."""

    def normalised(r: dict) -> dict:
        endpoint = r.get("endpoint", "customer")
        if endpoint in (*ENDPOINTS, "mixed"):
            return {**r, "endpoint": endpoint}
        # rows from before basket rows existed: only known customers were measured, and their
        # `endpoint` held the request line
        return {**r, "endpoint": "customer", "request": endpoint}

    def key(r: dict) -> tuple:
        return (
            r["endpoint"],
            r.get("catalogue"),
            r.get("index"),
            r.get("ef_search"),
            r.get("nprobe"),
            r.get("concurrency"),
        )

    fresh = {key(r) for r in new}
    kept = [r for r in map(normalised, old) if key(r) not in fresh]
    return kept + new


def main(cfg: BenchConfig | None = None, parts: tuple[str, ...] = PARTS) -> list[dict]:
    cfg = cfg or BenchConfig()
    if shutil.which("wrk") is None:
        raise FedrecError("wrk is not installed: `apt-get install wrk` (Debian) or `brew install wrk`")
    if cfg.large_index not in DEPTHS:
        raise FedrecError(f"LARGE_INDEX={cfg.large_index}: choose one of {', '.join(DEPTHS)}")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise FedrecError(f"unknown bench part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    meta = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_generator": f"{wrk_version.split(' [')[0]}, 1 thread, {cfg.duration_s} s per run",
        "command": "make bench-serve"
        + ("" if parts == PARTS else f" PARTS={','.join(parts)}")
        + ("" if cfg.large_index == BenchConfig.large_index else f" LARGE_INDEX={cfg.large_index}"),
    }
    base = load_export(Path(cfg.export), cfg.merchant)
    kinds = cfg.large_kinds if {"customer", "basket"} & set(parts) else ()
    large = {kind: write_large_export(base, cfg, kind) for kind in kinds}
    del base
    runs: list[dict] = []
    if "customer" in parts:
        runs += bench_catalogue("shipped export", Path(cfg.export), cfg, meta)
        for kind, exports in large.items():
            for depth in cfg.depths or DEPTHS[cfg.large_index]:
                runs += bench_catalogue(f"{cfg.large_items // 1_000_000}M {kind}", exports, cfg, meta, depth)
    if "basket" in parts:
        runs += bench_catalogue("shipped export", Path(cfg.export), cfg, meta, endpoint="basket")
        depth = cfg.basket_depth or SERVING_DEPTH[cfg.large_index]
        for kind, exports in large.items():
            runs += bench_catalogue(f"{cfg.large_items // 1_000_000}M {kind}", exports, cfg, meta, depth, "basket")
    if "soak" in parts:
        runs.append(soak(cfg, meta))
    results = Path(cfg.results)
    old = json.loads(results.read_text()) if results.is_file() else []
    runs = merge_runs(old, runs)
    write_json(results, runs)
    write_text(results.with_suffix(".md"), markdown(runs))
    print(f"\n{markdown(runs)}\nwritten: {results} and {results.with_suffix('.md')}  (config: {asdict(cfg)})")
    return runs


if __name__ == "__main__":
    try:
        chosen = tuple(p for p in os.environ.get("PARTS", ",".join(PARTS)).split(",") if p)
        config = BenchConfig(
            soak_s=int(os.environ.get("SOAK_S", BenchConfig.soak_s)),
            large_index=os.environ.get("LARGE_INDEX") or BenchConfig.large_index,
        )
        main(config, chosen)
    except FedrecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
