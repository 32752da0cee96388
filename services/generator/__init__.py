"""generator: asks the teacher for samples aimed at the student's weaknesses and screens them.

NegativesMined -> SamplesGenerated (or RunCompleted when the teacher has nothing left to give)."""
from pgkd import steps
from pgkd.messages import NegativesMined

from services.runtime import Service


def build(**options) -> Service:
    service = Service("generator", **options)
    service.consume(NegativesMined, steps.generate)
    return service
