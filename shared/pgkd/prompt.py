"""The PGKD teacher prompt, rendered from a GenerationRequest (after Di Palo et al., 2024, sec. 3)."""
from __future__ import annotations

import json

from .evaluation import EvalReport
from .mining import MinedSample
from .teacher import GenerationRequest

INSTRUCTIONS = """\
You are the teacher in a knowledge-distillation loop. A small student model classifies texts into
the classes below. Your task: write {n} new, realistic, labeled texts that will most improve the
student's accuracy when added to its training data.

Use the student's validation report, its hard negatives (texts it misclassified with high
confidence), and its correct and misclassified samples: focus on the classes it scores worst on
and on the boundaries between the classes it confuses. Write varied texts in the style of the
examples; do not copy or lightly edit any text shown here. Every label must be one of the classes."""

ANSWER_FORMAT = """\
Answer with a JSON list of exactly {n} objects and nothing else:
[{{"text": "...", "label": "..."}}, ...]"""


def _samples_block(title: str, samples: list[MinedSample], note: str) -> str:
    if not samples:
        return ""
    lines = [f"## {title}", note]
    lines += [json.dumps({"text": m.text, "label": m.label, "predicted": m.predicted,
                          "confidence": m.confidence}, ensure_ascii=False) for m in samples]
    return "\n".join(lines)


def _report_block(report: EvalReport) -> str:
    lines = ["## Validation report",
             f"accuracy {report.accuracy:.3f}, macro-F1 {report.macro_f1:.3f}, "
             f"weighted-F1 {report.weighted_f1:.3f}, loss {report.loss:.3f} ({report.samples} samples)",
             "Per class, worst F1 first (class: precision / recall / F1, support):"]
    ranked = sorted(report.per_class.items(), key=lambda kv: (kv[1].f1, kv[0]))
    lines += [f"- {label}: {s.precision:.2f} / {s.recall:.2f} / {s.f1:.2f}, {s.support}"
              for label, s in ranked if s.support > 0]
    if report.confusions:
        lines.append("Most confused pairs (true -> predicted: count):")
        lines += [f"- {c.true} -> {c.predicted}: {c.count}" for c in report.confusions]
    return "\n".join(lines)


def render_prompt(request: GenerationRequest) -> str:
    parts = [INSTRUCTIONS.format(n=request.n),
             "## Classes\n" + "\n".join(f"- {label}" for label in request.taxonomy)]
    if request.examples:
        parts.append("## Labeled examples\n" + "\n".join(
            json.dumps({"text": s.text, "label": s.label}, ensure_ascii=False) for s in request.examples))
    if request.report is not None:
        parts.append(_report_block(request.report))
    parts += [
        _samples_block("Hard negatives", request.hard_negatives,
                       "Misclassified with the highest confidence; label is the true class."),
        _samples_block("Misclassified samples", request.misclassified, "label is the true class."),
        _samples_block("Correctly classified samples", request.correct, "The student gets these right."),
        ANSWER_FORMAT.format(n=request.n),
    ]
    return "\n\n".join(p for p in parts if p) + "\n"
