"""trainer: trains the student of each cycle and stores its checkpoint (pgkd.distributed.steps.train).

RunRequested (cycle 0, the labeled seed set) or SamplesGenerated (cycle k, the grown training set)
-> ModelTrained. Runs on a GPU node when there is one."""
from pgkd.distributed import steps
from pgkd.distributed.messages import RunRequested, SamplesGenerated

from pgkd_services.runtime import Service


def build(**options) -> Service:
    service = Service("trainer", **options)
    service.consume(RunRequested, steps.train)
    service.consume(SamplesGenerated, steps.train)
    service.warm.append(steps.warm)
    return service
