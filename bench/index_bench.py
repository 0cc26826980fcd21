"""HNSW (gate's M / ef / candidates, exact re-rank) vs exact search on synthetic unit vectors.

For each size N: build time, index memory, per-query time (HNSW + re-rank vs exact matmul),
and recall@1 against exact search for planted near-copies of indexed vectors (cosine 0.9 to
their source) and for random queries; hnswlib's out-of-the-box ef=10 without re-ranking is
shown for contrast. Random Gaussian unit vectors are the hard case for HNSW (no cluster
structure, every point nearly orthogonal to every other).

    .venv/bin/python bench/index_bench.py --sizes 10000 100000 --out runs/index_bench.jsonl

Timings are wall clock on whatever machine runs it; compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import hnswlib
import numpy as np

from gate.index import CANDIDATES, EF_CONSTRUCTION, EF_SEARCH, HNSW_M, SPACE, _planted_copies


def unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        block = rng.standard_normal((min(100_000, n - start), dim)).astype(np.float32)
        out[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def exact_top1(vectors: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    top = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), 64):
        top[start : start + 64] = np.argmax(queries[start : start + 64] @ vectors.T, axis=1)
    return top, (time.perf_counter() - t0) / len(queries)


def hnsw_top1(
    graph: hnswlib.Index, vectors: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    labels, _ = graph.knn_query(queries, k=k)
    labels = labels.astype(np.int64)
    sims = np.einsum("qcd,qd->qc", vectors[labels], queries)
    top = labels[np.arange(len(queries)), sims.argmax(axis=1)]
    return top, (time.perf_counter() - t0) / len(queries)


def run(n: int, dim: int, queries: int, threads: int, seed: int) -> dict[str, object]:
    vectors = unit_rows(n, dim, seed)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    graph = hnswlib.Index(space=SPACE, dim=dim)
    graph.init_index(max_elements=n, ef_construction=EF_CONSTRUCTION, M=HNSW_M, random_seed=seed)
    graph.set_num_threads(threads)
    t0 = time.perf_counter()
    graph.add_items(vectors, np.arange(n))
    build_s = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    graph.set_num_threads(1)  # per-query latency on one core
    rng = np.random.default_rng(seed + 1)
    src = rng.choice(n, size=queries, replace=False)
    near = _planted_copies(vectors, src, 0.9, seed + 2)
    rand = unit_rows(queries, dim, seed + 3)
    row: dict[str, object] = {
        "n": n,
        "dim": dim,
        "M": HNSW_M,
        "ef_construction": EF_CONSTRUCTION,
        "ef": EF_SEARCH,
        "candidates": CANDIDATES,
        "build_threads": threads,
        "build_s": round(build_s, 2),
        "index_file_mb": round(graph.index_file_size() / 2**20, 1),
        "vectors_mb": round(vectors.nbytes / 2**20, 1),
        "build_rss_delta_mb": round((rss1 - rss0) / 1024, 1),
        "queries": queries,
    }
    for name, q in (("near", near), ("random", rand)):
        exact, exact_s = exact_top1(vectors, q)
        graph.set_ef(max(EF_SEARCH, CANDIDATES))
        gate_top, gate_s = hnsw_top1(graph, vectors, q, CANDIDATES)
        graph.set_ef(10)
        default_top, _ = hnsw_top1(graph, vectors, q, 1)
        row[f"{name}_recall1_gate"] = float(np.mean(gate_top == exact))
        row[f"{name}_recall1_default_ef10"] = float(np.mean(default_top == exact))
        row[f"{name}_query_ms_gate"] = round(gate_s * 1e3, 3)
        row[f"{name}_query_ms_exact"] = round(exact_s * 1e3, 3)
        if name == "near":
            row["near_source_is_exact_top1"] = float(np.mean(exact == src))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/index_bench.jsonl"))
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"# {platform.processor() or platform.machine()}, hnswlib, dim {args.dim}", flush=True)
    for n in args.sizes:
        row = run(n, args.dim, args.queries, args.threads, args.seed)
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
