"""evaluator: scores each student on validation, records the cycle, exports the run's metrics and
applies the stop policy, reading the figures back from Prometheus (PGKD_PROMETHEUS_URL) or, without
it, from its own metrics registry.

ModelTrained -> CycleEvaluated (go on) or RunCompleted (stop: the best student, its test scores,
the reason, where the figures came from, report.json), and StudentPromoted for a run submitted
with --promote."""
from pgkd.distributed import steps
from pgkd.distributed.messages import ModelTrained
from pgkd.distributed.metrics_readers import PrometheusReader, RegistryReader

from pgkd_services.runtime import Service


def build(**options) -> Service:
    service = Service("evaluator", **options)
    settings = service.settings
    reader = (PrometheusReader(settings.prometheus_url, wait=settings.prometheus_wait) if settings.prometheus_url
              else RegistryReader(service.metrics.registry))

    def evaluate(message, store):
        return steps.with_promotion(store, steps.evaluate(message, store, metrics=service.metrics, reader=reader))
    service.consume(ModelTrained, evaluate)
    return service
