-- Contamination by word n-gram overlap with benchmark test sets.
-- Input: dc_candidates(id, norm), normalised by ef_normalize, and dc_bench_raw(bench, ref, ngrams UBIGINT[]), the distinct
-- n-gram hashes of each benchmark row (built once per benchmark file and cached).
-- Parameters: $ngram (words per n-gram), $overlap_threshold (share of a benchmark row's
-- n-grams found in the candidate), $min_shared (shared n-grams with one row that flag a
-- candidate whatever the share, as a long verbatim passage would), $max_ngram_df.
--
-- N-grams found in more than $max_ngram_df benchmark rows are boilerplate ("express your
-- answer as a common fraction") rather than evidence, and are ignored on both sides; the share
-- is taken over the remaining n-grams of the benchmark row. A benchmark row whose n-grams are
-- all boilerplate cannot be matched.

CREATE OR REPLACE TEMP TABLE dc_bench_ngrams AS
WITH flat AS (SELECT bench, ref, unnest(ngrams) AS ngram FROM dc_bench_raw),
informative AS (SELECT ngram FROM flat GROUP BY ngram HAVING count(*) <= $max_ngram_df)
SELECT f.bench, f.ref, f.ngram FROM flat AS f SEMI JOIN informative AS i USING (ngram);

CREATE OR REPLACE TEMP TABLE dc_bench_rows AS
SELECT bench, ref, count(*) AS n_ngrams FROM dc_bench_ngrams GROUP BY bench, ref;

CREATE OR REPLACE TEMP TABLE dc_ngram_matches AS
WITH cand AS (
    SELECT id, unnest(list_distinct(ef_ngram_hashes(word_hashes, $ngram))) AS ngram
    FROM (SELECT id, ef_word_hashes(norm) AS word_hashes FROM dc_candidates)
),
shared AS (
    SELECT c.id, b.bench, b.ref, count(*) AS shared
    FROM cand AS c
    JOIN dc_bench_ngrams AS b USING (ngram)
    GROUP BY c.id, b.bench, b.ref
)
SELECT
    s.id,
    'contaminated_ngram' AS rule,
    s.bench || ':' || s.ref AS collided_with,
    s.shared / r.n_ngrams AS similarity,
    printf('%d of %d word %d-grams of the benchmark row shared', s.shared, r.n_ngrams, $ngram) AS detail
FROM shared AS s
JOIN dc_bench_rows AS r USING (bench, ref)
WHERE s.shared / r.n_ngrams >= $overlap_threshold OR s.shared >= $min_shared
QUALIFY row_number() OVER (PARTITION BY s.id ORDER BY similarity DESC, s.shared DESC, collided_with) = 1;
