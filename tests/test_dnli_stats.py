"""DNLI shares with bootstrap intervals and the paired McNemar test against a reference model."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from pdpo_jax.evaluate.dnli_stats import (
    DnliStatsError, bootstrap_indices, dnli_statistics, mcnemar_exact, predictions_from_records,
)


def predictions(name, categories_by_subset, source=None):
    records = [
        {"id": f"{subset}:{i}", "subset": subset, "predicted_category": category}
        for subset, categories in categories_by_subset.items()
        for i, category in enumerate(categories)
    ]
    return predictions_from_records(name, records, source or f"{name}.examples.jsonl")


def test_mcnemar_by_hand():
    # b = 1, c = 5: P(X <= 1) for X ~ Bin(6, 1/2) is (1 + 6) / 64, two-sided 14 / 64.
    assert mcnemar_exact(1, 5) == pytest.approx(14 / 64)
    assert mcnemar_exact(5, 1) == pytest.approx(14 / 64)
    assert mcnemar_exact(0, 3) == pytest.approx(2 / 8)
    assert mcnemar_exact(3, 3) == 1.0  # an even split
    assert mcnemar_exact(0, 0) == 1.0  # nothing discordant: no evidence either way


@pytest.mark.parametrize("b, c", [(0, 10), (2, 9), (7, 8), (30, 12), (120, 95)])
def test_mcnemar_matches_scipy_binomtest(b, c):
    assert mcnemar_exact(b, c) == pytest.approx(binomtest(b, b + c, 0.5).pvalue, rel=1e-12)


def test_bootstrap_indices_keep_each_stratum_in_place():
    strata = ["a"] * 5 + ["b"] * 3 + ["a"] * 2
    draws = bootstrap_indices(strata, samples=200, seed=0)
    labels = np.asarray(strata)
    assert draws.shape == (200, 10)
    # Every position draws an example of its own stratum, so each resample has 7 a's and 3 b's.
    assert (labels[draws] == labels[None, :]).all()
    assert len(np.unique(draws[:, labels == "a"])) == 7  # and the draws do cover the stratum
    np.testing.assert_array_equal(draws, bootstrap_indices(strata, samples=200, seed=0))


def hand_case():
    """sft and dpo on 10 + 10 examples; hits and contradicts change on known examples."""
    sft = {"havenot": ["hits"] * 2 + ["contradict"] * 6 + ["entail", "rand"],
           "likes": ["hits"] * 1 + ["contradict"] * 5 + ["entail"] * 4}
    # havenot: 3 contradicts become hits, one hit becomes rand; likes: 2 contradicts become entail.
    dpo = {"havenot": ["hits", "rand"] + ["hits"] * 3 + ["contradict"] * 3 + ["entail", "rand"],
           "likes": ["hits"] + ["entail"] * 2 + ["contradict"] * 3 + ["entail"] * 4}
    return predictions("sft", sft), predictions("dpo", dpo)


def test_shares_and_paired_tests_by_hand():
    sft, dpo = hand_case()
    stats = dnli_statistics([dpo, sft], reference="sft", samples=2000, seed=1)
    assert stats["subsets"] == ["havenot", "likes"]
    rows = {row["name"]: row["groups"] for row in stats["models"]}
    assert rows["dpo"]["havenot"]["percentages"] == {"hits": 40.0, "contradict": 30.0, "entail": 10.0, "rand": 20.0}
    assert rows["dpo"]["overall"]["n"] == 20
    assert rows["dpo"]["overall"]["counts"] == {"hits": 5, "contradict": 6, "entail": 7, "rand": 2}
    paired = rows["dpo"]["havenot"]["paired"]
    assert (paired["hits"]["model_only"], paired["hits"]["reference_only"]) == (3, 1)
    assert paired["hits"]["p_value"] == pytest.approx(2 * 5 / 16)  # Bin(4, 1/2): P(X <= 1) = 5/16
    assert paired["hits"]["difference"] == pytest.approx(20.0)
    overall = rows["dpo"]["overall"]["paired"]["contradict"]
    assert (overall["model_only"], overall["reference_only"]) == (0, 5)
    assert overall["p_value"] == pytest.approx(2 / 32)
    assert overall["difference"] == pytest.approx(-25.0)
    assert rows["sft"]["overall"]["paired"] == {"hits": None, "contradict": None}


def test_intervals_contain_the_point_and_shrink_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (40, 400):
        cats = ["hits", "entail", "rand", "contradict"]
        sft = predictions("sft", {"s": list(rng.choice(cats, size=n, p=[0.2, 0.3, 0.1, 0.4]))})
        dpo = predictions("dpo", {"s": list(rng.choice(cats, size=n, p=[0.3, 0.3, 0.1, 0.3]))})
        stats = dnli_statistics([sft, dpo], reference="sft", samples=2000, seed=0)
        for row in stats["models"]:
            for group in row["groups"].values():
                assert sum(group["percentages"].values()) == pytest.approx(100.0)
                for category, (low, high) in group["intervals"].items():
                    assert low <= group["percentages"][category] <= high
                for test in filter(None, group["paired"].values()):
                    assert test["interval"][0] <= test["difference"] <= test["interval"][1]
        low, high = stats["models"][0]["groups"]["s"]["intervals"]["hits"]
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # about 1/sqrt(10) of it


def test_stratified_overall_keeps_subset_sizes():
    # One subset always hits, the other never: with subset sizes fixed, every resample of the
    # overall share is exactly 30/40, so the interval has no width; unstratified it would.
    model = predictions("sft", {"a": ["hits"] * 30, "b": ["rand"] * 10})
    stats = dnli_statistics([model], reference="sft", samples=500, seed=0)
    assert stats["models"][0]["groups"]["overall"]["intervals"]["hits"] == (75.0, 75.0)


def test_models_with_different_examples_are_refused():
    sft, dpo = hand_case()
    fewer = predictions("dpo", {"havenot": ["hits"] * 10, "likes": ["hits"] * 9}, source="runs/dpo.examples.jsonl")
    with pytest.raises(DnliStatsError, match=r"runs/dpo.examples.jsonl and sft.examples.jsonl hold different examples"):
        dnli_statistics([sft, fewer], reference="sft", samples=10)
    with pytest.raises(DnliStatsError, match="reference 'base' is not among"):
        dnli_statistics([sft, dpo], reference="base", samples=10)


def test_bad_records_name_the_file():
    with pytest.raises(DnliStatsError, match=r"x.jsonl: record 2: missing or non-string 'subset'"):
        predictions_from_records("m", [{"id": "a", "subset": "s", "predicted_category": "hits"}, {"id": "b"}], "x.jsonl")
    with pytest.raises(DnliStatsError, match="appears twice"):
        predictions_from_records("m", [{"id": "a", "subset": "s", "predicted_category": "hits"}] * 2, "x.jsonl")
    with pytest.raises(DnliStatsError, match="'gold' is not one of"):
        predictions_from_records("m", [{"id": "a", "subset": "s", "predicted_category": "gold"}], "x.jsonl")
