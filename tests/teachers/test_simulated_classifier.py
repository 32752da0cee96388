"""The cascade's simulated LLM (a simulation, not an LLM): it answers the gold label with the stated
probability, a confusable wrong class otherwise, the same answer for the same text; and the
classification prompt reads back to the request it was rendered from, as the served simulation reads it."""
import pytest
from conftest import bag_of_words_embed
from hypothesis import given, settings, strategies as st

from pgkd.teachers.classifier import SimulatedLLMClassifier, confusable_classes
from pgkd.teachers.prompt import PromptError, read_classification, render_classification
from pgkd.types import ClassificationRequest, Sample

LABELS = ["card_lost", "refund", "transfer", "pin_change", "card_arrival"]


def test_it_is_right_about_as_often_as_its_accuracy_and_wrong_only_to_a_confusable_class():
    samples = [Sample(text=f"text number {i}", label=LABELS[i % len(LABELS)]) for i in range(4000)]
    confusable = confusable_classes(LABELS, bag_of_words_embed, k=2)
    llm = SimulatedLLMClassifier(samples, LABELS, accuracy=0.9, seed=3, confusable=confusable)
    answers = [llm.label(s.text) for s in samples]
    right = sum(a == s.label for a, s in zip(answers, samples)) / len(samples)
    assert 0.88 < right < 0.92
    assert all(a in confusable[s.label] for a, s in zip(answers, samples) if a != s.label)
    assert answers == [llm.label(s.text) for s in samples]          # the same text, the same answer
    assert llm.unknown == 0 and llm.label("never seen") in LABELS and llm.unknown == 1
    labels, usage = llm.classify(ClassificationRequest(taxonomy=LABELS, texts=[samples[0].text, samples[1].text]))
    assert labels == answers[:2] and usage.calls == 1


def test_it_knows_a_dataset_text_whatever_its_case_and_spacing_and_no_other():
    llm = SimulatedLLMClassifier([Sample(text="My card has not arrived", label="card_arrival")], LABELS, accuracy=1)
    assert llm.label("  my CARD has\tnot arrived ") == "card_arrival" and llm.unknown == 0
    assert llm.label("I still have not received my card") in LABELS and llm.unknown == 1   # a random class


def test_its_accuracy_must_be_a_probability():
    with pytest.raises(ValueError):
        SimulatedLLMClassifier([], LABELS, accuracy=1.5)


def test_confusable_classes_are_the_nearest_names_never_the_class_itself():
    near = confusable_classes(LABELS, bag_of_words_embed, k=3)
    assert all(label not in near[label] and len(near[label]) == 3 for label in LABELS)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=5))
def test_a_classification_prompt_reads_back_to_its_request(texts):
    request = ClassificationRequest(taxonomy=LABELS, texts=texts, descriptions={"refund": "money back"},
                                    examples=[Sample(text="I want my money back", label="refund")])
    assert read_classification(render_classification(request).text) == request


def test_a_generation_prompt_is_not_a_classification_prompt():
    with pytest.raises(PromptError):
        read_classification("Write 3 new texts")
