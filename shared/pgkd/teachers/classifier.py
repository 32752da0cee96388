"""A simulated LLM that classifies: the cascade's teacher in tests and in `pgkd bench cascade`.

It is a simulation, not an LLM: it knows the dataset's gold labels and answers a text's gold label
with probability `accuracy`, otherwise a plausible wrong class (one of the `confusable` classes whose
names are nearest the gold label's, by the sentence encoder). The draw is seeded by the text, so a
text asked twice gets the same answer, as from an LLM at temperature 0. A text it has no gold label
for gets a class drawn the same way from the whole taxonomy (counted in `unknown`). Its accuracy is
the same on every text, where a real LLM's is lower on the texts a student finds hard: a cascade's
measured accuracy with it is an upper bound of what the same threshold gives with a real LLM of that
overall accuracy.
"""
from __future__ import annotations

import hashlib
import random

import numpy as np

from pgkd.data import normalize_text
from pgkd.types import ClassificationRequest, Sample, TeacherUsage

CONFUSABLE = 3
# What it knows, as `pgkd teacher serve` says when it starts: a user's own text gets an arbitrary label.
UNKNOWN_TEXTS = ("it knows the gold labels of the dataset's texts only (case and spacing aside) and answers "
                 "any other text with a random class")


def confusable_classes(labels: list[str], embed, k: int = CONFUSABLE) -> dict[str, list[str]]:
    """Each label's `k` nearest labels, by the encoder's embedding of their names (`_` as spaces)."""
    if len(labels) < 2:
        return {label: [] for label in labels}
    vectors = np.asarray(embed([label.replace("_", " ") for label in labels]), dtype=np.float64)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :min(k, len(labels) - 1)]
    return {label: [labels[j] for j in order[i]] for i, label in enumerate(labels)}


class SimulatedLLMClassifier:
    """`classify` as pgkd.teachers.llm.LLMTeacher's, answered by the simulation (see the module)."""
    simulated = True

    def __init__(self, samples: list[Sample], labels: list[str], accuracy: float, seed: int = 0,
                 confusable: dict[str, list[str]] | None = None):
        if not 0 <= accuracy <= 1:
            raise ValueError(f"accuracy {accuracy}: expected a number in [0, 1]")
        self.gold = {normalize_text(s.text): s.label for s in samples}
        self.labels, self.accuracy, self.seed = list(labels), accuracy, seed
        self.confusable = confusable or {label: [other for other in labels if other != label] for label in labels}
        self.name = f"simulated-llm-{accuracy:g}"
        self.unknown = 0

    def describe(self) -> dict:
        return {"name": self.name, "simulated": True, "accuracy": self.accuracy, "seed": self.seed,
                "wrong_answers": f"one of the {CONFUSABLE} classes whose names are nearest the gold label's"}

    def _rng(self, text: str) -> random.Random:
        digest = hashlib.sha256(f"{self.seed}\0{text}".encode("utf-8", "surrogatepass")).digest()
        return random.Random(int.from_bytes(digest[:8], "big"))

    def label(self, text: str, taxonomy: list[str] | None = None) -> str:
        rng, key = self._rng(text), normalize_text(text)
        taxonomy = taxonomy or self.labels
        gold = self.gold.get(key)
        if gold is None:
            self.unknown += 1
            return rng.choice(taxonomy)
        if rng.random() < self.accuracy:
            return gold
        wrong = [c for c in self.confusable.get(gold, []) if c in taxonomy and c != gold] or \
            [c for c in taxonomy if c != gold] or [gold]
        return rng.choice(wrong)

    def classify(self, request: ClassificationRequest) -> tuple[list[str | None], TeacherUsage]:
        return [self.label(t, request.taxonomy) for t in request.texts], TeacherUsage(calls=1)
