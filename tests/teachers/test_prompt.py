"""The PGKD prompt is pinned by a golden file; regenerate it with PGKD_UPDATE_GOLDEN=1 after a
deliberate change and review the diff."""
import os
from pathlib import Path

import numpy as np
from pgkd.types import Sample
from pgkd.loop.evaluation import evaluate
from pgkd.loop.mining import mine
from pgkd.teachers.prompt import render_prompt
from pgkd.loop.config import DistillConfig
from pgkd.loop.cycle import build_request

GOLDEN = Path(__file__).parent / "golden" / "prompt.txt"


def _request():
    labels = ["card_arrival", "lost_or_stolen_card", "refund_not_showing_up"]
    validation = [Sample(text="Where is my new card?", label="card_arrival"),
                  Sample(text="My card never came", label="card_arrival"),
                  Sample(text="Someone stole my card", label="lost_or_stolen_card"),
                  Sample(text="The refund is not on my statement", label="refund_not_showing_up")]
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.85, 0.05], [0.3, 0.1, 0.6]])
    report = evaluate([s.label for s in validation], probs, labels)
    mined = mine(validation, probs, labels, hard_negatives=2, misclassified=2, correct=2, seed=0)
    train = [Sample(text="When will my card arrive?", label="card_arrival"),
             Sample(text="I lost my card yesterday", label="lost_or_stolen_card"),
             Sample(text="Refund still missing", label="refund_not_showing_up")]
    return build_request(DistillConfig(data="-", seed=1, report_min_support=1), labels, train, mined, report, n=8,
                         cycle=1)


def test_prompt_matches_golden_file():
    text = render_prompt(_request())
    if os.environ.get("PGKD_UPDATE_GOLDEN"):
        GOLDEN.write_text(text, encoding="utf-8")
    assert text == GOLDEN.read_text(encoding="utf-8")


def test_prompt_without_report_or_hard_negatives_leaves_those_sections_out():
    request = _request()
    full = render_prompt(request)
    assert "## Validation report" in full and "## Hard negatives" in full
    bare = render_prompt(request.model_copy(update={"report": None, "hard_negatives": []}))
    assert "## Validation report" not in bare and "## Hard negatives" not in bare
    assert "exactly 8 samples" in bare


def test_a_prompt_reads_back_into_the_request_it_was_rendered_from():
    from pgkd.teachers.prompt import PromptError, read_prompt
    import pytest
    request = _request()
    text = render_prompt(request)
    back = read_prompt(text)
    assert render_prompt(back) == text
    assert (back.n, back.taxonomy, back.examples) == (8, request.taxonomy, request.examples)
    assert back.hard_negatives == request.hard_negatives and back.report.per_class.keys() == {
        c for c, s in request.report.per_class.items() if s.support}
    with pytest.raises(PromptError):
        read_prompt("Write me a poem about cards.")


def test_a_prompt_with_descriptions_and_a_supported_report_reads_back_whole():
    from pgkd.teachers.prompt import read_prompt
    request = _request()
    odd = "refund: not showing up"                     # a label that holds ": " is quoted in the class list
    request = request.model_copy(update={
        "taxonomy": [*request.taxonomy, odd], "report_min_support": 2,
        "descriptions": {"card_arrival": "asks when a new card arrives", odd: "a refund: missing"},
        "report": request.report.model_copy(update={"per_class": {
            c: s for c, s in request.report.per_class.items() if s.support >= 2}})})
    text = render_prompt(request)
    assert '- "refund: not showing up": a refund: missing' in text
    assert "Classes not listed were scored on fewer than 2 samples each" in text
    back = read_prompt(text)
    assert back.taxonomy == request.taxonomy and back.descriptions == request.descriptions
    assert back.report_min_support == 2 and set(back.report.per_class) == {"card_arrival"}
    assert render_prompt(back) == text
