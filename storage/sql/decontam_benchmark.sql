-- The distinct word n-gram hashes of each row of one benchmark file, cached as parquet.
-- Input: dc_bench_src(ref, text). Parameters: $bench (its name), $ngram (words per n-gram).
CREATE OR REPLACE TEMP TABLE dc_bench_one AS
SELECT $bench AS bench, ref, list_distinct(ef_ngram_hashes(word_hashes, $ngram)) AS ngrams
FROM (SELECT ref, ef_word_hashes(ef_normalize(text)) AS word_hashes FROM dc_bench_src);
