"""The Python API: `pgkd.distill` and `pgkd.load_student`, small on purpose.

    import pgkd
    result = pgkd.distill("data/tickets.csv", teacher=MyLLM(), student="minilm", out="runs/tickets")
    result.report.best.test.macro_f1, result.student.predict(["where is my refund?"])

`data` is a dataset folder, a file, or a list of labeled samples; `teacher` a simulation's name, an
LLM URL, or any object with `generate(request)`; `student` a name, a model folder, or any object
with the student contract (pgkd.Student); the options are those of `pgkd distill`."""
from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from pydantic import ValidationError

from pgkd.data import dataset_from_samples, load_dataset
from pgkd.types import GeneratedBatch, GenerationRequest, Sample, TeacherUnavailable
from pgkd.errors import Option, UserError, invalid
from pgkd.loop.config import DistillConfig
from pgkd.loop.embedded import DistillResult, run


def distill(data, teacher="pool-guided", student="minilm", out: str | Path | None = None, progress: bool = True,
            **options) -> DistillResult:
    """Run PGKD in this process and return the report and the best student (written to `out` too,
    when given: report.json, best/, history.png)."""
    unknown = sorted(set(options) - set(DistillConfig.model_fields))
    if unknown:
        raise TypeError(f"pgkd.distill: unknown option(s) {', '.join(unknown)}; the options are those of "
                        f"`pgkd distill`: {', '.join(f for f in DistillConfig.model_fields if f not in ('data',))}")
    if not isinstance(data, (str, Path)) and not (hasattr(data, "__iter__") and not isinstance(data, (bytes, dict))):
        raise TypeError(f"pgkd.distill: data: expected a dataset's path (str or Path) or a list of samples, got "
                        f"{type(data).__name__}")
    if out is not None and not isinstance(out, (str, Path)):
        raise TypeError(f"pgkd.distill: out: expected a folder's path (str or Path), got {type(out).__name__}")
    if not isinstance(student, (str, Path)) and not all(callable(getattr(student, m, None))
                                                        for m in ("train", "predict_proba")):
        raise TypeError(f"pgkd.distill: student: expected a name, a folder, or an object with the pgkd.Student "
                        f"protocol (labels, train, predict_proba, state, load_state, save), got "
                        f"{type(student).__name__}")
    teacher_name = None if isinstance(teacher, str) else name_of(teacher)
    student_object = None if isinstance(student, (str, Path)) else student
    if student_object is not None and options.get("warm_start") is False:
        raise TypeError("pgkd.distill: warm_start=False retrains a fresh student each cycle, which pgkd can make "
                        "from a student's name or folder, not from an object")
    _no_text_for_numbers(options)
    if isinstance(options.get("taxonomy"), Path):
        options["taxonomy"] = str(options["taxonomy"])
    try:
        config = DistillConfig(data=str(data) if isinstance(data, (str, Path)) else "python:samples",
                               teacher=teacher if teacher_name is None else f"python:{teacher_name}",
                               student=str(student) if student_object is None else f"python:{type(student).__qualname__}",
                               **options)
    except ValidationError as e:
        raise invalid(e) from None
    teacher_object = None if teacher_name is None else ObjectTeacher(teacher, timeout=config.teacher_timeout)
    if isinstance(data, (str, Path)):
        dataset = load_dataset(data, config.text_column, config.label_column, seed=config.seed)
    else:
        dataset = dataset_from_samples(list(data), config.text_column, config.label_column, seed=config.seed)
    return run(config, out, progress=progress, dataset=dataset, teacher=teacher_object, student=student_object)


def _no_text_for_numbers(options: dict) -> None:
    """A Python caller's `labeled="30"` is a mistake to say, not a number to guess (pydantic would take
    it as 30; the command line converts its text itself, by each option's type)."""
    from pgkd.options import base_type
    for name, value in options.items():
        if isinstance(value, str) and base_type(DistillConfig.model_fields[name]) in (int, float, bool):
            kind = "True or False" if base_type(DistillConfig.model_fields[name]) is bool else "a number"
            raise UserError(Option(name, value), f": expected {kind}, not a string")


def load_student(path: str | Path, device: str | None = None):
    """A student saved by a run (OUT/best): `predict(texts)` gives labels, `predict_proba` probabilities."""
    from pgkd.students import load_student as load
    if not isinstance(path, (str, Path)):
        raise TypeError(f"pgkd.load_student: path: expected a folder's path (str or Path), got {type(path).__name__}")
    return load(path, device=device)


def name_of(teacher) -> str:
    return str(getattr(teacher, "name", type(teacher).__name__))


class ObjectTeacher:
    """A user's teacher object made a whole teacher: only `generate(request)` is required; it may
    return pgkd.Samples, dicts with text and label, or a GeneratedBatch. `name`, `simulated`,
    `describe()`, `state()`, `load_state()` and `check()` are taken from it where it has them.
    A `generate` that gives no answer within `timeout` seconds (teacher_timeout) makes the teacher
    unavailable, as an LLM teacher's failed calls do: the run stops and writes its report."""

    def __init__(self, teacher, timeout: float | None = None):
        if not callable(getattr(teacher, "generate", None)):
            raise UserError(f"teacher {teacher!r}: expected a teacher name, an LLM URL, or an object with a "
                            "generate(request) method")
        self.teacher = teacher
        self.name = name_of(teacher)
        self.simulated = bool(getattr(teacher, "simulated", False))
        self.timeout = timeout

    def generate(self, request: GenerationRequest) -> GeneratedBatch:
        answer = self._call_generate(request)
        if isinstance(answer, GeneratedBatch):
            return answer
        samples, dropped = [], Counter()
        if answer is None:
            answer = []
        elif isinstance(answer, (str, bytes, dict, Sample)) or not isinstance(answer, Iterable):
            answer = [answer]   # one item, not a list of them: a sample taken as one, anything else malformed
        for item in answer:
            if isinstance(item, Sample):
                samples.append(item)
            elif isinstance(item, dict) and isinstance(item.get("text"), str) and isinstance(item.get("label"), str) \
                    and item["text"].strip():
                samples.append(Sample(text=item["text"], label=item["label"]))
            else:
                dropped["malformed_sample"] += 1     # counted in the cycle's `rejected`, like an LLM's
        return GeneratedBatch(samples=samples, teacher=self.name, rejected=dict(dropped))

    def _call_generate(self, request: GenerationRequest):
        """The user's `generate(request)`, in a worker thread bounded by the timeout. A call that times
        out cannot be cancelled: its daemon thread is left to finish, or to end with the process."""
        if self.timeout is None:
            return self.teacher.generate(request)
        outcome = {}

        def call():
            try:
                outcome["answer"] = self.teacher.generate(request)
            except BaseException as e:  # noqa: BLE001 -- raised again in the caller's thread
                outcome["error"] = e
        worker = threading.Thread(target=call, name=f"teacher {self.name}", daemon=True)
        worker.start()
        worker.join(self.timeout)
        if worker.is_alive():
            raise TeacherUnavailable(f"teacher {self.name} timed out: generate() gave no answer in "
                                     f"{self.timeout:g} s (teacher_timeout)")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["answer"]

    def describe(self) -> dict:
        if callable(getattr(self.teacher, "describe", None)):
            return self.teacher.describe()
        return {"name": self.name, "simulated": self.simulated, "kind": "python object",
                "class": f"{type(self.teacher).__module__}.{type(self.teacher).__qualname__}"}

    def state(self) -> dict:
        return self.teacher.state() if callable(getattr(self.teacher, "state", None)) else {}

    def load_state(self, state: dict) -> None:
        if callable(getattr(self.teacher, "load_state", None)):
            self.teacher.load_state(state)

    def check(self) -> None:
        if callable(getattr(self.teacher, "check", None)):
            self.teacher.check()
