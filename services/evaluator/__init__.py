"""evaluator: scores each student on validation, records the cycle, applies the stop policy.

ModelTrained -> CycleEvaluated (go on) or RunCompleted (stop: the best student, its test scores,
the reason, report.json)."""
from pgkd import steps
from pgkd.messages import ModelTrained

from services.runtime import Service


def build(**options) -> Service:
    service = Service("evaluator", **options)
    service.consume(ModelTrained, steps.evaluate)
    return service
