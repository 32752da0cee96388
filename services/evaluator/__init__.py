"""evaluator: scores each student on validation, records the cycle, exports the run's metrics and
applies the stop policy, reading the figures back from Prometheus (PGKD_PROMETHEUS_URL) or, without
it, from its own metrics registry (pgkd.distributed.steps.evaluate). The one service that ends a run.

ModelTrained -> CycleEvaluated (go on) or RunCompleted (stop: the best student, its test scores,
the reason, where the figures came from, report.json; for a run submitted with --promote, the
StudentPromoted it carries). TeacherStopped -> RunCompleted."""
from functools import partial

from pgkd.distributed import steps
from pgkd.distributed.messages import ModelTrained, TeacherStopped
from pgkd.distributed.metrics_readers import PrometheusReader, RegistryReader

from pgkd_services.runtime import Service


def build(**options) -> Service:
    service = Service("evaluator", **options)
    settings = service.settings
    reader = (PrometheusReader(settings.prometheus_url, wait=settings.prometheus_wait) if settings.prometheus_url
              else RegistryReader(service.metrics.registry))
    service.consume(ModelTrained, partial(steps.evaluate, reader=reader))
    service.consume(TeacherStopped, steps.evaluate)
    service.warm.append(steps.warm)
    return service
