"""PGKD: distill an LLM text classifier into a small, fast student (Performance-Guided Knowledge
Distillation, Di Palo et al., EMNLP 2024).

    import pgkd
    result = pgkd.distill("data/banking77", teacher="pool-guided", student="minilm")
    print(result.report.best.test.accuracy)
    print(result.student.predict(["I still have not received my card"]))
    pgkd.export("runs/demo/best", "models")           # a Triton model repository: `pgkd serve --model models`
    pgkd.classify("http://127.0.0.1:8000", ["I still have not received my card"])

The names below load on first use, so `import pgkd` stays cheap (no torch until a run needs it).
"""
__version__ = "0.1.0"

_EXPORTS = {
    "distill": "pgkd.api", "load_student": "pgkd.api", "DistillResult": "pgkd.loop.embedded",
    "DistillConfig": "pgkd.loop.config", "Sample": "pgkd.types",
    "Student": "pgkd.students.contract", "TrainConfig": "pgkd.types", "TrainResult": "pgkd.types",
    "Teacher": "pgkd.teachers.contract", "GenerationRequest": "pgkd.types",
    "GeneratedBatch": "pgkd.types", "render_prompt": "pgkd.teachers.prompt",
    "export": "pgkd.serving", "classify": "pgkd.serving",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pgkd' has no attribute {name!r}")
