"""`pgkd bench cascade`: the student answers, a simulated LLM backs it up.

Per dataset, a distilled run (the guided simulation as teacher, `out=None`) gives the kept student,
calibrated on the validation texts the teacher never saw (`student.calibration`, which keeps those held
scores). A SIMULATION of an LLM classifier (pgkd.teachers.classifier.SimulatedLLMClassifier: it answers
a text's gold label with probability `llm_accuracy`, otherwise one of the classes whose names are
nearest the gold label's) answers the texts the student defers. Measured on test:

- the curve: the cascade's accuracy at each share of texts sent to the simulated LLM (0, 5%, ..., 100%),
  deferring the texts the student is least sure of. Its cut-offs are test confidences' quantiles: the
  curve describes the student's ranking, no choice is made on it;
- each target (an accuracy the student's answers must hold, or the most the simulated LLM may see): its
  threshold is chosen on the held validation scores alone (`Calibration.threshold_for`), then measured
  on test: the simulated LLM's share, the cascade's accuracy, the student's answers' accuracy, and the cost
  per million texts at the stated prices;
- the stream (prequential, here in this process; not through Kafka and the services): test traffic,
  shuffled, in windows; in each, the current student and threshold route each text, the simulated LLM
  labels what is deferred, the window is scored on its gold labels, and then those labels (teacher
  labels, kept apart from validation) join the training data, the student is retrained and recalibrated
  on the same held validation texts; it replaces the serving student only when it answers more of them at
  the target (the stream's promotion rule for runs with a cascade target, pgkd.stream.promotion), and the
  serving student's threshold is chosen for the same target.

The simulated LLM is right on hard texts as often as on easy ones, where a real LLM's errors gather on
the texts a student finds hard too: a cascade's accuracy measured with it is an upper bound of what the
same threshold gives with a real LLM of that overall accuracy.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pgkd.calibration import Calibration, Deferral, calibrate, expected_calibration_error
from pgkd.data import Splits, load_dataset, make_splits
from pgkd.encoder import EmbeddingCache
from pgkd.errors import Option, UserError
from pgkd.files import write_json_atomic
from pgkd.loop.config import DistillConfig
from pgkd.loop.cycle import fresh_student, known_texts, log, make_teacher
from pgkd.loop.embedded import run
from pgkd.loop.screening import screen
from pgkd.names import check_name
from pgkd.ownership import claim_folder
from pgkd.stream.promotion import cascade_score, compare, score
from pgkd.teachers.classifier import SimulatedLLMClassifier, confusable_classes
from pgkd.teachers.prompt import render_classification
from pgkd.types import ClassificationRequest, Sample

DATASETS = ("banking77", "clinc150", "hwu64")
SHARES = tuple(round(i / 20, 2) for i in range(21))      # the curve's shares sent to the simulated LLM
DEFAULT_TARGETS = "p-0.01,p-0.02,share:0.2"
EXAMPLES_PER_CLASS = 2                                    # in the classification prompt, from the labeled train samples
# An assumed LLM price, not a quote: $ per million input and output tokens (a small hosted model's list price).
PRICE_PER_MILLION_TOKENS = 0.15
PRICE_PER_MILLION_OUTPUT_TOKENS = 0.60
# The student's cost per million texts, from BENCHMARKS.md "Serving: the student answering traffic": the demo's
# student served on Triton over gRPC, 337 texts/s in calls of 64 on 2 CPU threads, at $0.05 per CPU-hour.
STUDENT_TEXTS_PER_SECOND = 337
STUDENT_CPU_THREADS = 2
PRICE_PER_CPU_HOUR = 0.05
STUDENT_COST_PER_MILLION = round(STUDENT_CPU_THREADS * PRICE_PER_CPU_HOUR / 3600 / STUDENT_TEXTS_PER_SECOND * 1e6, 4)
# Where the distilled run's guidance comes from. Out of fold, no request shows the teacher a validation text,
# so the held scores are the whole validation split. Guided by validation, the requests show it the student's
# validation mistakes, and the texts left held are mostly ones it got right: thresholds chosen there are far
# too low (BENCHMARKS.md, "The cascade").
GUIDANCE_SOURCE = "out-of-fold"
GOAL_STUDENT_SHARE = 0.70     # at the target within 1 point of the simulated LLM's accuracy, on banking77
GOAL_DATASET = "banking77"
STREAM_ACCURACY_SLACK = 0.01  # "the same accuracy": no window more than this below the first window's

# Published figures, theirs (real LLM APIs, their tasks), not measured here.
REFERENCES = [
    {"work": "FrugalGPT (Chen, Zaharia, Zou, 2023)",
     "setting": "a cascade of commercial LLM APIs, a learned scorer deciding when to stop",
     "figure": "matches the best single LLM (GPT-4) at up to 98% lower cost"},
    {"work": "Online Cascade Learning (Nie et al., ICML 2024)",
     "setting": "small models learned online from an LLM's answers, with a learned deferral policy",
     "figure": "LLM accuracy at up to 90% lower inference cost"},
]


@dataclass(frozen=True)
class Target:
    """What the threshold is chosen for: the accuracy the student's own answers must hold on the held
    scores (`accuracy`), or the most of them the simulated LLM may answer (`share`)."""
    kind: str            # accuracy | share
    value: float
    written: str         # as the user wrote it

    @property
    def name(self) -> str:
        return (f"student accuracy {self.value:g}" if self.kind == "accuracy"
                else f"simulated LLM share at most {self.value:g}")

    @property
    def policy(self) -> dict:
        """As pgkd.calibration and pgkd.stream.promotion take it."""
        return {"target_accuracy": self.value} if self.kind == "accuracy" else {"max_teacher_share": self.value}

    def choose(self, calibration: Calibration) -> Deferral:
        """The threshold, chosen on the held validation scores `calibration` keeps (never on test)."""
        if self.kind == "accuracy":
            return calibration.threshold_for(target_accuracy=self.value)
        return calibration.threshold_for(max_teacher_share=self.value)


def parse_targets(text: str, llm_accuracy: float) -> list[Target]:
    """`p-0.01` (an accuracy 0.01 below --llm-accuracy), `0.93` (an accuracy), `share:0.2` (the most the
    simulated LLM may answer), comma-separated."""
    targets = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            raise UserError(Option("targets", text), ": an empty target between commas")
        try:
            if item.startswith("share:"):
                target = Target("share", float(item[len("share:"):]), item)
            elif item.startswith("p-"):
                target = Target("accuracy", round(llm_accuracy - float(item[2:]), 6), item)
            else:
                target = Target("accuracy", float(item), item)
        except ValueError:
            raise UserError(Option("targets", text), f": {item!r} is not p-D, a number or share:S") from None
        low_ok = target.value >= 0 if target.kind == "share" else target.value > 0   # as distill's options
        if not (low_ok and target.value <= 1):
            raise UserError(Option("targets", text), f": {item!r} gives {target.value:g}, outside "
                            + ("[0, 1]" if target.kind == "share" else "(0, 1]"))
        if any(t.kind == target.kind and t.value == target.value for t in targets):
            raise UserError(Option("targets", text), f": {item!r} is given twice")
        targets.append(target)
    if not targets:
        raise UserError(Option("targets", text), ": no target")
    return targets


# -- the measures -----------------------------------------------------------------------------------------

def route(confidence: np.ndarray, threshold: float | None, student: np.ndarray, llm: np.ndarray,
          gold: np.ndarray) -> dict:
    """The cascade on these texts: the student answers where its calibrated confidence is at least
    `threshold` (None: it answers nothing), the simulated LLM the rest. Classes as indices."""
    answered = np.zeros(len(gold), bool) if threshold is None else np.asarray(confidence) >= threshold
    final = np.where(answered, student, llm)
    deferred = ~answered
    return {"texts": int(len(gold)), "teacher_share": float(deferred.mean()),
            "student_share": float(answered.mean()), "cascade_accuracy": float((final == gold).mean()),
            "student_accuracy": float((student[answered] == gold[answered]).mean()) if answered.any() else None,
            "teacher_accuracy": float((llm[deferred] == gold[deferred]).mean()) if deferred.any() else None}


def curve(confidence: np.ndarray, student: np.ndarray, llm: np.ndarray, gold: np.ndarray,
          shares=SHARES) -> list[dict]:
    """The cascade's accuracy when the `share` of texts the student is least sure of goes to the
    simulated LLM (cut at test confidences' quantiles: a description of the ranking, not a choice)."""
    order = np.argsort(np.asarray(confidence), kind="stable")     # least sure first
    points = []
    for share in shares:
        k = int(round(share * len(gold)))
        final = student.copy()
        final[order[:k]] = llm[order[:k]]
        points.append({"teacher_share": float(share), "deferred": k, "cascade_accuracy": float((final == gold).mean())})
    return points


def llm_cost_per_million(input_tokens: float, output_tokens: float, price_in: float, price_out: float) -> float:
    """$ per million texts: tokens per text times $ per million tokens."""
    return input_tokens * price_in + output_tokens * price_out


def cascade_cost_per_million(teacher_share: float, llm: float, student: float) -> float:
    """The student scores every text; the simulated LLM is paid for the share it answers."""
    return student + teacher_share * llm


def prompt_examples(splits: Splits, seed: int) -> list[Sample]:
    """EXAMPLES_PER_CLASS labeled train samples of each class (seeded), the prompt's few-shot examples."""
    rng = random.Random(seed)
    by_label: dict[str, list[Sample]] = {}
    for s in splits.train:
        by_label.setdefault(s.label, []).append(s)
    return [e for label in splits.labels for e in rng.sample(by_label.get(label, []),
                                                             min(EXAMPLES_PER_CLASS, len(by_label.get(label, []))))]


def prompt_tokens(labels: list[str], examples: list[Sample], texts: list[str], gold: list[str], count) -> dict:
    """Tokens of one call per text (the classification prompt: instructions, taxonomy, examples, the text)
    and of its answer (the JSON of one label), means over `texts`, by `count`."""
    def prompt(text: str) -> str:
        return render_classification(ClassificationRequest(taxonomy=labels, texts=[text], examples=examples)).text
    inputs = [count(prompt(t)) for t in texts]
    outputs = [count(json.dumps({"labels": [label]})) for label in gold]
    return {"input_per_text": float(np.mean(inputs)), "output_per_text": float(np.mean(outputs)),
            "fixed_per_call": count(prompt("")), "texts": len(texts), "texts_per_call": 1}


# -- the run's kept training set and held validation texts ------------------------------------------------

class RecordedTeacher:
    """The run's teacher, unchanged, with each request and answer kept: which validation texts the
    requests showed (they cannot be held scores) and the samples (the kept cycle's training set)."""

    def __init__(self, teacher):
        self._teacher = teacher
        self.requests, self.batches = [], []

    def generate(self, request):
        batch = self._teacher.generate(request)
        self.requests.append(request)
        self.batches.append(batch)
        return batch

    def __getattr__(self, name):
        return getattr(self._teacher, name)


def kept_train(splits: Splits, teacher: RecordedTeacher, best_cycle: int, expected: int) -> list[Sample]:
    """The training set of the kept cycle: the labeled train samples and the screened answers of the
    requests before it, as the loop grew it (pgkd.loop.cycle.teach)."""
    train = list(splits.train)
    for batch in teacher.batches[:best_cycle]:
        train += screen(batch.samples, splits.labels, known_texts(splits, train)).accepted
    if len(train) != expected:
        raise RuntimeError(f"the kept cycle trained on {expected} samples; replaying its requests gives {len(train)}")
    return train


def held_validation(splits: Splits, teacher: RecordedTeacher) -> list[Sample]:
    """The validation texts no request showed the teacher (pgkd.loop.distillation.shown_validation)."""
    shown = {m.text for r in teacher.requests for m in (*r.hard_negatives, *r.misclassified, *r.correct)}
    return [s for s in splits.validation if s.text not in shown]


def check_held(student, held: list[Sample]) -> None:
    """The held texts found again give exactly the scores the run calibrated on."""
    calibration = student.calibration
    confidence = np.asarray(student.predict_proba([s.text for s in held])).max(axis=1) if held else np.zeros(0)
    if calibration.samples != len(held) or not np.allclose(confidence, calibration.confidence, atol=1e-5):
        raise RuntimeError("the held validation texts found again do not give the run's calibration scores")


def recalibrate(student, held: list[Sample], labels: list[str]) -> Calibration:
    """The student's calibration on the held validation texts, fit again (a retrained student)."""
    student.calibration = None
    index = {label: i for i, label in enumerate(labels)}
    probs = np.asarray(student.predict_proba([s.text for s in held]))
    student.calibration = calibrate(probs, np.array([index[s.label] for s in held], dtype=np.int64),
                                    f"the {len(held)} held validation texts of the distilled run (never shown to "
                                    "its teacher), for the stream's retrained student")
    return student.calibration


def chosen(target: Target, calibration: Calibration) -> tuple[Deferral | None, str | None]:
    try:
        return target.choose(calibration), None
    except UserError as e:      # the held scores cannot meet it: the student answers nothing
        return None, str(e)


# -- one dataset ------------------------------------------------------------------------------------------

def run_cascade_bench(data_root: Path, datasets: list[str], out: Path, labeled: int = 1000,
                      student: str = "minilm-frozen", max_cycles: int = 3, llm_accuracy: float = 0.95,
                      targets: str = DEFAULT_TARGETS, price_per_million_tokens: float = PRICE_PER_MILLION_TOKENS,
                      price_per_million_output_tokens: float = PRICE_PER_MILLION_OUTPUT_TOKENS,
                      student_cost_per_million: float = STUDENT_COST_PER_MILLION, windows: int = 5, seed: int = 1,
                      guidance_source: str = GUIDANCE_SOURCE, progress: bool = True, encoder=None,
                      count_tokens=None) -> dict:
    """Every dataset's curve, targets, costs and stream; writes OUT/cascade.md, cascade.png and, last,
    cascade.json. `encoder` (default MiniLM) and `count_tokens` (default pgkd.teachers.llm.TokenCounter,
    MiniLM's tokenizer) are the tests' to replace."""
    if not 0 <= llm_accuracy <= 1:
        raise UserError(Option("llm_accuracy", llm_accuracy), ": expected a number in [0, 1]")
    if guidance_source not in ("out-of-fold", "validation"):
        raise UserError(Option("guidance_source", guidance_source), ": expected out-of-fold or validation")
    if windows < 1:
        raise UserError(Option("windows", windows), ": expected 1 or more")
    for name, value in (("price_per_million_tokens", price_per_million_tokens),
                        ("price_per_million_output_tokens", price_per_million_output_tokens),
                        ("student_cost_per_million", student_cost_per_million)):
        if not value >= 0:
            raise UserError(Option(name, value), ": expected 0 or more")
    parsed = parse_targets(targets, llm_accuracy)
    for name in datasets:
        check_name(Path(name).name, "dataset")
    paths = {name: (Path(name) if Path(name).is_dir() else data_root / name) for name in datasets}
    for name, path in paths.items():
        if not path.is_dir():
            raise UserError(f"dataset {name}: no folder {path}")
    out = claim_folder(out)   # pgkd's own, or refused before anything in it is touched (pgkd.ownership)
    for name in ("cascade.json", "cascade.md", "cascade.png"):   # cascade.json is written last
        (out / name).unlink(missing_ok=True)
    if count_tokens is None:
        from pgkd.teachers.llm import TokenCounter
        count_tokens = TokenCounter()
    started = time.perf_counter()
    config = {"datasets": datasets, "data_root": str(data_root), "labeled": labeled, "student": student,
              "max_cycles": max_cycles, "llm_accuracy": llm_accuracy, "targets": targets,
              "targets_parsed": [{"written": t.written, "kind": t.kind, "value": t.value, "name": t.name}
                                 for t in parsed],
              "price_per_million_tokens": price_per_million_tokens,
              "price_per_million_output_tokens": price_per_million_output_tokens,
              "student_cost_per_million": student_cost_per_million, "windows": windows, "seed": seed,
              "guidance_source": guidance_source,
              "curve_shares": list(SHARES), "examples_per_class": EXAMPLES_PER_CLASS}
    results = []
    for name in tqdm(datasets, desc="bench cascade", unit="dataset", disable=not progress):
        cache = EmbeddingCache(encoder, path=out / "cache" / f"{Path(name).name}.npz", progress=progress)
        results.append(evaluate_dataset(paths[name], cache, parsed, config, count_tokens, progress))
        cache.save()
    summary = {
        "config": config,
        "data": {r["dataset"]: {"path": r["path"], "classes": r["classes"], "sizes": r["sizes"]} for r in results},
        "student": {"spec": student, "distilled_by": "pool-guided (a simulation of an LLM teacher)",
                    "max_cycles": max_cycles, "labeled": labeled},
        "teacher": {"simulated": True, "accuracy": llm_accuracy, "seed": seed,
                    "what": "a simulation of an LLM classifier: the gold label with probability p, else one of the "
                            "3 classes whose names are nearest the gold label's (MiniLM embeddings)"},
        "seed": seed,
        "prices": {"llm_input_per_million_tokens": price_per_million_tokens,
                   "llm_output_per_million_tokens": price_per_million_output_tokens,
                   "assumed": True, "student_per_million_texts": student_cost_per_million,
                   "student_source": f"BENCHMARKS.md 'Serving': {STUDENT_TEXTS_PER_SECOND} texts/s served over gRPC "
                                     f"on {STUDENT_CPU_THREADS} CPU threads at ${PRICE_PER_CPU_HOUR} per CPU-hour",
                   "tokens": getattr(count_tokens, "name", "a token counter of the caller's")
                   + " (not the LLM's own tokenizer)"},
        "references": REFERENCES,
        "datasets": results,
        "seconds": time.perf_counter() - started,
    }
    summary["goals"] = goals(summary)
    (out / "cascade.md").write_text(markdown(summary), encoding="utf-8")
    plot(summary, out / "cascade.png")
    write_json_atomic(out / "cascade.json", summary)
    return summary


def evaluate_dataset(path: Path, cache: EmbeddingCache, targets: list[Target], options: dict, count_tokens,
                     progress: bool) -> dict:
    began = time.perf_counter()
    seed, p = options["seed"], options["llm_accuracy"]
    config = DistillConfig(data=str(path), student=options["student"], labeled=options["labeled"],
                           max_cycles=options["max_cycles"], seed=seed, teacher="pool-guided", teacher_cache="none",
                           guidance_source=options["guidance_source"])
    dataset = load_dataset(path, seed=seed)          # as the run reads it
    splits = make_splits(dataset, config.labeled, config.seed, config.validation_fraction)   # the run's splits
    teacher = RecordedTeacher(make_teacher(config, splits, embed=cache))
    log(f"bench cascade: {dataset.name}: distilling ({config.labeled} labels, student {config.student}, up to "
        f"{config.max_cycles} cycles, the guided simulation as teacher)")
    result = run(config, None, progress=progress, embed=cache, dataset=dataset, teacher=teacher)
    report, student = result.report, result.student
    held = held_validation(splits, teacher)
    check_held(student, held)
    train = kept_train(splits, teacher, report.best.cycle, report.cycles[report.best.cycle].train_size)

    labels = splits.labels
    index = {label: i for i, label in enumerate(labels)}
    llm = SimulatedLLMClassifier(dataset.train + dataset.validation + dataset.test, labels, p, seed=seed,
                                 confusable=confusable_classes(labels, cache))
    texts = [s.text for s in splits.test]
    gold = np.array([index[s.label] for s in splits.test])
    llm_pred = np.array([index[a] for a in llm.classify(ClassificationRequest(taxonomy=labels, texts=texts))[0]])
    probs = np.asarray(student.predict_proba(texts))
    confidence, student_pred = probs.max(axis=1), probs.argmax(axis=1)
    kept, student.calibration = student.calibration, None
    raw = np.asarray(student.predict_proba(texts))                # the student's own probabilities, uncalibrated
    student.calibration = kept

    tokens = prompt_tokens(labels, prompt_examples(splits, seed), texts, [s.label for s in splits.test], count_tokens)
    llm_cost = llm_cost_per_million(tokens["input_per_text"], tokens["output_per_text"],
                                    options["price_per_million_tokens"], options["price_per_million_output_tokens"])
    student_cost = options["student_cost_per_million"]
    measured = []
    for target in targets:
        deferral, problem = chosen(target, student.calibration)
        on_test = route(confidence, None if deferral is None else deferral.threshold, student_pred, llm_pred, gold)
        cost = cascade_cost_per_million(on_test["teacher_share"], llm_cost, student_cost)
        measured.append({"target": target.written, "name": target.name, "kind": target.kind, "value": target.value,
                         "threshold": None if deferral is None else deferral.threshold, "problem": problem,
                         "chosen_on": {"samples": student.calibration.samples, "source": student.calibration.source,
                                       "student_share": None if deferral is None else deferral.student_share,
                                       "student_accuracy": None if deferral is None else deferral.student_accuracy},
                         "test": on_test, "cost_per_million": cost,
                         "saving_against_llm": 1 - cost / llm_cost if llm_cost else None})
    calibration = report.calibration or {}
    record = {
        "dataset": dataset.name, "path": str(path), "classes": len(labels), "sizes": splits.sizes(),
        "distilled": {"best_cycle": report.best.cycle, "cycles": len(report.cycles) - 1,
                      "stop_reason": report.stop_reason,
                      "train_size": len(train), "baseline_test_accuracy": report.baseline.test.accuracy,
                      "test_accuracy": report.best.test.accuracy, "teacher": report.teacher},
        "calibration": {"samples": calibration.get("samples"), "source": calibration.get("source"),
                        "temperature": calibration.get("temperature"), "ece_before": calibration.get("ece_before"),
                        "ece_after": calibration.get("ece_after"),
                        "test_ece_before": expected_calibration_error(raw, gold),
                        "test_ece_after": expected_calibration_error(probs, gold)},
        "student_only": {"accuracy": float((student_pred == gold).mean()), "cost_per_million": student_cost},
        "llm_only": {"accuracy": float((llm_pred == gold).mean()), "cost_per_million": llm_cost, "simulated": True,
                     "unknown_texts": llm.unknown},
        "tokens": tokens,
        "curve": curve(confidence, student_pred, llm_pred, gold),
        "targets": measured,
    }
    record["stream"] = stream(config, splits, student, train, held, targets[0], texts, gold, llm_pred, cache,
                              options["windows"], seed, llm_cost, student_cost)
    record["seconds"] = time.perf_counter() - began
    return record


def stream(config: DistillConfig, splits: Splits, student, train: list[Sample], held: list[Sample], target: Target,
           texts: list[str], gold: np.ndarray, llm_pred: np.ndarray, cache: EmbeddingCache, windows: int, seed: int,
           llm_cost: float, student_cost: float) -> dict:
    """Test traffic in windows, prequential: each window is routed by the current student and
    threshold and scored on its gold labels; then the simulated LLM's labels of its deferred texts join
    the training data, the student is retrained and recalibrated on the held validation texts; it is
    promoted as the stream promotes runs with a cascade target (it answers more of the validation texts at
    `target`), and the serving student's threshold is chosen for `target`."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    teacher_labeled: list[Sample] = []        # the simulated LLM's labels: train only, never validation
    rows = []
    decision = None
    for w, part in enumerate(np.array_split(np.array(order, dtype=np.int64), windows), start=1):
        if w > 1:
            candidate = fresh_student(config, splits.labels, 0, embed=cache)
            candidate.train(train + teacher_labeled, splits.validation, config.round_config(0), progress=False)
            recalibrate(candidate, held, splits.labels)
            # The stream's own rule for runs with a cascade target (pgkd.stream.promotion): the retrained student
            # replaces the serving one only when it serves the cascade better on the validation texts (human
            # labels, never the simulated LLM's): a larger share answered at the target accuracy.
            cascade = tuple(cascade_score(s, splits.validation, splits.labels, **target.policy)
                            for s in (candidate, student))
            decision = compare(f"window {w}", score(candidate, splits.validation, splits.labels),
                               score(student, splits.validation, splits.labels), config.metric,
                               "the serving student", splits.validation, cascade, **target.policy)
            if decision.replaced:
                student = candidate
        deferral, problem = chosen(target, student.calibration)
        probs = np.asarray(student.predict_proba([texts[i] for i in part]))
        confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
        threshold = None if deferral is None else deferral.threshold
        window = route(confidence, threshold, predicted, llm_pred[part], gold[part])
        rows.append({"window": w, "train_size": len(train) + len(teacher_labeled),
                     "teacher_labels": len(teacher_labeled),
                     "promoted": None if decision is None else decision.replaced,
                     "promotion": None if decision is None else {
                         "metric": decision.metric, "retrained": decision.new_score, "serving": decision.current_score,
                         "target": decision.cascade_target, "reason": decision.reason,
                         "retrained_share": decision.new_cascade and decision.new_cascade.student_share,
                         "serving_share": decision.current_cascade and decision.current_cascade.student_share},
                     "threshold": threshold, "problem": problem, "temperature": student.calibration.temperature,
                     "chosen_on_student_share": None if deferral is None else deferral.student_share,
                     **window, "llm_only_accuracy": float((llm_pred[part] == gold[part]).mean()),
                     "student_only_accuracy": float((predicted == gold[part]).mean()),
                     "cost_per_million": cascade_cost_per_million(window["teacher_share"], llm_cost, student_cost)})
        answered = np.zeros(len(part), bool) if threshold is None else confidence >= threshold
        teacher_labeled += [Sample(text=texts[i], label=splits.labels[llm_pred[i]]) for i in part[~answered]]
        log(f"bench cascade: stream window {w}/{windows}: simulated LLM share {window['teacher_share']:.3f}, "
            f"cascade accuracy {window['cascade_accuracy']:.4f}")
    return {"target": target.written, "name": target.name, "windows": rows,
            "retraining": "here, in this process (the student's train on labeled + kept teacher samples + the "
                          "simulated LLM's labels so far; calibrate on the held validation texts; it replaces the "
                          "serving student only when it answers more of them at the target, the stream's promotion "
                          "rule for runs with a cascade target); "
                          "not through Kafka and the services"}


# -- goals, tables, the plot ------------------------------------------------------------------------------

def goals(summary: dict) -> dict:
    """The benchmark's two goals, met or not and by how much."""
    p = summary["config"]["llm_accuracy"]
    out: dict = {}
    for record in summary["datasets"]:
        near = [t for t in record["targets"] if t["kind"] == "accuracy" and t["value"] >= p - 0.01 - 1e-9]
        if record["dataset"] == GOAL_DATASET and near:
            t = max(near, key=lambda t: t["value"])
            share, llm = t["test"]["student_share"], record["llm_only"]["accuracy"]
            gap = t["test"]["cascade_accuracy"] - llm
            within = [1 - q["teacher_share"] for q in record["curve"] if q["cascade_accuracy"] >= llm - 0.01 - 1e-12]
            out["student_share"] = {
                "dataset": record["dataset"], "target": t["target"], "goal": GOAL_STUDENT_SHARE, "student_share": share,
                "by": share - GOAL_STUDENT_SHARE, "share_met": share >= GOAL_STUDENT_SHARE,
                "cascade_accuracy": t["test"]["cascade_accuracy"], "llm_only_accuracy": llm,
                "accuracy_gap": gap, "accuracy_met": gap >= -0.01 - 1e-12,
                "met": share >= GOAL_STUDENT_SHARE and gap >= -0.01 - 1e-12,
                # a description, not a choice: the most the student answers on the curve within 1 point
                "curve_student_share_within_1_point": max(within, default=None)}
        rows = record["stream"]["windows"]
        shares = [r["teacher_share"] for r in rows]
        accuracy = [r["cascade_accuracy"] for r in rows]
        falls = all(b < a for a, b in zip(shares, shares[1:]))
        worst = min(accuracy[1:], default=accuracy[0]) - accuracy[0]
        out.setdefault("stream", {})[record["dataset"]] = {
            "teacher_share_first": shares[0], "teacher_share_last": shares[-1], "falls_every_window": falls,
            "rises": sum(b >= a for a, b in zip(shares, shares[1:])), "accuracy_first": accuracy[0],
            "worst_accuracy_change": worst, "same_accuracy": worst >= -STREAM_ACCURACY_SLACK,
            "met": falls and worst >= -STREAM_ACCURACY_SLACK}
    return out


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _acc(x: float | None) -> str:
    return "–" if x is None else f"{x:.4f}"


def _threshold(x: float | None) -> str:
    return "none (the simulated LLM answers all)" if x is None else f"{x:.4f}" if x < 0.9999 else f"{x:.7f}"


def _serving(window: dict) -> str:
    """Which student served a stream window: the distilled run's, or the retrained one if it was promoted."""
    p = window.get("promotion")
    if p is None:
        return "the distilled run's"
    verdict = "retrained, promoted" if window["promoted"] else "kept (the retrained one not better)"
    return (f"{verdict}: at the target, validation share {_pct(p['retrained_share'])} vs {_pct(p['serving_share'])}; "
            f"{p['metric']} {p['retrained']:.4f} vs {p['serving']:.4f}")


def _falls(s: dict) -> str:
    return "falling every window" if s["falls_every_window"] else f"not falling in {s['rises']} window(s)"


def markdown(summary: dict) -> str:
    c, prices = summary["config"], summary["prices"]
    lines = [f"Simulated LLM (a simulation, not an LLM): accuracy {c['llm_accuracy']:g}, seed {c['seed']}. Student "
             f"{c['student']}, distilled from {c['labeled']} labels by the guided simulation, up to "
             f"{c['max_cycles']} cycles, guided {c['guidance_source']}. Prices (assumed): "
             f"${prices['llm_input_per_million_tokens']:g} / "
             f"${prices['llm_output_per_million_tokens']:g} per million input / output tokens of the simulated LLM, "
             f"one text per call; the student ${prices['student_per_million_texts']:g} per million texts "
             f"({prices['student_source']}). Tokens: {prices['tokens']}.", "",
             "| dataset | classes | test texts | student only | simulated LLM only "
             "| ECE held validation, before → after "
             "| ECE test, before → after | tokens per call (fixed part) | $ per 1M texts: student / simulated LLM |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in summary["datasets"]:
        cal, tok = r["calibration"], r["tokens"]
        lines.append(f"| {r['dataset']} | {r['classes']} | {r['sizes']['test']} "
                     f"| {_acc(r['student_only']['accuracy'])} "
                     f"| {_acc(r['llm_only']['accuracy'])} | {_acc(cal['ece_before'])} → {_acc(cal['ece_after'])} "
                     f"({cal['samples']} texts) | {_acc(cal['test_ece_before'])} → {_acc(cal['test_ece_after'])} | "
                     f"{tok['input_per_text']:.0f} in + {tok['output_per_text']:.0f} out ({tok['fixed_per_call']}) | "
                     f"{r['student_only']['cost_per_million']:.3f} / {r['llm_only']['cost_per_million']:.0f} |")
    lines += ["", "Targets: the threshold chosen on the held validation scores, then measured on test.", "",
              "| dataset | target | threshold | held validation: student share, its accuracy | test: student share "
              "| test: student answers' accuracy | test: cascade accuracy (vs simulated LLM only) "
              "| $ per 1M texts | saving vs simulated LLM only |", "|---|---|---|---|---|---|---|---|---|"]
    for r in summary["datasets"]:
        for t in r["targets"]:
            on = t["chosen_on"]
            if t["threshold"] is None:
                chosen_text = f"not reachable ({on['samples']} texts): the simulated LLM answers all"
            else:
                chosen_text = f"{_pct(on['student_share'])}, {_acc(on['student_accuracy'])}"
            lines.append(f"| {r['dataset']} | {t['name']} (`{t['target']}`) | "
                         f"{_threshold(t['threshold'])} | {chosen_text} | "
                         f"{_pct(t['test']['student_share'])} | {_acc(t['test']['student_accuracy'])} | "
                         f"{_acc(t['test']['cascade_accuracy'])} "
                         f"({100 * (t['test']['cascade_accuracy'] - r['llm_only']['accuracy']):+.1f} points) | "
                         f"{t['cost_per_million']:.2f} | {_pct(t['saving_against_llm'])} |")
    names = [r["dataset"] for r in summary["datasets"]]
    lines += ["", "The curve: test accuracy of the cascade when the given share of test texts (those the student is "
                  "least sure of) goes to the simulated LLM; cut at test quantiles, a description, not a choice.", "",
              "| share to the simulated LLM | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for i, share in enumerate(c["curve_shares"]):
        lines.append(f"| {100 * share:.0f}% | " + " | ".join(_acc(r["curve"][i]["cascade_accuracy"])
                                                            for r in summary["datasets"]) + " |")
    for r in summary["datasets"]:
        s = r["stream"]
        lines += ["", f"Stream, {r['dataset']} ({len(s['windows'])} windows of shuffled test traffic, target "
                      f"{s['name']}; retrained {s['retraining']}):", "",
                  "| window | texts | train (of which simulated LLM labels) | serving student | threshold "
                  "| held validation: student share "
                  "| simulated LLM share | cascade accuracy | student answers' accuracy | student alone "
                  "| simulated LLM alone | $ per 1M texts |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for w in s["windows"]:
            lines.append(f"| {w['window']} | {w['texts']} | {w['train_size']} ({w['teacher_labels']}) | "
                         f"{_serving(w)} | {_threshold(w['threshold'])} | "
                         f"{_pct(w['chosen_on_student_share'])} | {_pct(w['teacher_share'])} | "
                         f"{_acc(w['cascade_accuracy'])} | {_acc(w['student_accuracy'])} | "
                         f"{_acc(w['student_only_accuracy'])} | {_acc(w['llm_only_accuracy'])} | "
                         f"{w['cost_per_million']:.2f} |")
    lines += ["", "Published (theirs, not measured here; real LLM APIs on their own tasks):", ""]
    lines += [f"- {ref['work']}: {ref['figure']} ({ref['setting']})." for ref in summary["references"]]
    g = summary["goals"]
    lines += ["", "Goals:"]
    if "student_share" in g:
        s = g["student_share"]
        lines.append(f"- Student answers at least {_pct(s['goal'])} of {s['dataset']} test traffic at target "
                     f"`{s['target']}`, the cascade within 1 point of the simulated LLM: "
                     f"{'met' if s['met'] else 'missed'}. "
                     f"Share {_pct(s['student_share'])} ({100 * s['by']:+.1f} points, "
                     f"{'met' if s['share_met'] else 'missed'}); cascade accuracy {_acc(s['cascade_accuracy'])} "
                     f"against "
                     f"the simulated LLM's {_acc(s['llm_only_accuracy'])} ({100 * s['accuracy_gap']:+.1f} points, "
                     f"{'met' if s['accuracy_met'] else 'missed'}). On the curve (test quantiles, a description), the "
                     f"student answers at most {_pct(s['curve_student_share_within_1_point'])} within 1 point.")
    for name, s in g.get("stream", {}).items():
        lines.append(f"- Stream, {name}: the simulated LLM's share {_pct(s['teacher_share_first'])} → "
                     f"{_pct(s['teacher_share_last'])}, {_falls(s)}; "
                     f"worst window's accuracy {100 * s['worst_accuracy_change']:+.1f} points from the first's "
                     f"({_acc(s['accuracy_first'])}): {'met' if s['met'] else 'missed'}.")
    return "\n".join(lines) + f"\n\n({summary['seconds']:.0f} s)\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = summary["datasets"]
    if not results:
        return
    fig, axes = plt.subplots(2, len(results), figsize=(4.2 * len(results) + 0.5, 7.5), squeeze=False)
    for j, r in enumerate(results):
        ax = axes[0][j]
        ax.plot([100 * p["teacher_share"] for p in r["curve"]], [p["cascade_accuracy"] for p in r["curve"]],
                marker=".", label="cascade (test quantile cuts)")
        ax.axhline(r["llm_only"]["accuracy"], color="gray", linestyle="--", linewidth=1, label="simulated LLM only")
        for t in r["targets"]:
            ax.plot(100 * t["test"]["teacher_share"], t["test"]["cascade_accuracy"], "o", markersize=7,
                    label=f"{t['target']} (threshold from validation)")
        ax.set_title(f"{r['dataset']}", fontsize=10)
        ax.set_xlabel("share of test texts sent to the simulated LLM (%)")
        ax.set_ylabel("cascade test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        s = r["stream"]["windows"]
        ax = axes[1][j]
        xs = [w["window"] for w in s]
        ax.bar(xs, [100 * w["teacher_share"] for w in s], color="tab:orange", alpha=0.6,
               label="share to the simulated LLM (%)")
        ax.set_xlabel(f"stream window (target {r['stream']['target']})")
        ax.set_ylabel("share to the simulated LLM (%)")
        twin = ax.twinx()
        twin.plot(xs, [w["cascade_accuracy"] for w in s], "o-", color="tab:blue", label="cascade accuracy")
        twin.set_ylabel("cascade accuracy (window)")
        ax.set_xticks(xs)
        ax.grid(axis="y", alpha=0.3)
        handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="lower left")
    fig.suptitle(f"The cascade: student {summary['config']['student']}, simulated LLM of accuracy "
                 f"{summary['config']['llm_accuracy']:g} (a simulation)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
