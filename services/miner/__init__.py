"""miner: finds the student's hard negatives, misclassified and correct samples on validation.

CycleEvaluated -> NegativesMined (with the per-class report, for the teacher)."""
from pgkd import steps
from pgkd.messages import CycleEvaluated

from services.runtime import Service


def build(**options) -> Service:
    service = Service("miner", **options)
    service.consume(CycleEvaluated, steps.mine)
    return service
