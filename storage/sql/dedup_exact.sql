-- Exact duplicates after normalisation.
-- Input: dd_docs(doc, id, text, is_prior), where `doc` numbers prior documents first and then
-- candidates in id order, so "earlier" is simply a smaller doc number.
-- A candidate is an exact duplicate when its normalised text equals that of a prior document
-- (reported against the smallest such prior id) or of a candidate with a smaller id (reported
-- against the first candidate with that text, which itself is kept).

CREATE OR REPLACE TEMP TABLE dd_norm AS
SELECT doc, id, is_prior, norm, md5_number(norm) AS key
FROM (SELECT doc, id, is_prior, ef_normalize(text) AS norm FROM dd_docs);

CREATE OR REPLACE TEMP TABLE dd_exact AS
WITH first_of_key AS (
    SELECT key, arg_min(id, doc) AS first_id, min(doc) AS first_doc
    FROM dd_norm
    GROUP BY key
)
SELECT
    n.doc,
    n.id,
    'exact_duplicate' AS rule,
    f.first_id AS collided_with,
    1.0::DOUBLE AS similarity,
    'same normalised text' AS detail
FROM dd_norm AS n
JOIN first_of_key AS f USING (key)
WHERE NOT n.is_prior AND f.first_doc < n.doc;
