"""The commands that talk to the services: `pgkd service`, `pgkd submit`, `pgkd status`,
`pgkd topics create`. (pgkd.cli parses the arguments and calls these.)"""
from __future__ import annotations

import asyncio
import logging
import sys
import time

from pgkd.artifacts import ArtifactStore
from pgkd.distill import DistillConfig, log_cycle, make_policy, summary_table
from pgkd.errors import UserError
from pgkd.messages import TOPICS, RunCompleted, RunRequested
from pgkd.report import RunReport
from pgkd.steps import CycleState, RunFiles, submit

from services import NAMES, build, consumer_groups
from services.runtime import Settings, broker_kind, create_redis_groups, make_broker, send


def serve(name: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    build(name).run()
    return 0


async def _publish_request(settings: Settings, request: RunRequested) -> None:
    broker = make_broker(settings.broker_url)
    if broker_kind(broker) == "redis":  # groups first, or services that start later would skip the request
        await create_redis_groups(settings.broker_url, {t: g for g, topics in consumer_groups(settings).items()
                                                        for t in topics})
    try:
        async with broker:
            await send(broker, request.model_dump_json().encode(), settings.topic_prefix + request.topic,
                       key=request.run_id)
    except (OSError, asyncio.TimeoutError) as e:
        raise UserError(f"PGKD_BROKER_URL={settings.broker_url}: cannot publish ({e})") from None


def submit_run(config: DistillConfig, run_id: str | None, wait: bool, timeout: float | None, poll: float) -> int:
    settings = Settings.from_env()
    store = ArtifactStore(settings.artifacts)
    request = submit(config, store, run_id)
    asyncio.run(_publish_request(settings, request))
    print(f"submitted run {request.run_id} (artifacts {store.uri(RunFiles(request.run_id).base)})")
    if not wait:
        return 0
    completed = wait_for(store, request.run_id, timeout, poll)
    return _print_completion(store, completed)


def wait_for(store: ArtifactStore, run_id: str, timeout: float | None, poll: float = 1.0) -> RunCompleted:
    """Follow the run's cycles as the evaluator records them, until its RunCompleted is stored."""
    files = RunFiles(run_id)
    deadline = time.monotonic() + timeout if timeout else None
    shown = 0
    while True:
        shown = _show_cycles(store, run_id, shown)
        if store.exists(files.completed):
            _show_cycles(store, run_id, shown)
            return RunCompleted.model_validate(store.get_json(files.completed))
        if deadline and time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id}: not completed after {timeout:.0f} s; follow it with "
                               f"`pgkd status {run_id}`")
        time.sleep(poll)


def _show_cycles(store: ArtifactStore, run_id: str, shown: int, write=None) -> int:
    """Print the cycles recorded after the first `shown` ones (to stderr by default, as progress)."""
    files = RunFiles(run_id)
    keys = store.list(files.cycles)
    if len(keys) <= shown:
        return shown
    config = DistillConfig.model_validate(store.get_json(files.request)["config"])
    records = [CycleState.model_validate(store.get_json(k)).record for k in keys]
    policy = make_policy(config)
    for i in range(shown, len(records)):
        history = [r.validation[config.metric] for r in records[:i + 1]]
        log_cycle(config, records[i], history, policy.best_cycle(history), write=write)
    return len(records)


def _print_completion(store: ArtifactStore, completed: RunCompleted) -> int:
    if completed.status == "failed":
        print(f"run {completed.run_id} failed: {completed.reason}", file=sys.stderr)
        return 1
    report = RunReport.model_validate(store.get_json(completed.report))
    print(summary_table(report))
    print(f"stopped: {completed.reason}")
    print(f"report: {completed.report.uri}")
    print(f"best student (cycle {completed.best_cycle}): {completed.best_checkpoint.uri}")
    return 0


def status(run_id: str) -> int:
    store = ArtifactStore(Settings.from_env().artifacts)
    files = RunFiles(run_id)
    if not store.exists(files.request):
        raise UserError(f"run {run_id}: not found in {store.url}")
    request = RunRequested.model_validate(store.get_json(files.request))
    config = request.config
    print(f"run {run_id}: {config['data']}, student {config['student']}, teacher {config['teacher']}, "
          f"seed {config['seed']}")
    if not _show_cycles(store, run_id, 0, write=print):
        print("no cycle evaluated yet")
    if store.exists(files.completed):
        return _print_completion(store, RunCompleted.model_validate(store.get_json(files.completed)))
    print("running")
    return 0


def create_topics(partitions: int, replication_factor: int) -> int:
    """Kafka: every topic, through kafka-python's admin client. Redis: every stream and consumer
    group. Both idempotent: what exists is left as it is."""
    settings = Settings.from_env()
    topics = [settings.topic_prefix + t for t in TOPICS]
    if broker_kind(make_broker(settings.broker_url)) == "redis":
        groups = consumer_groups(settings)
        asyncio.run(create_redis_groups(settings.broker_url, {t: g for g, ts in groups.items() for t in ts}))
        print(f"redis: consumer groups ready for {', '.join(sorted({t for ts in groups.values() for t in ts}))}")
        return 0
    created = create_kafka_topics(settings.broker_url.partition("://")[2].split(","), topics, partitions,
                                  replication_factor)
    print(f"kafka: created {len(created)} topic(s){': ' + ', '.join(created) if created else ''}; "
          f"{len(topics) - len(created)} existed")
    return 0


def create_kafka_topics(bootstrap: list[str], topics: list[str], partitions: int, replication_factor: int,
                        admin=None) -> list[str]:
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError
    try:
        admin = admin or KafkaAdminClient(bootstrap_servers=bootstrap, client_id="pgkd-topics")
        missing = [t for t in topics if t not in set(admin.list_topics())]
        created = []
        for topic in missing:  # one at a time: another creator racing us costs one topic, not the batch
            try:
                admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=replication_factor)])
                created.append(topic)
            except TopicAlreadyExistsError:
                pass
        return created
    except KafkaError as e:
        raise UserError(f"kafka {','.join(bootstrap)}: {type(e).__name__}: {e}") from None


__all__ = ["NAMES", "serve", "submit_run", "status", "create_topics"]
