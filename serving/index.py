"""FAISS indexes over item embeddings for top-k inner product: exact (flat) for small catalogues,
IVF-PQ fast-scan with exact re-ranking ("ivfpq") for large ones, and two options: HNSW on inner
product, and IVF on the MIPS-to-L2 reduction.

FAISS ids are catalogue row numbers (an IndexIDMap2), so a search result maps straight to a
row of the export's items table whatever the index type.

The IVF option: the MIPS-to-L2 reduction (Bachrach et al., RecSys 2014) stores each item x as
[x, sqrt(M^2 - |x|^2)], with M the longest item's norm, and each query q as [q, 0]; every stored
vector then has norm M, so the L2 ranking of the items is exactly their inner-product ranking, and
IVF-Flat scores the probed lists exactly. Lists are picked by inner product with their centroid
(an IP coarse quantizer): by L2, a query about 6x shorter than the items ranks centroids mostly by
their own norm (measured: 0.33 against 0.53 recall@10 at nprobe 32 on the "gaussian" benchmark
catalogue). It builds in about 90 s at 1M (HNSW: 10 to 20 minutes) and finds the whole exact
top-10 on the clustered "copies" catalogue at the serving target, but on "gaussian" its lists are
very unequal, and it is slower than HNSW at similar recall (README, bench-serve).
The ivfpq option scores half the inverted lists with 4-bit product-quantised codes (FAISS's
SIMD "fast-scan", 2 dimensions per sub-quantiser) and re-ranks the best `k_factor` (128) x k of
them with the exact vectors (IndexRefineFlat); k counts the results kept, not the over-fetch for a
customer's purchases (`search_index`). It scans far more of the catalogue than HNSW or IVF-Flat,
but each code costs a few table look-ups, so on a spread-out catalogue, where graph and partition
search lose the top items, it still finds them; it builds in seconds (HNSW: 10 to 20 minutes at 1M),
which also matters for the merchant's own [v, b] index, built at every load. With the customer
searches batched (serving/search_batcher.py) it meets the 1M serving target on both benchmark
catalogues, where HNSW is as exact only on the clustered one (README, bench-serve), so "auto"
picks ivfpq. HNSW on the MIPS-to-L2 reduction was tried too (not an option): on 200,000 items of
the spread-out catalogue it found 0.53 of the top-10 at efSearch 1,024. FAISS does it all: the file
is IndexIDMap2(IndexPreTransform(zero padding to an even width, IndexRefineFlat(IVFPQFastScan))).
`MipsIndex` does the query side and turns distances back into inner products; the file on disk
is a plain FAISS L2 index (its M is read back from any stored row).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from fedrec.atomic import write_with
from fedrec.index_kinds import INDEX_KINDS


class MipsIndex:
    """Top-k inner product through an L2 index of [x, sqrt(M^2 - |x|^2)] (queries get a 0 appended).

    Scores come back as inner products, (|q|^2 + M^2 - distance) / 2, so callers cannot tell it
    from an inner-product index: same `search`, `d`, `ntotal` and `metric_type`.
    """

    def __init__(self, inner: faiss.Index, max_norm: float) -> None:
        self.inner = inner
        self.max_norm = float(max_norm)
        self.d = inner.d - 1
        self.ntotal = inner.ntotal
        self.metric_type = faiss.METRIC_INNER_PRODUCT

    @classmethod
    def build(cls, vectors: np.ndarray, base: faiss.Index, train: int = 0, seed: int = 0) -> MipsIndex:
        """Adds the augmented `vectors` to `base` (an empty L2 index of dimension d + 1), first
        training it on `train` of them drawn with `seed` when it needs training (IVF)."""
        norms2 = np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64)
        m2 = float(norms2.max()) if len(norms2) else 0.0
        extra = np.sqrt(np.maximum(m2 - norms2, 0.0)).astype(np.float32)[:, None]
        data = np.ascontiguousarray(np.hstack([vectors, extra]))
        if not base.is_trained:
            rows = np.random.default_rng(seed).choice(len(data), size=min(train or len(data), len(data)), replace=False)
            base.train(data[np.sort(rows)])
        inner = faiss.IndexIDMap2(base)
        inner.add_with_ids(data, np.arange(len(vectors), dtype=np.int64))
        if isinstance(base, faiss.IndexIVF):
            base.make_direct_map()  # so a loaded index can read M back from a stored row
        return cls(inner, np.sqrt(m2))

    @classmethod
    def from_l2(cls, inner: faiss.Index) -> MipsIndex:
        """Wraps a saved augmented index; every stored vector has norm M, so one row gives it back.

        Raises ValueError for an L2 index whose rows differ in norm (not this reduction): its
        distances would turn into wrong inner products."""
        if inner.ntotal == 0:
            return cls(inner, 0.0)
        ids = faiss.vector_to_array(inner.id_map) if hasattr(inner, "id_map") else np.arange(inner.ntotal)
        try:
            norms = [float(np.linalg.norm(inner.reconstruct(int(i)))) for i in ids[[0, len(ids) // 2, -1]]]
        except RuntimeError as exc:  # e.g. an IVF saved without its direct map
            raise ValueError(f"an L2 index whose rows cannot be read back ({str(exc).splitlines()[0]})") from None
        if not np.allclose(norms, norms[0], rtol=1e-3):
            raise ValueError(f"an L2 index that is not the MIPS reduction (row norms {norms} differ)")
        return cls(inner, norms[0])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Each query is rescaled to norm M first: the ranking of x . q does not change, but a
        query much shorter than the items would lose its inner products to float32 rounding in
        |q|^2 + M^2 - distance (measured: a query 1,000x shorter misranked near-ties)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        norms = np.sqrt(np.einsum("ij,ij->i", queries, queries, dtype=np.float64))[:, None]
        scale = np.ones_like(norms)  # a zero query (or an empty index) is searched as it is
        usable = (norms > 0) & (self.max_norm > 0)
        scale[usable] = self.max_norm / norms[usable]
        padded = np.hstack([queries * scale, np.zeros((queries.shape[0], 1))]).astype(np.float32)
        dist, ids = self.inner.search(padded, k)
        # |x' - s q'|^2 = M^2 + s^2 |q|^2 - 2 s x . q
        scores = ((self.max_norm**2 + (scale * norms) ** 2 - dist) / (2 * scale)).astype(np.float32)
        return np.where(ids >= 0, scores, -np.inf).astype(np.float32), ids


AnyIndex = faiss.Index | MipsIndex


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (a zero row stays zero), float32: inner product between them is cosine."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


LARGE_THRESHOLD = 100_000  # catalogues this large get ivfpq under index = "auto"
KINDS = INDEX_KINDS  # one list: the config validates against it too


def choose_kind(n_items: int, kind: str = "auto") -> str:
    if kind == "auto":
        return "ivfpq" if n_items >= LARGE_THRESHOLD else "flat"
    if kind not in KINDS:
        raise ValueError(f"unknown index type {kind!r}; choose one of {', '.join(KINDS)} or auto")
    return kind


def ivf_lists(n_items: int) -> int:
    """About 4 sqrt(n) inverted lists, a power of two (FAISS's guideline; 4,096 at 1M)."""
    return int(2 ** round(np.log2(max(4 * np.sqrt(n_items), 1))))


def ivfpq_lists(n_items: int) -> int:
    """About sqrt(n) / 4 lists, a power of two (256 at 1M): ivfpq probes half of them, so the lists
    only prune, and fewer, larger lists keep the fast-scan blocks full (a trial at 1M, half the
    lists probed: 1,024 lists found 0.01 to 0.02 more of the top-10 than 256, and were slower)."""
    return int(2 ** round(np.log2(max(np.sqrt(n_items) / 4, 1))))


@dataclass(frozen=True)
class IndexParams:
    """Search-quality knobs. HNSW's were measured on the 1M benchmark catalogues (README, bench-serve);
    nprobe 32 of 4,096 lists found the whole exact top-10 on the "copies" one (README)."""

    nprobe: int = 32  # IVF lists scanned per query
    train_per_list: int = 64  # IVF k-means sample: this many vectors per list (at most all)
    hnsw_m: int = 48
    ef_construction: int = 500
    ef_search: int = 320
    k_factor: int = 128  # ivfpq: candidates re-ranked exactly, per result kept (README bench-serve)


def build_index(vectors: np.ndarray, kind: str = "auto", params: IndexParams = IndexParams()) -> AnyIndex:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    kind = choose_kind(n, kind)
    if kind == "ivf":
        nlist = min(ivf_lists(n), n)
        base = faiss.IndexIVFFlat(faiss.IndexFlatIP(d + 1), d + 1, nlist, faiss.METRIC_L2)
        base.nprobe = params.nprobe
        return MipsIndex.build(vectors, base, train=min(n, params.train_per_list * nlist))
    if kind == "ivfpq":
        return _ivfpq(vectors, params)
    if kind == "flat":
        base = faiss.IndexFlatIP(d)
    else:
        base = faiss.IndexHNSWFlat(d, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = params.ef_construction
        base.hnsw.efSearch = params.ef_search
    index = faiss.IndexIDMap2(base)
    index.add_with_ids(vectors, np.arange(n, dtype=np.int64))
    return index


def _ivfpq(vectors: np.ndarray, params: IndexParams) -> faiss.Index:
    """IVF-PQ fast-scan (inner product, 4 bits per pair of dimensions) under exact re-ranking; an
    odd width gets one zero dimension inside the index (a merchant's [v, b] rows), which changes no
    inner product."""
    n, d = vectors.shape
    width = d + d % 2
    nlist = min(ivfpq_lists(n), n)
    ivf = faiss.IndexIVFPQFastScan(faiss.IndexFlatIP(width), width, nlist, width // 2, 4, faiss.METRIC_INNER_PRODUCT)
    ivf.by_residual = False  # inner product: residuals do not add up to the score
    ivf.nprobe = max(1, nlist // 2)
    refine = faiss.IndexRefineFlat(ivf)
    refine.k_factor = float(params.k_factor)
    padded = faiss.IndexPreTransform(faiss.RemapDimensionsTransform(d, width, False), refine)
    sample = min(n, max(params.train_per_list * nlist, 65_536))
    rows = np.sort(np.random.default_rng(0).choice(n, size=sample, replace=False))
    padded.train(vectors[rows])
    index = faiss.IndexIDMap2(padded)
    index.add_with_ids(vectors, np.arange(n, dtype=np.int64))
    return index


MAX_RERANKED = 2_048  # ivfpq: candidates re-ranked exactly per query, at most


def search_index(
    index: AnyIndex, queries: np.ndarray, k: int, kept: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """`index.search` for the k best, of which the caller keeps `kept` (default k) once it drops
    the rows it excludes (a customer's purchases). ivfpq re-ranks k_factor x kept candidates plus
    one per excluded row, never fewer than k nor more than max(k, MAX_RERANKED).

    Why per result kept, not per result asked: the depth, and so the recall, would otherwise grow
    with the customer's purchase count (the benchmark measures k = 10 without exclusions, and must
    measure the depth served). Why the cap: a basket fold-in asks for its 1,000 nearest items,
    which would re-rank 128,000. Measured on the 1M copies catalogue, baskets at c=16: 93 req/s,
    p99 216 ms uncapped; 223 req/s, p99 110 ms at a cap of 4,096; 245 req/s, p99 85 ms at 2,048,
    with the same top-10 agreement with the full-catalogue fold-in (0.955)."""
    refine = _refine(index)
    if refine is None:
        return index.search(queries, k)
    depth = rerank_depth(refine.k_factor, k, k if kept is None else kept)
    return index.search(queries, k, params=faiss.IndexRefineSearchParameters(k_factor=depth / k))


def rerank_depth(k_factor: float, k: int, kept: int) -> int:
    """Candidates ivfpq re-ranks exactly for k results of which `kept` are kept (see `search_index`)."""
    kept = min(kept, k)
    return int(max(k, min(round(k_factor * kept) + (k - kept), max(k, MAX_RERANKED))))


def _faiss(index: AnyIndex) -> faiss.Index:
    return index.inner if isinstance(index, MipsIndex) else index


def _unwrapped(index: AnyIndex) -> faiss.Index:
    """Under the id map and, for ivfpq, under the padding."""
    raw = _faiss(index)
    inner = faiss.downcast_index(raw.index) if isinstance(raw, faiss.IndexIDMap2 | faiss.IndexIDMap) else raw
    return faiss.downcast_index(inner.index) if isinstance(inner, faiss.IndexPreTransform) else inner


def _refine(index: AnyIndex) -> faiss.IndexRefine | None:
    inner = _unwrapped(index)
    return inner if isinstance(inner, faiss.IndexRefine) else None


def _base(index: AnyIndex) -> faiss.Index:
    """The index that searches (for ivfpq the IVF under the re-ranking, whose nprobe is the depth)."""
    inner = _unwrapped(index)
    return faiss.downcast_index(inner.base_index) if isinstance(inner, faiss.IndexRefine) else inner


def index_kind(index: AnyIndex) -> str:
    base = _base(index)
    if isinstance(base, faiss.IndexIVFPQFastScan):
        return "ivfpq"
    return "hnsw" if isinstance(base, faiss.IndexHNSWFlat) else "ivf" if isinstance(base, faiss.IndexIVF) else "flat"


def search_depth(index: AnyIndex) -> dict[str, int]:
    """The search-quality knob of an approximate index ({"nprobe": ...} or {"ef_search": ...}); {} if exact
    (ivfpq's is nprobe; its re-ranking depth stays as exported)."""
    base = _base(index)
    if isinstance(base, faiss.IndexHNSWFlat):
        return {"ef_search": int(base.hnsw.efSearch)}
    if isinstance(base, faiss.IndexIVF):
        return {"nprobe": int(base.nprobe)}
    return {}


def set_search_depth(index: AnyIndex, nprobe: int | None = None, ef_search: int | None = None) -> None:
    """Sets whichever knob the index has (nprobe for IVF, efSearch for HNSW); the other is ignored."""
    base = _base(index)
    if isinstance(base, faiss.IndexHNSWFlat) and ef_search is not None:
        base.hnsw.efSearch = ef_search
    if isinstance(base, faiss.IndexIVF) and nprobe is not None:
        base.nprobe = nprobe


def id_map(index: AnyIndex) -> np.ndarray | None:
    """The FAISS id of each stored vector, or None when the index stores no ids (ids = positions)."""
    raw = _faiss(index)
    return faiss.vector_to_array(raw.id_map) if isinstance(raw, faiss.IndexIDMap2 | faiss.IndexIDMap) else None


def save_index(index: AnyIndex, path: Path) -> None:
    write_with(Path(path), lambda tmp: faiss.write_index(_faiss(index), str(tmp)))


def load_index(path: Path) -> AnyIndex:
    """An inner-product index as saved; an L2 one is the MIPS reduction of `build_index` and is wrapped."""
    index = faiss.read_index(str(path))
    return MipsIndex.from_l2(index) if index.metric_type == faiss.METRIC_L2 else index
