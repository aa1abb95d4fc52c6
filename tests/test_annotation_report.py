"""The report of a human study against figures computed by hand: majority outcomes, human-judge
agreement with and without draws, Krippendorff's alpha and Fleiss' kappa (the libraries' values
checked against the textbook formulas worked out on paper), on a plain and a tie-heavy set of votes."""

from __future__ import annotations

import json

import pytest
from annotation_fixtures import pair_items, write_judge_output

from pdpo_jax.annotation.agreement import agreement, fleiss_kappa, krippendorff_alpha, majority_outcome
from pdpo_jax.annotation.errors import StudyError
from pdpo_jax.annotation.store import Study
from pdpo_jax.stages import annotate

W, D, L = "win", "draw", "lose"

# Three annotators on four items (outcomes of model A). By hand, with n = 12 votes:
#   Fleiss: P_i = (sum_j n_ij^2 - 3) / 6 = 1, 1/3, 1/3, 0 -> mean 5/12; p = (1/2, 1/4, 1/4) -> P_e = 3/8;
#           kappa = (5/12 - 3/8) / (1 - 3/8) = 1/15.
#   Krippendorff (nominal): disagreeing ordered pairs per item / (m - 1) = 0, 2, 2, 3 -> D_o = 7/12;
#           n_c = (6, 3, 3) -> D_e = (144 - 54) / (12 * 11) = 15/22; alpha = 1 - (7/12) / (15/22) = 13/90.
PLAIN_VOTES = [(W, W, W), (W, W, D), (L, D, L), (W, D, L)]
PLAIN_MAJORITY = [W, W, L, D]  # the last is a three-way tie
PLAIN_JUDGE = [W, D, L, W]  # with draws: items 1 and 3 agree (2/4); without: items 1 and 3 (2/2)

# Two annotators, mostly ties. By hand, with n = 8 votes:
#   Fleiss: P_i = (sum_j n_ij^2 - 2) / 2 = 0, 0, 1, 1 -> 1/2; p = (1/2, 3/8, 1/8) -> P_e = 13/32; kappa = 3/19.
#   Krippendorff: disagreeing ordered pairs / 1 = 2, 2, 0, 0 -> D_o = 4/8; n_c = (4, 3, 1) ->
#           D_e = (64 - 26) / 56 = 19/28; alpha = 1 - (1/2) / (19/28) = 5/19.
TIED_VOTES = [(W, L), (W, D), (D, D), (W, W)]
TIED_MAJORITY = [D, D, D, W]
TIED_JUDGE = [W, W, D, L]  # with draws: item 3 agrees (1/4); without draws only item 4 is left, and disagrees (0/1)


def by_annotator(votes):
    return [{f"annotator-{k}": outcome for k, outcome in enumerate(item)} for item in votes]


@pytest.mark.parametrize("votes, alpha, kappa", [(PLAIN_VOTES, 13 / 90, 1 / 15), (TIED_VOTES, 5 / 19, 3 / 19)])
def test_the_libraries_give_the_hand_computed_alpha_and_kappa(votes, alpha, kappa):
    assert krippendorff_alpha(by_annotator(votes)) == pytest.approx(alpha, abs=1e-12)
    assert fleiss_kappa([list(v) for v in votes]) == {"value": pytest.approx(kappa, abs=1e-12), "items": 4,
                                                       "votes_per_item": len(votes[0])}


def test_alpha_takes_missing_votes_and_kappa_the_items_with_the_usual_number_of_votes():
    # Annotator 2 skipped the last item: alpha keeps its two votes; kappa keeps the three full items.
    # By hand for alpha, n = 11 votes: disagreeing pairs / (m - 1) = 0, 2, 2, then [W, D] -> 2 / 1 = 2,
    # so D_o = 6/11; n_c = (6, 3, 2) -> D_e = (121 - 49) / 110 = 36/55; alpha = 1 - (6/11) / (36/55) = 1/6.
    ratings = by_annotator(PLAIN_VOTES[:3]) + [{"annotator-0": W, "annotator-1": D}]
    assert krippendorff_alpha(ratings) == pytest.approx(1 / 6, abs=1e-12)
    kappa = fleiss_kappa([list(r.values()) for r in ratings])
    # The three full items by hand: P = 1, 1/3, 1/3 -> 5/9; p = (5/9, 2/9, 2/9) -> P_e = 33/81; kappa = 12/48 = 1/4.
    assert kappa == {"value": pytest.approx(1 / 4, abs=1e-12), "items": 3, "votes_per_item": 3}
    assert krippendorff_alpha([{"a": W, "b": W}, {"a": W, "b": W}]) is None  # one outcome throughout: undefined
    assert krippendorff_alpha([{"a": W}, {"b": L}]) is None  # no item with two votes
    assert fleiss_kappa([[W], [L]]) == {"value": None, "items": 0, "votes_per_item": None}


def test_majority_and_agreement_rules():
    assert [majority_outcome(v) for v in PLAIN_VOTES] == PLAIN_MAJORITY
    assert [majority_outcome(v) for v in TIED_VOTES] == TIED_MAJORITY
    assert majority_outcome([W, W, L, L, D]) == D and majority_outcome([]) is None
    assert agreement(list(zip(PLAIN_MAJORITY, PLAIN_JUDGE))) == {"agree": 2, "items": 4, "rate": 0.5}
    assert agreement(list(zip(PLAIN_MAJORITY, PLAIN_JUDGE)), without_draws=True) == {"agree": 2, "items": 2, "rate": 1.0}
    assert agreement(list(zip(TIED_MAJORITY, TIED_JUDGE))) == {"agree": 1, "items": 4, "rate": 0.25}
    assert agreement(list(zip(TIED_MAJORITY, TIED_JUDGE)), without_draws=True) == {"agree": 0, "items": 1, "rate": 0.0}
    assert agreement([(D, D)], without_draws=True) == {"agree": 0, "items": 0, "rate": None}


def cast_votes(study: Study, votes: list[tuple[str, ...]], items) -> None:
    """Annotator k votes votes[i][k] (an outcome of model A) on item i, clicking the side it is shown on."""
    for k in range(len(votes[0])):
        annotator = study.annotator_for_token(study.add_annotator(f"annotator-{k}"))
        for position in range(1, len(items) + 1):
            shown = study.shown_item(annotator, position)
            outcome = votes[shown.number - 1][k]
            winner = {W: shown.item.model_a, L: shown.item.model_b, D: "draw"}[outcome]
            choice = "draw" if winner == "draw" else str(shown.shown_models.index(winner) + 1)
            if position == 1:  # a changed vote: only the last one counts
                study.record_vote(annotator, position, "draw" if choice != "draw" else "1")
            study.record_vote(annotator, position, choice)


@pytest.mark.parametrize("votes, judge, majority, rates, alpha, kappa", [
    (PLAIN_VOTES, PLAIN_JUDGE, PLAIN_MAJORITY, (0.5, 1.0), 13 / 90, 1 / 15),
    (TIED_VOTES, TIED_JUDGE, TIED_MAJORITY, (0.25, 0.0), 5 / 19, 3 / 19),
])
def test_the_report_command_gives_table_3_and_the_agreements(tmp_path, capsys, votes, judge, majority, rates, alpha,
                                                             kappa):
    items = pair_items(len(votes))
    # The judge held item 2 the other way round (SFT as A, its outcome from SFT's side): the report
    # turns it back to PseudoDPO's side.
    folder = write_judge_output(tmp_path / "judge", items, judge, swapped=frozenset({1}))
    study = Study.create(tmp_path / "study.db", items)
    cast_votes(study, votes, items)
    out = tmp_path / "report" / "report.json"
    assert annotate.main(["report", "--db", str(study.path), "--judge", str(folder), "--out", str(out)]) == 0
    report = json.loads(out.read_text())

    assert [row["human"] for row in report["items"]] == majority
    assert [row["judge"] for row in report["items"]] == judge
    (pair,) = report["pairs"]
    assert (pair["model_a"], pair["model_b"], pair["items"]) == ("PseudoDPO", "SFT", 4)
    expected = {o: majority.count(o) for o in (W, D, L)}
    assert pair["human"]["counts"] == expected
    assert pair["human"]["percentages"] == {o: 25.0 * n for o, n in expected.items()}
    assert pair["judge"]["counts"] == {o: judge.count(o) for o in (W, D, L)}
    agreed = report["human_judge_agreement"]
    assert (agreed["with_draws"]["rate"], agreed["without_draws"]["rate"]) == rates
    assert report["annotator_agreement"]["krippendorff_alpha"] == pytest.approx(alpha, abs=1e-12)
    assert report["annotator_agreement"]["fleiss_kappa"]["value"] == pytest.approx(kappa, abs=1e-12)
    assert report["study"]["votes"] == 4 * len(votes[0]) and report["study"]["changed_votes"] == len(votes[0])

    table = (out.with_suffix(".md")).read_text()
    row = next(line for line in table.splitlines() if line.startswith("| PseudoDPO | SFT |"))
    assert f"| {25.0 * expected[W]:.1f} ({expected[W]}) |" in row
    assert f"{100 * rates[0]:.1f}% ({int(4 * rates[0])} of 4 items)" in table
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "### Human evaluation" in capsys.readouterr().out


def test_the_report_without_a_judge_and_with_a_judge_of_other_pairs(tmp_path):
    items = pair_items(4)
    study = Study.create(tmp_path / "study.db", items)
    cast_votes(study, PLAIN_VOTES, items)
    out = tmp_path / "report.json"
    assert annotate.main(["report", "--db", str(study.path), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["human_judge_agreement"] is None and "judge" not in report["pairs"][0]
    other = write_judge_output(tmp_path / "judge", pair_items(2, "X", "Y"), [W, L])
    with pytest.raises(StudyError, match="holds none of the study's pairs"):
        annotate.main(["report", "--db", str(study.path), "--judge", str(other), "--out", str(out)])
