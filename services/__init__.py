"""The PGKD services: thin FastStream apps over the engine's steps (pgkd.distributed.steps) and streams
(pgkd.stream) and serving (pgkd.serving). Start one with `pgkd service NAME`; configure it with
PGKD_BROKER_URL, PGKD_ARTIFACTS, PGKD_TOPIC_PREFIX, PGKD_METRICS_PORT and PGKD_HTTP_HOST (ingest: PGKD_STREAM_*;
deployer: PGKD_SERVING_*)."""

NAMES = ("trainer", "evaluator", "miner", "generator")      # the distillation loop
ALL = NAMES + ("ingest", "deployer")      # the stream of new labeled data; the sidecar of each student server


def build(name: str, **options):
    """The service called `name`, its handlers registered (options: settings, broker, store)."""
    import importlib
    if name not in ALL:
        from pgkd.errors import UserError
        raise UserError(f"unknown service {name!r}; one of {', '.join(ALL)}")
    service = importlib.import_module(f"pgkd_services.{name}").build(**options)
    service.listen()
    return service


def consumer_groups(settings) -> dict[str, list[str]]:
    """Every consumer group and the topics it reads, as the services register them."""
    from pgkd_services.runtime import make_broker
    broker = make_broker(settings.broker_url)
    groups: dict[str, list[str]] = {}
    for name in ALL:
        extra = {}
        if name == "deployer":   # its group is per server replica: `pgkd.deployer.REPLICA`
            from pathlib import Path

            from pgkd_services.deployer import ServingSettings
            extra["serving"] = ServingSettings(Path("."), replica="REPLICA")
        service = build(name, settings=settings, broker=broker, **extra)
        groups[service.group] = list(service.subscriptions)
    return groups
