"""Slot errors (Dušek, Howcroft and Rieser 2019): hand-read outputs with known errors, and the cleaned references.

The oracle for the hand-made cases is a person reading the sentence: each expected (missing, wrong, added)
triple below was written from the sentence and the MR, not from running the code.
"""

from __future__ import annotations

import pytest

from flashtune.data.e2e import default_e2e_path, load_e2e_csv
from flashtune.errors import FlashtuneError
from flashtune.evaluation.slot_errors import SlotMatcher, is_e2e_mr, matcher_for, slot_error_scores

MR_FULL = ("name[The Eagle], eatType[coffee shop], food[Chinese], priceRange[cheap], customer rating[5 out of 5], "
           "area[riverside], familyFriendly[no], near[Burger King]")

# (MR, output, (missing, wrong, added))
CASES = [
    # everything said, in words the rules must map: "inexpensive" = cheap, "five star" = 5 out of 5,
    # "by the river" = riverside, "adults only" = familyFriendly[no], "next to" = near
    (MR_FULL, "The Eagle is an inexpensive Chinese coffee shop by the river, next to Burger King. It is rated "
              "five stars and is for adults only.", (0, 0, 0)),
    # the failure: a short output that drops attributes and names the venue as its own landmark
    ("name[The Eagle], eatType[pub], area[riverside]", "The Eagle is a place near The Eagle.", (2, 0, 1)),
    # missing: food, rating, family; the rest said
    (MR_FULL, "The Eagle is a cheap coffee shop in the riverside area near Burger King.", (3, 0, 0)),
    # wrong values: expensive for cheap, city centre for riverside, low for 5 out of 5, kid friendly for no
    (MR_FULL, "The Eagle is an expensive Chinese coffee shop in the city centre near Burger King with a low "
              "customer rating. It is kid friendly.", (0, 4, 0)),
    # added: a price range, a rating and a landmark the MR does not have
    ("name[Aromi], eatType[coffee shop], food[English]",
     "Aromi is a highly rated English coffee shop with high prices near Café Rouge.", (0, 0, 3)),
    # a wrong landmark is a wrong value, not missing + added; a wrong name likewise
    ("name[Aromi], eatType[coffee shop], near[Café Rouge]", "Cotto is a coffee shop near Café Brazil.", (0, 2, 0)),
    ("name[Aromi], near[Café Rouge]", "Aromi is next to the Café Brazil.", (0, 1, 0)),
    # negation: "not family-friendly" said for familyFriendly[yes]
    ("name[Cocum], familyFriendly[yes]", "Cocum is not family-friendly.", (0, 1, 0)),
    # numbers and words realise each other: "less than £20" for cheap, "average" for 3 out of 5
    ("name[Cocum], priceRange[cheap], customer rating[3 out of 5]",
     "Cocum costs less than £20 and has an average customer rating.", (0, 0, 0)),
    # price and rating levels told apart by their cue words in one sentence
    ("name[Cocum], priceRange[high], customer rating[low]",
     "Cocum has high prices and a low customer rating.", (0, 0, 0)),
    ("name[Cocum], priceRange[high], customer rating[low]",
     "Cocum has low prices and a high customer rating.", (0, 2, 0)),
    # a name inside a landmark is not food: "Raja Indian Cuisine" says nothing about Indian food
    ("name[Cotto], near[Raja Indian Cuisine]", "Cotto is near Raja Indian Cuisine.", (0, 0, 0)),
    # several values of one attribute (as in the cleaned data): one said, one missing
    ("name[Cotto], eatType[coffee shop], eatType[restaurant]", "Cotto is a coffee shop.", (1, 0, 0)),
    # an invented venue (the demo's data) is known from its own MR
    ("name[The Silver Orchard], eatType[pub], near[The Golden Lantern]",
     "Near The Golden Lantern is The Silver Orchard, a pub.", (0, 0, 0)),
]


@pytest.mark.parametrize("mr,text,expected", CASES)
def test_hand_read_outputs(mr, text, expected):
    e = matcher_for([mr]).errors(mr, text)
    assert (e.missing, e.wrong, e.added) == expected, e.describe()
    assert e.total == mr.count("[")
    assert e.correct == (expected == (0, 0, 0))
    assert (e.describe() == "ok") == e.correct


def test_corpus_scores_add_up_over_outputs():
    mrs, texts = [c[0] for c in CASES], [c[1] for c in CASES]
    s = slot_error_scores(mrs, texts)
    slots = sum(mr.count("[") for mr in mrs)
    errors = sum(sum(c[2]) for c in CASES)
    assert s["slots"] == slots
    assert (s["missing"], s["wrong"], s["added"]) == tuple(sum(c[2][i] for c in CASES) for i in range(3))
    assert s["slot_error_rate"] == pytest.approx(100.0 * errors / slots)
    assert s["outputs_correct"] == pytest.approx(100.0 * sum(c[2] == (0, 0, 0) for c in CASES) / len(CASES))
    assert len(s["per_output"]) == len(CASES)


def test_bad_input_is_one_clear_error():
    with pytest.raises(FlashtuneError, match="pair up"):
        slot_error_scores(["name[A]"], [])
    with pytest.raises(FlashtuneError, match="no outputs"):
        slot_error_scores([], [])
    with pytest.raises(FlashtuneError, match="E2E attributes only"):
        SlotMatcher().errors("name[A], colour[red]", "A is red.")
    assert is_e2e_mr(MR_FULL) and not is_e2e_mr("colour[red]") and not is_e2e_mr("plain text")


@pytest.mark.skipif(not default_e2e_path().is_file(), reason="the shared E2E csv is not on this machine")
def test_cleaned_references_read_back_almost_without_errors():
    """The cleaned development split's MRs were re-derived from its texts by the authors' script, so its
    references must read back nearly clean under our rules. Measured: 2.0% slot error rate, 89% of references
    correct; most of what remains are values the texts do say that the cleaned MR lacks ("highly priced",
    "next to the river", "does not allow children")."""
    examples = load_e2e_csv()
    mrs = [ex.mr for ex in examples for _ in ex.refs]
    refs = [r for ex in examples for r in ex.refs]
    s = slot_error_scores(mrs, refs)
    assert s["slots"] > 20000
    assert s["slot_error_rate"] < 2.5
    assert s["outputs_correct"] > 87.0
    # The rules have power: the same references paired with shuffled MRs are mostly wrong.
    shifted = mrs[1000:] + mrs[:1000]
    bad = slot_error_scores(shifted, refs)
    assert bad["slot_error_rate"] > 30.0 and bad["outputs_correct"] < 20.0
