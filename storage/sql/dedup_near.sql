-- Near duplicates: MinHash over word shingles with LSH banding, all set-at-a-time.
-- Input: dd_norm and dd_exact (from dedup_exact.sql) and dd_perm_seeds, one row with one
-- UBIGINT column per hash function (s0000, s0001, ...).
-- Parameters: $shingle (words per shingle), $bands, $rows (hash functions per band),
-- $threshold (minimum shingle Jaccard).
--
-- Hash function i is h -> hash(h XOR seed_i) over the 64-bit shingle hashes: as good a random
-- permutation as (a*h + b) mod p for MinHash, with no overflow to care about, and the fastest
-- variant measured. The signature is one GROUP BY over (document, shingle) rows with one min()
-- per hash function (COLUMNS expands the expression over the seed columns): ~3x faster than a
-- list_min over a lambda per hash function. A band's bucket is the hash of its `rows` minima,
-- so two documents share a bucket in a band exactly when those minima all agree. Only pairs
-- that share a bucket are compared, by their exact shingle Jaccard.

-- Who takes part: the first document of each distinct normalised text. That is every prior
-- text once and every candidate that is not an exact duplicate (whose twin stands in for it).
-- A repeated shingle changes no minimum, so lists are made distinct only for verification.
CREATE OR REPLACE TEMP TABLE dd_shingles AS
SELECT doc, id, is_prior, ef_ngram_hashes(word_hashes, $shingle) AS shingles
FROM (
    SELECT doc, id, is_prior, ef_word_hashes(norm) AS word_hashes
    FROM dd_norm
    WHERE doc IN (SELECT min(doc) FROM dd_norm GROUP BY key)
);

CREATE OR REPLACE TEMP TABLE dd_signatures AS
SELECT doc, list_value(*COLUMNS('^s\d+$')) AS signature
FROM (
    SELECT doc, min(hash(xor(h, COLUMNS('^s\d+$'))))
    FROM (SELECT doc, unnest(shingles) AS h FROM dd_shingles)
    CROSS JOIN dd_perm_seeds
    GROUP BY doc
);

CREATE OR REPLACE TEMP TABLE dd_buckets AS
SELECT
    doc,
    unnest(range($bands)) AS band,
    unnest(list_transform(
        range($bands), lambda b: hash(signature[b * $rows + 1:(b + 1) * $rows])
    )) AS bucket
FROM dd_signatures;

-- A candidate is compared with every earlier document (prior, or a candidate with a smaller
-- id) that shares a bucket with it in any band. Prior documents never pair with each other.
CREATE OR REPLACE TEMP TABLE dd_near AS
WITH pairs AS (
    SELECT DISTINCT c.doc, o.doc AS other
    FROM dd_buckets AS c
    JOIN dd_buckets AS o ON c.band = o.band AND c.bucket = o.bucket AND o.doc < c.doc
    WHERE c.doc >= (SELECT min(doc) FROM dd_norm WHERE NOT is_prior)
),
-- Sizes first, similarity after: written as one expression with lateral aliases, DuckDB
-- evaluated list_intersect once per reference (3x slower).
counted AS (
    SELECT
        p.doc,
        p.other,
        c.id,
        o.id AS collided_with,
        len(list_intersect(c.shingles, o.shingles)) AS shared,
        len(list_distinct(c.shingles)) + len(list_distinct(o.shingles)) AS both_sizes
    FROM pairs AS p
    JOIN dd_shingles AS c ON c.doc = p.doc
    JOIN dd_shingles AS o ON o.doc = p.other
),
scored AS (
    SELECT *, both_sizes - shared AS total, shared / (both_sizes - shared) AS similarity
    FROM counted
)
SELECT
    doc,
    id,
    'near_duplicate' AS rule,
    collided_with,
    similarity,
    printf('%d of %d word %d-shingles shared', shared, total, $shingle) AS detail
FROM scored
WHERE similarity >= $threshold
-- The most similar earlier document is the evidence; ties go to prior documents, then ids.
QUALIFY row_number() OVER (PARTITION BY doc ORDER BY similarity DESC, other) = 1;
