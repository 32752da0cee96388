"""generator: asks the teacher for samples aimed at the student's weaknesses and screens them.

NegativesMined -> SamplesGenerated (or RunCompleted when the teacher has nothing left to give or
cannot be reached)."""
from pgkd.distributed import steps
from pgkd.distributed.messages import NegativesMined, SamplesGenerated

from pgkd_services.runtime import Service


def build(**options) -> Service:
    service = Service("generator", **options)

    def generate(message, store):
        output = steps.generate(message, store)
        if isinstance(output, SamplesGenerated):
            p = output.provenance
            service.metrics.generated(output.run_id, p.teacher_usage, p.accepted, p.rejected,
                                      steps.run_teacher_usage(store, output.run_id, p))
        return steps.with_promotion(store, output)
    service.consume(NegativesMined, generate)
    return service
