"""generator: asks the teacher for samples aimed at the student's weaknesses and screens them
(pgkd.distributed.steps.generate).

NegativesMined -> SamplesGenerated, or TeacherStopped when the teacher has nothing left to give or
cannot be reached (the evaluator ends the run)."""
from pgkd.distributed import steps
from pgkd.distributed.messages import NegativesMined

from pgkd_services.runtime import Service


def build(**options) -> Service:
    service = Service("generator", **options)
    service.consume(NegativesMined, steps.generate)
    service.warm.append(steps.warm)
    return service
