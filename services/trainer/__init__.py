"""trainer: trains the student of each cycle and stores its checkpoint.

RunRequested (cycle 0, the labeled seed set) or SamplesGenerated (cycle k, the accepted samples)
-> ModelTrained. Runs on a GPU node when there is one."""
from pgkd.distributed import steps
from pgkd.distributed.messages import RunRequested, SamplesGenerated

from pgkd_services.runtime import Service


def build(**options) -> Service:
    service = Service("trainer", **options)

    def train(message, store):
        trained = steps.train(message, store)
        service.metrics.trained(trained.run_id, trained.cycle, trained.training)
        return trained
    service.consume(RunRequested, train)
    service.consume(SamplesGenerated, train)
    return service
