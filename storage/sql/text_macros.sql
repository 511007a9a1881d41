-- Text normalisation and word n-gram hashing shared by dedup and decontamination.
-- Cached benchmark n-gram tables are keyed by this file's content, so editing it rebuilds them.

-- LaTeX spacing and sizing commands carry no content: "\,", "\;", "\!", "\quad", "\left(",
-- "\displaystyle"; "\dfrac" and "\tfrac" are "\frac" at another size. Runs after
-- ef_unify_numbers, which reads "1\,000" as a number.
CREATE OR REPLACE MACRO ef_strip_latex(s) AS regexp_replace(
    regexp_replace(s, '\\[dt]frac\b', '\\frac', 'g'),
    '\\(left|right|displaystyle|textstyle|quad|qquad|[,;:! ])', ' ', 'g');

-- One spelling per number: thousands separators go ("1,000", "1\,000", "1{,}000" -> "1000";
-- each match consumes the digit before the separator, so "1,000,000" takes two passes) and
-- trailing decimal zeros go ("3.50" -> "3.5", "3.0" -> "3").
CREATE OR REPLACE MACRO ef_unify_numbers(s) AS regexp_replace(
    regexp_replace(
        regexp_replace(
            regexp_replace(s, '(\d)(,|\\,|\{,\})(\d\d\d)\b', '\1\3', 'g'),
            '(\d)(,|\\,|\{,\})(\d\d\d)\b', '\1\3', 'g'),
        '(\d\.\d*[1-9])0+\b', '\1', 'g'),
    '(\d)\.0+\b', '\1', 'g');

-- Two texts that differ only in case, whitespace, punctuation, number formatting or LaTeX
-- spacing normalise to the same string of single-space-separated words. A decimal point is
-- kept (as the Arabic decimal separator, which the punctuation pass spares) so that "3.5" does
-- not become the two words "3 5".
CREATE OR REPLACE MACRO ef_normalize(s) AS trim(regexp_replace(
    regexp_replace(ef_strip_latex(ef_unify_numbers(lower(s))), '(\d)\.(\d)', '\1٫\2', 'g'),
    '[^\pL\pN٫]+', ' ', 'g'));

-- The hash of each word of a normalised text.
CREATE OR REPLACE MACRO ef_word_hashes(norm) AS list_transform(string_split(norm, ' '), lambda w: hash(w));

-- Hashes of the word n-grams of a text, from its word hashes. A text of fewer than n words is
-- one n-gram (itself), so that short texts still match their exact copies.
-- For n <= 8, hashing n list elements is ~6x faster than hashing a slice of the list, which
-- serves larger n; the two give different values, but one n always takes the same path.
-- Pass a column, not an expression: a macro argument is substituted into the lambda and would
-- be evaluated again for every n-gram.
CREATE OR REPLACE MACRO ef_ngram_hashes(word_hashes, n) AS CASE
    WHEN len(word_hashes) < n THEN [hash(word_hashes)]
    WHEN n = 1 THEN word_hashes
    WHEN n = 2 THEN list_transform(range(1, len(word_hashes) - 0),
        lambda i: hash(word_hashes[i], word_hashes[i + 1]))
    WHEN n = 3 THEN list_transform(range(1, len(word_hashes) - 1),
        lambda i: hash(word_hashes[i], word_hashes[i + 1], word_hashes[i + 2]))
    WHEN n = 4 THEN list_transform(range(1, len(word_hashes) - 2),
        lambda i: hash(word_hashes[i], word_hashes[i + 1], word_hashes[i + 2], word_hashes[i + 3]))
    WHEN n = 5 THEN list_transform(range(1, len(word_hashes) - 3),
        lambda i: hash(word_hashes[i], word_hashes[i + 1], word_hashes[i + 2], word_hashes[i + 3], word_hashes[i + 4]))
    WHEN n = 6 THEN list_transform(range(1, len(word_hashes) - 4),
        lambda i: hash(word_hashes[i], word_hashes[i + 1], word_hashes[i + 2], word_hashes[i + 3], word_hashes[i + 4], word_hashes[i + 5]))
    WHEN n = 7 THEN list_transform(range(1, len(word_hashes) - 5),
        lambda i: hash(word_hashes[i], word_hashes[i + 1], word_hashes[i + 2], word_hashes[i + 3], word_hashes[i + 4], word_hashes[i + 5], word_hashes[i + 6]))
    WHEN n = 8 THEN list_transform(range(1, len(word_hashes) - 6),
        lambda i: hash(word_hashes[i], word_hashes[i + 1], word_hashes[i + 2], word_hashes[i + 3], word_hashes[i + 4], word_hashes[i + 5], word_hashes[i + 6], word_hashes[i + 7]))
    ELSE list_transform(range(1, len(word_hashes) - n + 2),
        lambda i: hash(word_hashes[i:i + n - 1]))
    END;
