"""`make bench-serve`: load-test `fedrec serve` from a second process and time FAISS alone.

For each catalogue (the shipped export, and a synthetic 1,000,000-item catalogue on HNSW) it
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
from fedrec.serving.export_store import LoadedExport, load_export
from fedrec.serving.index import build_index, index_kind, save_index

K = 10


@dataclass(frozen=True)
class BenchConfig:
    export: str = "artifacts/synthetic/exports"
    merchant: str = "northwind"
    large_items: int = 1_000_000
    noise: float = 0.5  # perturbation of the copies, in units of each dimension's std
    large_kinds: tuple[str, ...] = ("copies", "gaussian")
    hnsw_m: int = 48
    ef_construction: int = 500  # measured: 200 needed efSearch 512 for recall 0.95, 500 about 320
    ef_search: int = 128  # stored in the index
    ef_searches: tuple[int, ...] = (256, 320, 384)  # search depths measured on the HNSW catalogues
    concurrencies: tuple[int, ...] = (1, 16, 64)
    duration_s: int = 10
    workers: int = 2
    recall_queries: int = 2000
    seed: int = 0
    cache_dir: str = "artifacts/bench"
    results: str = "results/bench-serve.json"


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
    params = {k: getattr(cfg, k) for k in ("large_items", "noise", "hnsw_m", "ef_construction", "ef_search", "seed")}
    params["base_version"] = base.version
    suffix = "" if kind == "copies" else f"-{kind}"  # "copies" keeps the cache name it always had
    if kind != "copies":
        params["kind"] = kind
    root = Path(cfg.cache_dir) / f"catalogue{suffix}-{cfg.large_items}"
    exports = root / "exports"
    card_path = exports / "v0001" / "model_card.json"
    if card_path.exists() and json.loads(card_path.read_text()).get("bench") == params:
        return exports
    shutil.rmtree(root, ignore_errors=True)
    print(f"building the {cfg.large_items:,}-item catalogue and its HNSW index (cached afterwards)...", flush=True)
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
    index = build_index(vectors, "hnsw", cfg.hnsw_m, cfg.ef_construction, cfg.ef_search)
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


def served_index(export: LoadedExport, queries: np.ndarray) -> tuple[faiss.Index, np.ndarray, np.ndarray]:
    """The index customer requests go to, its vectors, and the queries as the server sends them.

    With a merchant item bias that is the merchant's own [v, b] index, queried with [u, 1].
    """
    m = export.merchant
    if m is None or m.index is None:
        return export.index, export.item_vectors, queries
    items = np.hstack([export.item_vectors, m.item_bias[:, None]])
    return m.index, items, np.hstack([queries, np.ones((len(queries), 1), np.float32)])


def recall_vs_exact(index: faiss.Index, items: np.ndarray, queries: np.ndarray, k: int = K) -> float:
    """Mean overlap of the served index's top-k with exact inner-product top-k."""
    exact = faiss.IndexFlatIP(items.shape[1])
    exact.add(np.ascontiguousarray(items, dtype=np.float32))
    _, truth = exact.search(queries, k)
    _, found = index.search(queries, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(truth, found, strict=True)]))


def faiss_only_qps(index: faiss.Index, queries: np.ndarray, fetch: np.ndarray) -> float:
    """One query per call on one thread, as a worker does, with the same over-fetch for exclusions."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        start = time.perf_counter()
        for q, n in zip(queries, fetch, strict=True):
            index.search(q.reshape(1, -1), int(n))
        return len(queries) / (time.perf_counter() - start)
    finally:
        faiss.omp_set_num_threads(threads)


# ---- HTTP load -------------------------------------------------------------------------------------

WRK_SCRIPT = """
local paths = {%s}
local counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", paths[(counter %% #paths) + 1])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRK_JSON {"requests": %%d, "duration_us": %%d, "errors": %%d, "p50_us": %%f, ' ..
    '"p95_us": %%f, "p99_us": %%f, "mean_us": %%f}\\n', summary.requests, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.mean))
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(exports: Path, merchant: str, workers: int, port: int, ef_search: int | None) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "fedrec.training.cli", "serve", "--export", str(exports), "--merchant", merchant,
        "--port", str(port), "--workers", str(workers), "--watch-interval", "0", "--log-level", "warning",
    ]  # fmt: skip
    if ef_search is not None:
        cmd += ["--ef-search", str(ef_search)]
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


def run_wrk(base_url: str, paths: list[str], concurrency: int, duration_s: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT % ", ".join(json.dumps(p) for p in paths))
        script = f.name
    try:
        cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{duration_s}s", "--timeout", "5s", "-s", script, base_url]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(script)
    line = next(x for x in out.splitlines() if x.startswith("WRK_JSON "))
    return json.loads(line.removeprefix("WRK_JSON "))


# ---- one catalogue, all concurrencies --------------------------------------------------------------


def bench_catalogue(name: str, exports: Path, cfg: BenchConfig, meta: dict, ef_search: int | None = None) -> list[dict]:
    """Recall and FAISS-only speed, then wrk at each concurrency against a fresh server."""
    export = load_export(exports, cfg.merchant)
    if ef_search is not None and export.kind == "hnsw":
        faiss.downcast_index(export.index.index).hnsw.efSearch = ef_search
    m = export.merchant
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(m.user_ids))
    queries = m.user_vectors[order[: cfg.recall_queries]]
    fetch = np.minimum(K + m.purchased.getnnz(axis=1)[order[: cfg.recall_queries]], export.n_items)
    index, items, served_queries = served_index(export, queries)
    recall = recall_vs_exact(index, items, served_queries)
    qps = faiss_only_qps(index, served_queries, fetch)
    print(f"{name}: {export.n_items:,} items, {export.kind} index (ef_search {ef_search}), "
          f"recall@10 vs exact {recall:.4f}, FAISS alone {qps:,.0f} queries/s", flush=True)  # fmt: skip
    paths = [f"/v1/merchants/{m.name}/customers/{m.user_ids[u]}/recommendations?k={K}" for u in order]
    info = {"catalogue": name, "catalogue_size": export.n_items, "index": export.kind, "export_version": export.version}
    if export.kind == "hnsw":
        hnsw = faiss.downcast_index(export.index.index).hnsw
        info.update(hnsw_m=cfg.hnsw_m, ef_search=int(hnsw.efSearch))
    export_kind = export.kind
    del export
    port = free_port()
    proc = start_server(exports, cfg.merchant, cfg.workers, port, ef_search if export_kind == "hnsw" else None)
    runs = []
    try:
        base_url = f"http://127.0.0.1:{port}"
        run_wrk(base_url, paths, 16, 2)  # warm-up
        for c in cfg.concurrencies:
            r = run_wrk(base_url, paths, c, cfg.duration_s)
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
                "recall_at_10_vs_exact": round(recall, 4),
                "faiss_only_qps": round(qps, 1),
                "faiss_only_ms": round(1000 / qps, 4),
                **meta,
            }
            print(f"  c={c:>3}: {run['rps']:>8,.0f} req/s  p50 {run['p50_ms']:.2f} ms  p95 {run['p95_ms']:.2f} ms  "
                  f"p99 {run['p99_ms']:.2f} ms  errors {run['errors']}", flush=True)  # fmt: skip
            runs.append(run)
    finally:
        stop_server(proc)
    return runs


def markdown(runs: list[dict]) -> str:
    head = (
        "| catalogue | items | index | concurrency | req/s | p50 ms | p95 ms | p99 ms | errors "
        "| recall@10 vs exact | FAISS alone q/s |\n|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = [
        f"| {r['catalogue']} | {r['catalogue_size']:,} "
        f"| {r['index']}{' ef ' + str(r['ef_search']) if 'ef_search' in r else ''} "
        f"| {r['concurrency']} | {r['rps']:,.0f} "
        f"| {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} "
        f"| {r['recall_at_10_vs_exact']:.4f} | {r['faiss_only_qps']:,.0f} |"
        for r in runs
    ]
    return head + "\n".join(rows) + "\n"


def main(cfg: BenchConfig | None = None) -> list[dict]:
    cfg = cfg or BenchConfig()
    if shutil.which("wrk") is None:
        raise FedrecError("wrk is not installed: `apt-get install wrk` (Debian) or `brew install wrk`")
    wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    meta = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_generator": f"{wrk_version.split(' [')[0]}, 1 thread, {cfg.duration_s} s per run",
        "endpoint": "GET /v1/merchants/{merchant}/customers/{customer}/recommendations?k=10",
        "command": "make bench-serve",
    }
    base = load_export(Path(cfg.export), cfg.merchant)
    large = {kind: write_large_export(base, cfg, kind) for kind in cfg.large_kinds}
    del base
    runs = bench_catalogue("shipped export", Path(cfg.export), cfg, meta)
    for kind, exports in large.items():
        for ef in cfg.ef_searches:
            runs += bench_catalogue(f"{cfg.large_items // 1_000_000}M {kind}", exports, cfg, meta, ef)
    results = Path(cfg.results)
    write_json(results, runs)
    write_text(results.with_suffix(".md"), markdown(runs))
    print(f"\n{markdown(runs)}\nwritten: {results} and {results.with_suffix('.md')}  (config: {asdict(cfg)})")
    return runs


if __name__ == "__main__":
    try:
        main()
    except FedrecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
