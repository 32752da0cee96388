"""The PGKD teacher prompt, rendered from a GenerationRequest (after Di Palo et al., 2024, sec. 3),
and read back into one (`read_prompt`): the simulated teacher served on Triton sees only the prompt,
as an LLM would."""
from __future__ import annotations

import json
import re

from pgkd.types import ClassScores, Confusion, EvalReport, GenerationRequest, MinedSample, Sample

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


def repair_prompt(error: str) -> str:
    """The one follow-up an LLM gets when its answer was not the JSON asked for."""
    return (f"Your previous answer could not be used: {error}.\n"
            "Answer again with only the JSON list of {\"text\": ..., \"label\": ...} objects, nothing else.")


class PromptError(ValueError):
    """A text that is not a PGKD prompt."""


def _sections(text: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {"": []}
    current = ""
    for line in text.splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
            sections[current] = []
        else:
            sections[current].append(line)
    return sections


def _mined(lines: list[str]) -> list[MinedSample]:
    return [MinedSample.model_validate_json(line) for line in lines if line.startswith("{")]


def _read_report(lines: list[str]) -> EvalReport:
    head = re.search(r"accuracy ([\d.]+), macro-F1 ([\d.]+), weighted-F1 ([\d.]+), loss ([\d.]+) \((\d+) samples\)",
                     "\n".join(lines))
    if head is None:
        raise PromptError("validation report without its summary line")
    per_class, confusions = {}, []
    for line in lines:
        if m := re.fullmatch(r"- (.+): ([\d.]+) / ([\d.]+) / ([\d.]+), (\d+)", line):
            per_class[m[1]] = ClassScores(precision=float(m[2]), recall=float(m[3]), f1=float(m[4]),
                                          support=int(m[5]))
        elif m := re.fullmatch(r"- (.+) -> (.+): (\d+)", line):
            confusions.append(Confusion(true=m[1], predicted=m[2], count=int(m[3])))
    scored = list(per_class.values()) or [ClassScores(precision=0, recall=0, f1=0, support=0)]
    accuracy, macro_f1, weighted_f1, loss, samples = (float(head[1]), float(head[2]), float(head[3]),
                                                      float(head[4]), int(head[5]))
    return EvalReport(accuracy=accuracy, macro_f1=macro_f1, weighted_f1=weighted_f1, loss=loss, samples=samples,
                      macro_precision=sum(s.precision for s in scored) / len(scored),
                      macro_recall=sum(s.recall for s in scored) / len(scored),
                      weighted_precision=0.0, weighted_recall=0.0, per_class=per_class, confusions=confusions)


def read_prompt(text: str) -> GenerationRequest:
    """The request a PGKD prompt was rendered from, as far as the prompt shows it (scores to two
    decimals; classes without validation samples are absent from the report)."""
    wanted = re.search(r"write (\d+) new, realistic, labeled texts", text)
    sections = _sections(text)
    if wanted is None or "Classes" not in sections:
        raise PromptError("not a PGKD prompt: no request for N labeled texts or no list of classes")
    taxonomy = [line[2:] for line in sections["Classes"] if line.startswith("- ")]
    examples = [Sample.model_validate_json(line) for line in sections.get("Labeled examples", [])
                if line.startswith("{")]
    report = _read_report(sections["Validation report"]) if "Validation report" in sections else None
    return GenerationRequest(taxonomy=taxonomy, examples=examples, report=report, n=int(wanted[1]),
                             hard_negatives=_mined(sections.get("Hard negatives", [])),
                             misclassified=_mined(sections.get("Misclassified samples", [])),
                             correct=_mined(sections.get("Correctly classified samples", [])))
