"""Dedup and decontamination of a round's new instructions, as SQL in DuckDB over parquet.

A round of evolution produces candidate instructions; before they are solved, three rules remove
some of them, each removal recorded with its rule, the id it collided with and the evidence:

- `exact_duplicate`: the normalised text (case, whitespace, punctuation, number formatting such
  as "1,000" = "1000" and "3.50" = "3.5", LaTeX spacing) equals that of a prior instruction or of
  a candidate with a smaller id. Normalisation is a DuckDB macro (`storage/sql/text_macros.sql`);
  texts are compared by a 128-bit md5 of the normalised text.
- `near_duplicate`: the word-shingle Jaccard similarity with a prior instruction or an earlier
  candidate is at least `near_threshold`. Candidate pairs come from MinHash with LSH banding
  computed set-at-a-time in DuckDB (`storage/sql/dedup_near.sql`: shingle hashes, `num_perm`
  hash functions as one GROUP BY, `bands` buckets per document, a self-join on (band, bucket));
  each pair is then checked by its exact shingle Jaccard, so a reported near duplicate is never
  an estimate.
- `contaminated_ngram` / `contaminated_embedding`: the candidate overlaps a benchmark test
  question (GSM8K test and MATH test by default): a large share of the question's word n-grams
  appears in the candidate, or a verbatim passage is shared (`storage/sql/decontam_ngrams.sql`),
  or, when enabled, the sentence embeddings are close (`tasks/evolution/embeddings.py`).

"Prior" is the seeds and every earlier round: always kept, never compared with each other.
"Earlier" among candidates is id order, so the first of a group of duplicates is kept and each
later one is removed, naming an earlier document it duplicates (the most similar one; prior
documents win ties). A candidate is removed at most once, by the first rule that fires in the
order exact > near > contamination, and `kept + removed == candidates` always holds.

Why this shape: the pipeline grows to ~100k instructions over eight rounds and each round must
be compared with all earlier ones; a pairwise Python loop is quadratic, while the banded
self-join touches only pairs that share a bucket. `bench/dedup_bench.py` measures it against
datasketch's `MinHashLSH`.

Plain functions here; the `dedup` stage at the end wraps them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

from storage.catalog import connect
from storage.errors import UserError
from storage.settings import PROJECT_ROOT, home
from tasks.benchmarks import Benchmark, default_benchmarks, read_benchmark
from tasks.evolution.records import DedupMatch, DedupRemoved, Instruction
from tasks.stage import ParquetFiles, StageOutput, stage

SQL_DIR = PROJECT_ROOT / "storage" / "sql"

RULES = ("exact_duplicate", "near_duplicate", "contaminated_ngram", "contaminated_embedding")

# Candidates and priors: parquet files (paths or globs) or in-memory frames.
Source = Path | str | pl.DataFrame
Sources = Source | Sequence[Source]


class DedupInputError(UserError):
    """A candidate, prior or benchmark input that cannot be read as (id, text) rows."""


class DedupParams(BaseModel):
    """Exact and near duplicates (MinHash LSH in DuckDB) across all rounds and the seeds."""

    model_config = ConfigDict(extra="forbid")

    # MinHash / LSH: `num_perm` hash functions in `bands` bands of num_perm // bands rows. With
    # 32 bands of 4 a pair at Jaccard 0.7 becomes a candidate with probability 0.9998 (0.5: 0.87).
    num_perm: int = Field(128, ge=1, description="MinHash permutations")
    bands: int = Field(32, ge=1, description="LSH bands (num_perm must be a multiple)")
    shingle: int = Field(3, ge=1, description="words per shingle")
    near_threshold: float = Field(
        0.7, gt=0, le=1, description="Jaccard similarity of a near duplicate"
    )
    seed: int = 0
    # The text of a row is the first of these columns present in its file (seeds: `question`).
    text_columns: tuple[str, ...] = ("text", "question")
    id_column: str = "id"
    # DuckDB resources for dedup_and_decontaminate's connection (memory None: DuckDB's default;
    # threads None: the CPUs this process may run on); it spills to `EVOLFORGE_HOME/tmp/duckdb`
    # beyond the memory limit.
    memory_limit: str | None = None
    threads: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> DedupParams:
        if self.num_perm % self.bands:
            raise ValueError(
                f"num_perm ({self.num_perm}) must be a positive multiple of bands ({self.bands})"
            )
        return self

    def fingerprint(self) -> dict[str, Any]:
        """Resource settings do not change which rows are duplicates."""
        return self.model_dump(mode="json", exclude={"memory_limit", "threads"})

    @property
    def rows(self) -> int:
        return self.num_perm // self.bands


class NgramRule(BaseModel):
    """The word n-gram overlap rule of decontamination, shared by the data flow's
    `decontaminate` stage and the evaluation's contamination guard."""

    model_config = ConfigDict(extra="forbid")

    # A GSM8K question is ~45 words: with 13-grams (GPT-3) a paraphrase that
    # renames a person, changes a number and a few words shares almost none, so a candidate is
    # flagged when it holds `overlap_threshold` of a benchmark question's word 6-grams.
    # Measured with these defaults: of GSM8K test questions with a new name, a new number and 2
    # (4) random word substitutions, 89% (71%) are flagged, and 0.04% of GSM8K train questions
    # are; 13% of MATH train questions are, nearly all MATH test problems with other numbers
    # ("Convert $135_7$ to base 10" / "Convert $634_7$ ..."), which is the point.
    # `min_shared`, when set, also flags any candidate sharing that many n-grams with one row
    # (8 six-grams: at least a verbatim 13-word passage may be all they have in common).
    ngram: int = Field(6, ge=1, description="words per n-gram")
    overlap_threshold: float = Field(
        0.3, gt=0, le=1, description="share of a benchmark row's n-grams that flags a text"
    )
    min_shared: int | None = Field(None, ge=1, description="shared n-grams that always flag")
    max_ngram_df: int = Field(
        10, ge=1, description="n-grams in more benchmark rows than this are boilerplate"
    )

    def ngram_rule(self) -> dict[str, Any]:
        """The rule's fields alone (without those of a model that extends it)."""
        return self.model_dump(include=set(NgramRule.model_fields))


class DecontamParams(NgramRule):
    """Overlap with benchmark test sets (GSM8K test and MATH test by default)."""

    benchmarks: list[Benchmark] = Field(default_factory=default_benchmarks)
    # Sentence-embedding cosine similarity (all-MiniLM-L6-v2, offline), off by default: it costs
    # a model load and ~1 ms per text on CPU.
    embeddings: bool = False
    embedding_threshold: float = Field(0.9, ge=-1, le=1)
    embedding_batch_size: int = Field(256, ge=1)
    # Benchmark n-gram tables and embeddings are cached here keyed by file content (None:
    # EVOLFORGE_HOME/cache/benchmarks).
    cache_dir: Path | None = None

    @model_validator(mode="after")
    def _check(self) -> DecontamParams:
        names = [b.name for b in self.benchmarks]
        if len(set(names)) != len(names):
            raise ValueError(f"benchmark names must be unique, got {names}")
        return self

    def fingerprint(self) -> dict[str, Any]:
        """Parameters plus the content hash of each benchmark file (not where caches live)."""
        data = self.model_dump(
            mode="json", exclude={"cache_dir", "embedding_batch_size", "benchmarks"}
        )
        return {**data, "benchmarks": [b.fingerprint() for b in self.benchmarks]}

    def resolved_cache_dir(self) -> Path:
        path = Path(self.cache_dir) if self.cache_dir else home() / "cache" / "benchmarks"
        path.mkdir(parents=True, exist_ok=True)
        return path


# ---------------------------------------------------------------------------------------------
# SQL files


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


def run_sql(con: duckdb.DuckDBPyConnection, name: str, **params: object) -> None:
    """Run every statement of `storage/sql/<name>.sql`, each with the parameters it names."""
    text = (SQL_DIR / f"{name}.sql").read_text()
    for statement in con.extract_statements(text):
        wanted = statement.named_parameters
        missing = wanted - params.keys()
        if missing:
            raise ValueError(f"{name}.sql needs parameters {sorted(missing)}")
        con.execute(statement, {k: params[k] for k in wanted} if wanted else None)


def _install_macros(con: duckdb.DuckDBPyConnection) -> None:
    run_sql(con, "text_macros")


def normalize_texts(
    texts: Sequence[str], con: duckdb.DuckDBPyConnection | None = None
) -> list[str]:
    """The normalised form of each text, as the exact-duplicate rule compares them."""
    con = con or connect()
    _install_macros(con)
    con.register("ef_texts", pa.table({"text": pa.array(list(texts), pa.string())}))
    return [row[0] for row in con.execute("SELECT ef_normalize(text) FROM ef_texts").fetchall()]


# ---------------------------------------------------------------------------------------------
# Inputs


def _as_list(sources: Sources | None) -> list[Source]:
    if sources is None:
        return []
    if isinstance(sources, (str, Path, pl.DataFrame)):
        return [sources]
    return list(sources)


def _expand(source: Path | str) -> list[Path]:
    path = Path(source)
    if any(ch in str(path) for ch in "*?["):
        found = sorted(path.parent.glob(path.name))
        if not found:
            raise DedupInputError(f"{source}: no parquet file matches")
        return found
    if path.is_dir():
        found = sorted(path.glob("*.parquet"))
        if not found:
            raise DedupInputError(f"{source}: folder holds no parquet files")
        return found
    if not path.is_file():
        raise DedupInputError(f"{source}: file not found")
    return [path]


def _pick_text_column(columns: Sequence[str], cfg: DedupParams, where: str) -> str:
    if cfg.id_column not in columns:
        raise DedupInputError(f"{where}: no '{cfg.id_column}' column (columns: {list(columns)})")
    for name in cfg.text_columns:
        if name in columns:
            return name
    raise DedupInputError(
        f"{where}: none of the text columns {list(cfg.text_columns)} (columns: {list(columns)})"
    )


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _load_docs(
    con: duckdb.DuckDBPyConnection, sources: Sources | None, cfg: DedupParams, table: str
) -> None:
    """Create `table(id, text, origin, row)` from parquet files or frames, refusing null ids
    or texts with the file and row that hold them."""
    parts: list[str] = []
    for n, source in enumerate(_as_list(sources)):
        if isinstance(source, pl.DataFrame):
            where = f"{table} frame #{n}"
            text_col = _pick_text_column(source.columns, cfg, where)
            view = f"_{table}_frame_{n}"
            con.register(view, source.select(cfg.id_column, text_col).to_arrow())
            parts.append(
                f"SELECT CAST({_quote(cfg.id_column)} AS VARCHAR) AS id, "
                f"CAST({_quote(text_col)} AS VARCHAR) AS text, '{where}' AS origin, "
                f"row_number() OVER () - 1 AS row FROM {view}"
            )
            continue
        for path in _expand(source):
            try:
                columns = pq.read_schema(path).names
            except (OSError, pa.ArrowInvalid) as exc:
                raise DedupInputError(f"{path}: not a readable parquet file ({exc})") from exc
            text_col = _pick_text_column(columns, cfg, str(path))
            literal = "'" + str(path).replace("'", "''") + "'"
            parts.append(
                f"SELECT CAST({_quote(cfg.id_column)} AS VARCHAR) AS id, "
                f"CAST({_quote(text_col)} AS VARCHAR) AS text, {literal} AS origin, "
                f"file_row_number AS row FROM read_parquet({literal}, file_row_number = true)"
            )
    body = (
        " UNION ALL ".join(parts)
        if parts
        else (
            "SELECT NULL::VARCHAR AS id, NULL::VARCHAR AS text, NULL::VARCHAR AS origin, "
            "NULL::BIGINT AS row WHERE false"
        )
    )
    con.execute(f"CREATE OR REPLACE TEMP TABLE {table} AS {body}")
    bad = con.execute(
        f"SELECT origin, row, id IS NULL FROM {table} WHERE id IS NULL OR text IS NULL LIMIT 1"
    ).fetchone()
    if bad:
        field_name = cfg.id_column if bad[2] else "text"
        raise DedupInputError(f"{bad[0]} row {bad[1]}: null {field_name}")


def _prepare_docs(
    con: duckdb.DuckDBPyConnection, candidates: Sources, prior: Sources | None, cfg: DedupParams
) -> int:
    """Build dd_docs: prior documents first, then candidates in id order. Returns the number of
    candidates."""
    _load_docs(con, candidates, cfg, "dd_candidates_in")
    _load_docs(con, prior, cfg, "dd_prior_in")
    dup = con.execute(
        "SELECT id, origin, row FROM dd_candidates_in "
        "QUALIFY count(*) OVER (PARTITION BY id) > 1 ORDER BY id, origin, row LIMIT 1"
    ).fetchone()
    if dup:
        raise DedupInputError(f"{dup[1]} row {dup[2]}: candidate id {dup[0]!r} is not unique")
    clash = con.execute(
        "SELECT c.id, p.origin, p.row FROM dd_candidates_in c JOIN dd_prior_in p USING (id) LIMIT 1"
    ).fetchone()
    if clash:
        raise DedupInputError(
            f"{clash[1]} row {clash[2]}: candidate id {clash[0]!r} is also a prior id "
            "(pass earlier rounds as prior, the new round as candidates)"
        )
    con.execute(
        """CREATE OR REPLACE TEMP TABLE dd_docs AS
        SELECT row_number() OVER (ORDER BY is_prior DESC, id, origin, row) AS doc, id, text, is_prior
        FROM (SELECT id, text, origin, row, false AS is_prior FROM dd_candidates_in
              UNION ALL SELECT id, text, origin, row, true AS is_prior FROM dd_prior_in)"""
    )
    n_candidates = con.execute("SELECT count(*) FROM dd_candidates_in").fetchone()[0]
    # The texts now live in dd_docs; keeping a second copy costs ~0.5 GB per million rows.
    con.execute("DROP TABLE dd_candidates_in")
    con.execute("DROP TABLE dd_prior_in")
    return n_candidates


def _perm_seeds(cfg: DedupParams) -> pa.Table:
    """One row, one column per MinHash hash function (`s0000`, ...): the seeds XORed into the
    shingle hashes. Fixed by `cfg.seed`, so a rerun buckets documents the same way."""
    seeds = np.random.default_rng(cfg.seed).integers(0, 2**63, size=cfg.num_perm, dtype=np.uint64)
    return pa.table({f"s{i:04d}": pa.array([int(s)], pa.uint64()) for i, s in enumerate(seeds)})


def _removed_frame(con: duckdb.DuckDBPyConnection, sql: str) -> pl.DataFrame:
    frame = con.sql(sql).pl()
    if frame.is_empty():
        return DedupMatch.empty()
    return frame.select([pl.col(k).cast(v) for k, v in DedupMatch.schema().items()])


# ---------------------------------------------------------------------------------------------
# Rules


def find_duplicates(
    con: duckdb.DuckDBPyConnection,
    candidates: Sources,
    prior: Sources | None,
    cfg: DedupParams | None = None,
    timings: dict[str, float] | None = None,
) -> pl.DataFrame:
    """Candidates that duplicate a prior document or an earlier candidate, exactly or nearly.

    Returns one row per removed candidate: `id, rule, collided_with, similarity, detail`
    (`DedupMatch`), exact duplicates first. Leaves `dd_docs` in `con` for later rules.
    Seconds spent per stage (load, exact, near) are added to `timings` when given.
    """
    cfg = cfg or DedupParams()
    timings = {} if timings is None else timings
    _install_macros(con)
    with _timed(timings, "load"):
        _prepare_docs(con, candidates, prior, cfg)
    with _timed(timings, "exact"):
        run_sql(con, "dedup_exact")
    with _timed(timings, "near"):
        con.register("dd_perm_seeds_arrow", _perm_seeds(cfg))
        con.execute("CREATE OR REPLACE TEMP TABLE dd_perm_seeds AS FROM dd_perm_seeds_arrow")
        run_sql(
            con,
            "dedup_near",
            shingle=cfg.shingle,
            bands=cfg.bands,
            rows=cfg.rows,
            threshold=cfg.near_threshold,
        )
    return _removed_frame(
        con,
        "SELECT id, rule, collided_with, similarity, detail FROM "
        "(FROM dd_exact UNION ALL BY NAME FROM dd_near) ORDER BY rule, doc",
    )


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _benchmark_ngrams(con: duckdb.DuckDBPyConnection, spec: Benchmark, cfg: DecontamParams) -> Path:
    """The cached parquet of (bench, ref, ngrams) for one benchmark file, built if missing.

    Keyed by the file's content, the text field, n, the normalisation macros' source and the
    DuckDB version (whose `hash()` produced the n-gram hashes)."""
    key = hashlib.sha256(
        json.dumps(
            [
                _file_digest(spec.path),
                spec.text_field,
                spec.id_field,
                cfg.ngram,
                _file_digest(SQL_DIR / "text_macros.sql"),
                duckdb.__version__,
            ]
        ).encode()
    ).hexdigest()[:16]
    out = cfg.resolved_cache_dir() / f"{spec.name}-ngrams-{key}.parquet"
    if out.exists():
        return out
    con.register("dc_bench_src", read_benchmark(spec))
    run_sql(con, "decontam_benchmark", bench=spec.name, ngram=cfg.ngram)
    con.unregister("dc_bench_src")
    tmp = out.with_suffix(".parquet.tmp")
    con.table("dc_bench_one").write_parquet(str(tmp))
    tmp.replace(out)  # atomic: a reader never sees half a cache file
    return out


def find_contamination(
    con: duckdb.DuckDBPyConnection,
    candidates: Sources,
    cfg: DecontamParams | None = None,
    dedup_cfg: DedupParams | None = None,
) -> pl.DataFrame:
    """Candidates that overlap a benchmark test question, by n-grams and (when enabled)
    embeddings. One row per flagged candidate (`DedupMatch`), n-gram evidence first."""
    cfg = cfg or DecontamParams()
    dedup_cfg = dedup_cfg or DedupParams()
    _install_macros(con)
    _load_docs(con, candidates, dedup_cfg, "dc_candidates_in")
    con.execute(
        "CREATE OR REPLACE TEMP TABLE dc_candidates AS "
        "SELECT id, text, ef_normalize(text) AS norm FROM dc_candidates_in"
    )
    return _find_contamination_loaded(con, cfg)


def _find_contamination_loaded(con: duckdb.DuckDBPyConnection, cfg: DecontamParams) -> pl.DataFrame:
    if not cfg.benchmarks:
        return DedupMatch.empty()
    files = [str(_benchmark_ngrams(con, spec, cfg)) for spec in cfg.benchmarks]
    con.execute(
        "CREATE OR REPLACE TEMP TABLE dc_bench_raw AS FROM read_parquet($files)", {"files": files}
    )
    run_sql(
        con,
        "decontam_ngrams",
        ngram=cfg.ngram,
        overlap_threshold=cfg.overlap_threshold,
        # No candidate shares more n-grams with one row than 2^62: the rule is off.
        min_shared=cfg.min_shared or 2**62,
        max_ngram_df=cfg.max_ngram_df,
    )
    found = _removed_frame(
        con, "SELECT id, rule, collided_with, similarity, detail FROM dc_ngram_matches ORDER BY id"
    )
    if cfg.embeddings:
        from tasks.evolution.embeddings import MODEL_NAME, find_embedding_contamination

        flagged = set(found["id"].to_list())
        rest = con.sql("SELECT id, text FROM dc_candidates ORDER BY id").pl()
        rest = rest.filter(~pl.col("id").is_in(list(flagged)))
        by_embedding = find_embedding_contamination(
            rest["id"].to_list(),
            rest["text"].to_list(),
            cfg.benchmarks,
            cfg.embedding_threshold,
            cfg.resolved_cache_dir(),
            cfg.embedding_batch_size,
        ).with_columns(
            pl.lit("contaminated_embedding").alias("rule"),
            pl.lit(f"cosine similarity of {MODEL_NAME} embeddings").alias("detail"),
        )
        found = pl.concat([found, by_embedding.select(DedupMatch.columns())])
    return found


# ---------------------------------------------------------------------------------------------
# The stage


def configure(con: duckdb.DuckDBPyConnection, cfg: DedupParams) -> None:
    """Resource limits for a dedup connection; spilling goes under EVOLFORGE_HOME/tmp."""
    spill = home() / "tmp" / "duckdb"
    spill.mkdir(parents=True, exist_ok=True)
    con.execute(f"SET temp_directory = '{spill}'")
    con.execute("SET preserve_insertion_order = false")
    if cfg.memory_limit:
        con.execute("SET memory_limit = $m", {"m": cfg.memory_limit})
    # DuckDB sizes its pool from the machine's core count and cgroup quota, not the affinity
    # mask, and has been seen at one thread on a 2-core machine: say it explicitly.
    con.execute(f"SET threads = {int(cfg.threads or usable_cpus())}")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def dedup_and_decontaminate(
    candidates: Sources,
    prior: Sources | None,
    dedup_cfg: DedupParams | None = None,
    decontam_cfg: DecontamParams | None = None,
    con: duckdb.DuckDBPyConnection | None = None,
    timings: dict[str, float] | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split candidates into (kept, removed).

    `kept` has the candidates' own columns (ids as strings); `removed` has them plus `rule,
    collided_with, similarity, detail`. Each candidate is in exactly one of the two; a candidate
    several rules would remove is removed by the first (exact > near > contamination).
    Contamination is only checked for candidates that survived dedup. Seconds per stage are
    added to `timings` when given.
    """
    dedup_cfg = dedup_cfg or DedupParams()
    decontam_cfg = decontam_cfg or DecontamParams()
    timings = {} if timings is None else timings
    own = con is None
    con = con or connect()
    try:
        configure(con, dedup_cfg)
        duplicates = find_duplicates(con, candidates, prior, dedup_cfg, timings)
        with _timed(timings, "contamination"):
            con.register("dd_duplicates", duplicates.select("id").to_arrow())
            # The survivors, with the normalised text the exact stage already computed.
            con.execute(
                "CREATE OR REPLACE TEMP TABLE dc_candidates AS "
                "SELECT d.id, d.text, n.norm FROM dd_docs AS d JOIN dd_norm AS n USING (doc) "
                "WHERE NOT d.is_prior AND d.id NOT IN (SELECT id FROM dd_duplicates)"
            )
            contaminated = _find_contamination_loaded(con, decontam_cfg)
        removed = pl.concat([duplicates, contaminated])
        with _timed(timings, "split"):
            kept, removed_rows, total = _split(con, candidates, removed, dedup_cfg)
        if kept.height + removed_rows.height != total or removed.height != removed_rows.height:
            raise AssertionError(
                f"dedup counts do not reconcile: {total} candidates, {kept.height} kept, "
                f"{removed_rows.height} removed ({removed.height} decisions)"
            )
        return kept, removed_rows
    finally:
        if own:
            con.close()


def _split(
    con: duckdb.DuckDBPyConnection, candidates: Sources, removed: pl.DataFrame, cfg: DedupParams
) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    rows = _candidate_rows(con, candidates, cfg)
    kept = rows.join(removed.select("id"), left_on=cfg.id_column, right_on="id", how="anti")
    removed_rows = rows.join(removed.rename({"id": cfg.id_column}), on=cfg.id_column, how="inner")
    return kept, removed_rows, rows.height


def _candidate_rows(
    con: duckdb.DuckDBPyConnection, candidates: Sources, cfg: DedupParams
) -> pl.DataFrame:
    """The candidates with all their columns, ids as strings (as the rules saw them)."""
    frames = []
    for source in _as_list(candidates):
        if isinstance(source, pl.DataFrame):
            frames.append(source)
        else:
            frames.extend(pl.read_parquet(path) for path in _expand(source))
    rows = (
        pl.concat(frames, how="diagonal_relaxed")
        if frames
        else pl.DataFrame(schema={cfg.id_column: pl.String})
    )
    return rows.with_columns(pl.col(cfg.id_column).cast(pl.String))


def count_by_rule(removed: pl.DataFrame) -> dict[str, int]:
    """Removed rows counted by rule (every rule present, zero when it removed nothing)."""
    counts = dict.fromkeys(RULES, 0)
    for rule, n in removed.group_by("rule").len().iter_rows():
        counts[rule] = n
    return counts


def survivors(evolutions: pl.DataFrame, eliminated: pl.DataFrame) -> pl.DataFrame:
    """The evolutions the eliminator kept."""
    return evolutions.join(eliminated.select("id"), on="id", how="anti")


@stage(name="dedup", outputs={"dedup": DedupRemoved})
def dedup_batch(
    evolutions: pl.DataFrame,
    elimination: pl.DataFrame,
    instructions: ParquetFiles,
    dedup: DedupParams,
    decontamination: DecontamParams,
) -> StageOutput:
    """Remove exact/near duplicates of all earlier instructions and benchmark contamination."""
    # What dedup compares: the instruction columns of an evolution (not its raw completion).
    candidates = survivors(evolutions, elimination).select(Instruction.columns())
    kept, removed = dedup_and_decontaminate(candidates, list(instructions), dedup, decontamination)
    stats = {
        "candidates": candidates.height,
        "kept": kept.height,
        "by_rule": count_by_rule(removed),
    }
    return StageOutput({"dedup": removed}, stats)
