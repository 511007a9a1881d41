"""Majority voting over sampled answers, grouped by math equivalence, and the pseudo-labels it
gives instructions (`vote_answers`: majority answer, agreement, difficulty, verified).

`majority_votes` groups sampled answers by equivalence (each answer is compared with the
representative, i.e. first member, of the groups formed before it) and returns the largest group;
ties go to the group that appeared first; None answers never win but count in the denominator of
the agreement ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from infra.verifier import VerifierPool
from tasks.frames import require_columns
from tasks.solutions.answers import check_equivalence, normalize_answer
from tasks.solutions.records import VotedAnswer


@dataclass(frozen=True)
class Vote:
    """The majority answer of a set of samples.

    `answer` is the first member of the winning group (None when no sample had an answer);
    `agreement` = winning group size / number of samples (Nones included); `group_sizes` are in
    order of first appearance; `groups[i]` are the sample indices of group i; `winner` indexes
    the winning group (None when there is none).
    """

    answer: str | None
    agreement: float
    group_sizes: tuple[int, ...]
    groups: tuple[tuple[int, ...], ...]
    winner: int | None
    n_samples: int

    def group_of(self, sample: int) -> int | None:
        for g, members in enumerate(self.groups):
            if sample in members:
                return g
        return None

    def agrees(self, sample: int) -> bool | None:
        """Whether a sample is in the winning group (None when there is no winner)."""
        if self.winner is None:
            return None
        return sample in self.groups[self.winner]


def majority_votes(
    answer_lists: list[list[str | None]], pool: VerifierPool | None = None
) -> list[Vote]:
    """`majority_vote` for many sample sets, with all equivalence checks in one batch.

    Within each set, answers are first grouped by normalised string; the distinct forms are then
    compared pairwise (earlier form as reference) and clustered greedily against the
    representatives of the groups formed so far.
    """
    forms_per_set: list[list[str]] = []
    form_members: list[dict[str, list[int]]] = []
    form_text: list[dict[str, str]] = []
    pairs: list[tuple[str, str]] = []
    pair_index: dict[tuple[int, int, int], int] = {}
    for s, answers in enumerate(answer_lists):
        members: dict[str, list[int]] = {}
        text: dict[str, str] = {}
        for i, answer in enumerate(answers):
            if answer is None or not answer.strip():
                continue
            key = normalize_answer(answer) or answer.strip()
            members.setdefault(key, []).append(i)
            text.setdefault(key, answer)
        forms = list(members)
        for j in range(len(forms)):
            for i in range(j):
                pair_index[(s, i, j)] = len(pairs)
                pairs.append((text[forms[j]], text[forms[i]]))
        forms_per_set.append(forms)
        form_members.append(members)
        form_text.append(text)
    verdicts = check_equivalence([p for p, _ in pairs], [r for _, r in pairs], pool)

    votes = []
    for s, answers in enumerate(answer_lists):
        forms = forms_per_set[s]
        reps: list[int] = []  # form index of each group's representative
        groups: list[list[int]] = []
        for j, form in enumerate(forms):
            for g, rep in enumerate(reps):
                if verdicts[pair_index[(s, rep, j)]] is True:
                    groups[g].extend(form_members[s][form])
                    break
            else:
                reps.append(j)
                groups.append(list(form_members[s][form]))
        groups = [sorted(g) for g in groups]
        n = len(answers)
        if not groups:
            votes.append(Vote(None, 0.0, (), (), None, n))
            continue
        # Larger group first, then the group whose first member came earliest.
        winner = min(range(len(groups)), key=lambda g: (-len(groups[g]), groups[g][0]))
        answer = answers[groups[winner][0]]
        votes.append(
            Vote(
                answer=answer,
                agreement=len(groups[winner]) / n,
                group_sizes=tuple(len(g) for g in groups),
                groups=tuple(tuple(g) for g in groups),
                winner=winner,
                n_samples=n,
            )
        )
    return votes


def majority_vote(answers: list[str | None], pool: VerifierPool | None = None) -> Vote:
    """The majority answer of sampled final answers, grouped by math equivalence."""
    return majority_votes([answers], pool)[0]


# ---------------------------------------------------------------------------------------------
# Pseudo-labels of instructions
# ---------------------------------------------------------------------------------------------


def vote_answers(
    solutions: pl.DataFrame,
    references: dict[str, str] | None = None,
    threshold: float = 0.5,
    pool: VerifierPool | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Majority answer per instruction, and the solutions with a `verdict` column.

    `answers` has one row per instruction present in `solutions` (`VotedAnswer`). `agreement`
    counts unanswered samples in its denominator; `cot_answer`/`pot_answer` are the majorities
    of the CoT samples (fallbacks included, they are CoT) and of the programs;
    `cot_pot_agreement` is null unless both exist. `reference_match` is null where there is no
    reference (or it could not be judged). `verdict` is null when the instruction has no
    majority answer at all, else whether the sample is in the majority group.
    """
    require_columns(
        solutions, ["instruction_id", "kind", "sample", "extracted_answer"], "vote_answers"
    )
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    solutions = solutions.with_row_index("_row")
    # Instructions in order of first appearance, samples in order within each.
    ordered = solutions.with_columns(
        pl.col("_row").min().over("instruction_id").alias("_first")
    ).sort("_first", "sample", maintain_order=True)
    groups = ordered.group_by("instruction_id", maintain_order=True).agg(
        pl.col("_row"), pl.col("kind"), pl.col("extracted_answer")
    )
    ids = groups["instruction_id"].to_list()
    answer_lists = groups["extracted_answer"].to_list()
    kinds = groups["kind"].to_list()
    cot_lists = [
        [a for a, k in zip(ans, ks, strict=True) if k != "pot"]
        for ans, ks in zip(answer_lists, kinds, strict=True)
    ]
    pot_lists = [
        [a for a, k in zip(ans, ks, strict=True) if k == "pot"]
        for ans, ks in zip(answer_lists, kinds, strict=True)
    ]
    n = len(ids)
    votes = majority_votes(answer_lists + cot_lists + pot_lists, pool)
    overall, cot_votes, pot_votes = votes[:n], votes[n : 2 * n], votes[2 * n :]

    # CoT-vs-PoT and reference checks, all in one batch.
    preds: list[str | None] = []
    refs: list[str | None] = []
    both = [i for i in range(n) if cot_votes[i].answer is not None and pot_votes[i].answer]
    for i in both:
        preds.append(pot_votes[i].answer)
        refs.append(cot_votes[i].answer)
    references = references or {}
    with_ref = [i for i in range(n) if ids[i] in references and overall[i].answer is not None]
    for i in with_ref:
        preds.append(overall[i].answer)
        refs.append(references[ids[i]])
    checks = check_equivalence(preds, refs, pool)
    cot_pot: dict[int, bool | None] = {
        i: checks[j] is True for j, i in enumerate(both)
    }  # None from the checker (unjudged) reads as disagreement: a pseudo-label needs agreement
    ref_match = dict(zip(with_ref, checks[len(both) :], strict=True))

    answer_rows = []
    verdicts: dict[int, bool | None] = {}
    for i, vote in enumerate(overall):
        rows_i = groups["_row"][i].to_list()
        for position, row in enumerate(rows_i):
            verdicts[row] = vote.agrees(position)
        answered = sum(a is not None for a in answer_lists[i])
        if ids[i] in references and vote.answer is None:
            match: bool | None = False  # no answer at all cannot match the reference
        else:
            match = ref_match.get(i)
        answer_rows.append(
            {
                "instruction_id": ids[i],
                "answer": vote.answer,
                "agreement": vote.agreement,
                "n_samples": vote.n_samples,
                "n_answered": answered,
                "group_sizes": list(vote.group_sizes),
                "cot_answer": cot_votes[i].answer,
                "pot_answer": pot_votes[i].answer,
                "cot_pot_agreement": cot_pot.get(i),
                "difficulty": 1.0 - vote.agreement,
                "verified": vote.answer is not None and vote.agreement >= threshold,
                "reference_match": match,
            }
        )
    answers = VotedAnswer.frame(answer_rows)
    verdict_col = pl.Series(
        "verdict", [verdicts[r] for r in solutions["_row"].to_list()], dtype=pl.Boolean
    )
    return answers, solutions.drop("_row").with_columns(verdict_col)
