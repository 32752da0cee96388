"""The prompts an LLM teacher is sent, rendered by one renderer, and read back (`read_prompt`): the
simulated teacher served on Triton sees only the prompt, as an LLM would.

- The generation prompt (after Di Palo et al., 2024, sec. 3): write N labeled texts aimed at the
  student's weaknesses, from a GenerationRequest.
- The classification prompt: label these texts into the taxonomy, from a ClassificationRequest (the
  cascade's teacher answers with it).

Both show the classes with their descriptions (a taxonomy file, pgkd.taxonomy) and come with the JSON
schema of their answer (`Prompt.schema`): an OpenAI-compatible server is asked to follow it
(structured output), so labels outside the taxonomy and broken JSON cannot happen there.

`fit` keeps a prompt within a token limit by leaving out what matters least, in this order (TRIM_ORDER):
the correct samples, the misclassified ones, the labeled examples (strongest classes' first), and the
report lines of classes without errors. It never leaves out the taxonomy, the hard negatives, or the
report lines of classes with errors; a limit that even that minimal prompt exceeds is PromptTooLong.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Callable

from pgkd.errors import Option, UserError
from pgkd.types import (ClassificationRequest, ClassScores, Confusion, EvalReport, GenerationRequest, MinedSample,
                        Sample)

INSTRUCTIONS = """\
You are the teacher in a knowledge-distillation loop. A small student model classifies texts into
the classes below. Your task: write {n} new, realistic, labeled texts that will most improve the
student's accuracy when added to its training data.

Use the student's validation report, its hard negatives (texts it misclassified with high
confidence), and its correct and misclassified samples: focus on the classes it scores worst on
and on the boundaries between the classes it confuses. Write varied texts in the style of the
examples; do not copy or lightly edit any text shown here. Every label must be one of the classes."""

ANSWER_FORMAT = """\
Answer with a JSON object holding a list of exactly {n} samples, and nothing else:
{{"samples": [{{"text": "...", "label": "..."}}, ...]}}"""

CLASSIFY_INSTRUCTIONS = """\
Classify each numbered text below into exactly one of the classes. Every label must be one of the
classes, written exactly as listed."""

CLASSIFY_ANSWER_FORMAT = """\
Answer with a JSON object holding the {n} labels in the order of the texts, and nothing else:
{{"labels": ["...", ...]}}"""

# Room kept in every prompt for the words of a repair request (the prompt again, and `repair_prompt()`),
# so that no request sent exceeds --teacher-max-prompt-tokens.
REPAIR_TOKENS = 80
TRIM_ORDER = ("correct", "misclassified", "examples", "report_lines")   # what `fit` leaves out first


class PromptError(ValueError):
    """A text that is not a PGKD prompt."""


class PromptTooLong(UserError):
    """Even the minimal prompt (taxonomy, hard negatives, report lines of classes with errors) exceeds
    the token limit."""


@dataclass
class Prompt:
    text: str
    schema: dict                                               # the JSON schema of the answer
    tokens: int | None = None                                  # as counted by `fit`
    trimmed: dict[str, int] = field(default_factory=dict)      # items left out to fit, by kind (TRIM_ORDER)


# -- the parts both prompts share ------------------------------------------------------------------------------

def _class_line(label: str, description: str | None) -> str:
    shown = json.dumps(label, ensure_ascii=False) if (": " in label or label.startswith('"')) else label
    return f"- {shown}: {description}" if description else f"- {shown}"


def _read_class_line(line: str) -> tuple[str, str | None]:
    body = line[2:]
    if body.startswith('"'):
        label, end = json.JSONDecoder().raw_decode(body)
        rest = body[end:]
        return label, rest[2:] if rest.startswith(": ") else None
    label, sep, description = body.partition(": ")
    return label, description if sep else None


def classes_block(taxonomy: list[str], descriptions: dict[str, str]) -> str:
    title = "## Classes" + (" (label: what it means)" if descriptions else "")
    return "\n".join([title] + [_class_line(label, descriptions.get(label)) for label in taxonomy])


def examples_block(examples: list[Sample]) -> str:
    if not examples:
        return ""
    return "## Labeled examples\n" + "\n".join(
        json.dumps({"text": s.text, "label": s.label}, ensure_ascii=False) for s in examples)


def render(parts: list[str]) -> str:
    return "\n\n".join(p for p in parts if p) + "\n"


def samples_schema(taxonomy: list[str], n: int) -> dict:
    """The answer to a generation prompt: exactly n samples, each label one of the taxonomy."""
    item = {"type": "object", "properties": {"text": {"type": "string"}, "label": {"type": "string", "enum": taxonomy}},
            "required": ["text", "label"], "additionalProperties": False}
    return {"type": "object", "properties": {"samples": {"type": "array", "items": item, "minItems": n, "maxItems": n}},
            "required": ["samples"], "additionalProperties": False}


def labels_schema(taxonomy: list[str], n: int) -> dict:
    """The answer to a classification prompt: one label of the taxonomy per text, in order."""
    labels = {"type": "array", "items": {"type": "string", "enum": taxonomy}, "minItems": n, "maxItems": n}
    return {"type": "object", "properties": {"labels": labels}, "required": ["labels"], "additionalProperties": False}


# -- the generation prompt ---------------------------------------------------------------------------------

def recall_interval(recall: float, support: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's 95% interval for a recall measured on `support` samples."""
    if support <= 0:
        return 0.0, 1.0
    centre = (recall + z * z / (2 * support)) / (1 + z * z / support)
    half = z * math.sqrt(recall * (1 - recall) / support + z * z / (4 * support * support)) / (1 + z * z / support)
    return max(0.0, centre - half), min(1.0, centre + half)


def _ranked_classes(report: EvalReport) -> list[tuple[str, ClassScores]]:
    """The classes the report shows one by one, worst F1 first."""
    return sorted(((c, s) for c, s in report.per_class.items() if s.support > 0), key=lambda kv: (kv[1].f1, kv[0]))


def _without_errors(scores: ClassScores) -> bool:
    return scores.precision >= 1.0 and scores.recall >= 1.0


def _report_block(report: EvalReport, min_support: int, drop_clean: int = 0) -> str:
    lines = ["## Validation report",
             f"accuracy {report.accuracy:.3f}, macro-F1 {report.macro_f1:.3f}, "
             f"weighted-F1 {report.weighted_f1:.3f}, loss {report.loss:.3f} ({report.samples} samples)",
             "Per class, worst F1 first (class: precision / recall / F1, support; 95% interval of the recall):"]
    ranked = _ranked_classes(report)
    clean = [c for c, s in ranked if _without_errors(s)]
    dropped = set(clean[len(clean) - drop_clean:]) if drop_clean else set()
    for label, s in ranked:
        if label not in dropped:
            low, high = recall_interval(s.recall, s.support)
            lines.append(f"- {label}: {s.precision:.2f} / {s.recall:.2f} / {s.f1:.2f}, {s.support}; {low:.2f}-{high:.2f}")
    if min_support > 1:
        lines.append(f"Classes not listed were scored on fewer than {min_support} samples each: too few to judge "
                     "one by one.")
    if dropped:
        lines.append(f"{len(dropped)} more classes had no errors (left out for length).")
    if report.confusions:
        lines.append("Most confused pairs (true -> predicted: count):")
        lines += [f"- {c.true} -> {c.predicted}: {c.count}" for c in report.confusions]
    return "\n".join(lines)


def _samples_block(title: str, samples: list[MinedSample], note: str) -> str:
    if not samples:
        return ""
    lines = [f"## {title}", note]
    lines += [json.dumps({"text": m.text, "label": m.label, "predicted": m.predicted,
                          "confidence": m.confidence}, ensure_ascii=False) for m in samples]
    return "\n".join(lines)


def _available(request: GenerationRequest) -> dict[str, int]:
    clean = sum(_without_errors(s) for _, s in _ranked_classes(request.report)) if request.report else 0
    return {"correct": len(request.correct), "misclassified": len(request.misclassified),
            "examples": len(request.examples), "report_lines": clean}


def _render_generation(request: GenerationRequest, keep: dict[str, int], note: str = "") -> str:
    parts = [INSTRUCTIONS.format(n=request.n), classes_block(request.taxonomy, request.descriptions),
             examples_block(request.examples[:keep["examples"]])]
    if request.report is not None:
        parts.append(_report_block(request.report, request.report_min_support,
                                   drop_clean=_available(request)["report_lines"] - keep["report_lines"]))
    parts += [
        _samples_block("Hard negatives", request.hard_negatives,
                       "Misclassified with the highest confidence; label is the true class."),
        _samples_block("Misclassified samples", request.misclassified[:keep["misclassified"]],
                       "label is the true class."),
        _samples_block("Correctly classified samples", request.correct[:keep["correct"]],
                       "The student gets these right."),
        ANSWER_FORMAT.format(n=request.n), note.strip()]
    return render(parts)


def render_prompt(request: GenerationRequest) -> str:
    """The generation prompt, whole."""
    return _render_generation(request, _available(request))


def fit(request: GenerationRequest, max_tokens: int | None, count: Callable[[str], int] | None,
        note: str = "", reserve: int = 0) -> Prompt:
    """The generation prompt within `max_tokens` less `reserve` (as `count` counts them), trimmed in
    TRIM_ORDER; `note` is appended (a part of a split request says which part it is)."""
    limit = None if max_tokens is None else max_tokens - reserve
    available = _available(request)
    keep = dict(available)
    schema = samples_schema(request.taxonomy, request.n)

    def tokens_of(kept: dict[str, int]) -> tuple[str, int | None]:
        text = _render_generation(request, kept, note)
        return text, (count(text) if count is not None else None)
    text, tokens = tokens_of(keep)
    if limit is None or tokens is None or tokens <= limit:
        return Prompt(text=text, schema=schema, tokens=tokens)
    for kind in TRIM_ORDER:
        keep[kind] = 0
        text, tokens = tokens_of(keep)
        if tokens > limit:
            continue                      # all of this kind is not enough: on to the next
        low, high = 0, available[kind]    # the most of this kind that still fits: low fits, high + 1 does not
        while low < high:
            middle = (low + high + 1) // 2
            if tokens_of({**keep, kind: middle})[1] <= limit:
                low = middle
            else:
                high = middle - 1
        keep[kind] = low
        text, tokens = tokens_of(keep)
        return Prompt(text=text, schema=schema, tokens=tokens,
                      trimmed={k: available[k] - keep[k] for k in TRIM_ORDER if available[k] > keep[k]})
    raise PromptTooLong(Option("teacher_max_prompt_tokens", max_tokens),
                        f": even the smallest prompt takes {tokens} tokens (the {len(request.taxonomy)} classes"
                        f"{' with their descriptions' if request.descriptions else ''}, "
                        f"{len(request.hard_negatives)} hard negatives and the report lines of classes with errors"
                        f"{f', and {reserve} for a repair request' if reserve else ''}); raise the limit, or lower ",
                        Option("hard_negatives"))


def repair_prompt() -> str:
    """The one follow-up an LLM gets when its answer was not the JSON asked for: sent after the prompt
    again, without the broken answer, so that it fits where the prompt did (REPAIR_TOKENS)."""
    return ("[Your previous answer to this could not be used: it held no JSON object with the samples.]\n"
            "Answer again with only the JSON object {\"samples\": [{\"text\": ..., \"label\": ...}, ...]}, "
            "nothing else.")


# -- the classification prompt -------------------------------------------------------------------------------

# What str.splitlines breaks at besides \n and \r, which JSON leaves as they are: escaped, a text stays one line.
_LINE_BREAKS = {c: f"\\u{ord(c):04x}" for c in "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}


def _one_line(text: str) -> str:
    return json.dumps(text, ensure_ascii=False).translate(str.maketrans(_LINE_BREAKS))


def render_classification(request: ClassificationRequest) -> Prompt:
    texts = "## Texts\n" + "\n".join(f"{i + 1}. {_one_line(t)}" for i, t in enumerate(request.texts))
    text = render([CLASSIFY_INSTRUCTIONS, classes_block(request.taxonomy, request.descriptions),
                   examples_block(request.examples), texts, CLASSIFY_ANSWER_FORMAT.format(n=len(request.texts))])
    return Prompt(text=text, schema=labels_schema(request.taxonomy, len(request.texts)))


# -- reading a generation prompt back (the simulated teacher served on Triton) -------------------------------

def _sections(text: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {"": []}
    current = ""
    for line in text.splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
            sections[current] = []
        elif line.startswith("Answer with a JSON"):    # the answer format closes the last section
            current = ""
        else:
            sections[current].append(line)
    return sections


def _mined(lines: list[str]) -> list[MinedSample]:
    return [MinedSample.model_validate_json(line) for line in lines if line.startswith("{")]


def _read_report(lines: list[str]) -> tuple[EvalReport, int]:
    head = re.search(r"accuracy ([\d.]+), macro-F1 ([\d.]+), weighted-F1 ([\d.]+), loss ([\d.]+) \((\d+) samples\)",
                     "\n".join(lines))
    if head is None:
        raise PromptError("validation report without its summary line")
    per_class, confusions, min_support = {}, [], 1
    for line in lines:
        if m := re.fullmatch(r"- (.+): ([\d.]+) / ([\d.]+) / ([\d.]+), (\d+); [\d.]+-[\d.]+", line):
            per_class[m[1]] = ClassScores(precision=float(m[2]), recall=float(m[3]), f1=float(m[4]),
                                          support=int(m[5]))
        elif m := re.fullmatch(r"- (.+) -> (.+): (\d+)", line):
            confusions.append(Confusion(true=m[1], predicted=m[2], count=int(m[3])))
        elif m := re.match(r"Classes not listed were scored on fewer than (\d+) samples", line):
            min_support = int(m[1])
    scored = list(per_class.values()) or [ClassScores(precision=0, recall=0, f1=0, support=0)]
    accuracy, macro_f1, weighted_f1, loss, samples = (float(head[1]), float(head[2]), float(head[3]),
                                                      float(head[4]), int(head[5]))
    return EvalReport(accuracy=accuracy, macro_f1=macro_f1, weighted_f1=weighted_f1, loss=loss, samples=samples,
                      macro_precision=sum(s.precision for s in scored) / len(scored),
                      macro_recall=sum(s.recall for s in scored) / len(scored),
                      weighted_precision=0.0, weighted_recall=0.0, per_class=per_class,
                      confusions=confusions), min_support


def read_prompt(text: str) -> GenerationRequest:
    """The request a PGKD prompt was rendered from, as far as the prompt shows it (scores to two
    decimals; classes without validation samples are absent from the report)."""
    wanted = re.search(r"write (\d+) new, realistic, labeled texts", text)
    sections = _sections(text)
    classes = next((lines for title, lines in sections.items() if title.startswith("Classes")), None)
    if wanted is None or classes is None:
        raise PromptError("not a PGKD prompt: no request for N labeled texts or no list of classes")
    read = [_read_class_line(line) for line in classes if line.startswith("- ")]
    examples = [Sample.model_validate_json(line) for line in sections.get("Labeled examples", [])
                if line.startswith("{")]
    report, min_support = (_read_report(sections["Validation report"]) if "Validation report" in sections
                           else (None, 1))
    return GenerationRequest(taxonomy=[label for label, _ in read],
                             descriptions={label: d for label, d in read if d is not None},
                             examples=examples, report=report, n=int(wanted[1]), report_min_support=min_support,
                             hard_negatives=_mined(sections.get("Hard negatives", [])),
                             misclassified=_mined(sections.get("Misclassified samples", [])),
                             correct=_mined(sections.get("Correctly classified samples", [])))


def read_classification(text: str) -> ClassificationRequest:
    """The classification request a prompt was rendered from (render_classification), as far as the
    prompt shows it: what a simulated LLM served on Triton reads, as an LLM would."""
    if not text.startswith(CLASSIFY_INSTRUCTIONS.splitlines()[0]):
        raise PromptError("not a PGKD classification prompt")
    sections = _sections(text)
    classes = next((lines for title, lines in sections.items() if title.startswith("Classes")), [])
    read = [_read_class_line(line) for line in classes if line.startswith("- ")]
    texts = []
    for line in sections.get("Texts", []):
        if m := re.fullmatch(r"(\d+)\. (.*)", line):
            texts.append(json.loads(m[2]))
    if not read or not texts:
        raise PromptError("a classification prompt without its classes or its texts")
    examples = [Sample.model_validate_json(line) for line in sections.get("Labeled examples", [])
                if line.startswith("{")]
    return ClassificationRequest(taxonomy=[label for label, _ in read],
                                 descriptions={label: d for label, d in read if d is not None},
                                 examples=examples, texts=texts)
