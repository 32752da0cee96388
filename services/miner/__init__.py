"""miner: finds the student's hard negatives, misclassified and correct samples (pgkd.distributed.steps.mine).

CycleEvaluated -> NegativesMined (with the per-class report the teacher is shown, in the run's state)."""
from pgkd.distributed import steps
from pgkd.distributed.messages import CycleEvaluated

from pgkd_services.runtime import Service


def build(**options) -> Service:
    service = Service("miner", **options)
    service.consume(CycleEvaluated, steps.mine)
    service.warm.append(steps.warm)
    return service
