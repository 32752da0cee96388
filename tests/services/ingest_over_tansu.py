"""The ingest service as an OS process (`pgkd service ingest`) over its own Tansu broker (Kafka-compatible,
not Apache Kafka), for a module of tests to share: its topics created, a base run recorded (never trained:
ingest only needs its labels and splits), no run ever triggered. The tests produce with aiokafka, as any
producer would, and read what ingest stored and dead-lettered."""
import asyncio
import contextlib
import time
from pathlib import Path

import pytest
from conftest import make_toy_dataset, tansu_broker
from kafka.admin import KafkaAdminClient
from pgkd.distributed import steps
from pgkd.loop.config import DistillConfig
from pgkd.distributed.messages import TOPICS
from service_processes import ServiceProcesses
from stream_fixtures import BASE_CONFIG, new_samples, stored

from pgkd_services.cli import create_kafka_topics

SAMPLES_TOPIC = "pgkd.labeled-samples"


class Ingest:
    def __init__(self, broker_url: str, folder: Path):
        self.broker_url = broker_url
        self.bootstrap = broker_url.removeprefix("kafka://")
        self.processes = ServiceProcesses(broker_url, folder)
        self.store = self.processes.store
        self.data = make_toy_dataset(folder / "toy")
        self._fresh = iter(new_samples(self.data, 2000))

    def samples(self, n: int) -> list[dict]:
        """`n` good samples no one has sent yet."""
        return [next(self._fresh) for _ in range(n)]

    def stored_ids(self) -> set[str]:
        return {s.id for s in stored(self.store)}

    def wait_stored(self, ids, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not set(ids) <= self.stored_ids():
            if time.monotonic() > deadline or self.processes.processes["ingest"].poll() is not None:
                pytest.fail(f"{len(set(ids) - self.stored_ids())} of {len(set(ids))} samples not stored; "
                            f"logs:\n{self.processes.log_tails()}")
            time.sleep(0.2)

    def produce(self, records: list[tuple[bytes | None, bytes | None, list]], compression: str | None = None,
                topic: str = SAMPLES_TOPIC) -> list:
        """(key, value, headers) records, in one batch per partition, with aiokafka's producer; their
        RecordMetadata (partition, offset), in order."""
        from aiokafka import AIOKafkaProducer

        async def send():
            producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, compression_type=compression,
                                        linger_ms=200, acks="all")
            await producer.start()
            try:
                futures = [await producer.send(topic, value, key=key, headers=headers)
                           for key, value, headers in records]
                return [await f for f in futures]
            finally:
                await producer.stop()
        return asyncio.run(send())


@contextlib.contextmanager
def ingest_over_tansu(folder: Path):
    with tansu_broker(folder) as broker_url:
        ingest = Ingest(broker_url, folder)
        admin = KafkaAdminClient(bootstrap_servers=ingest.bootstrap)
        try:
            create_kafka_topics([ingest.bootstrap], [f"pgkd.{t}" for t in TOPICS], 3, 1, admin=admin)
        finally:
            admin.close()
        steps.submit(DistillConfig(data=str(ingest.data), **BASE_CONFIG), ingest.store, run_id="base")
        ingest.processes.start("ingest", PGKD_STREAM_BASE_RUN="base", PGKD_STREAM_TRIGGER_COUNT="1000000",
                               PGKD_STREAM_DRIFT_WINDOW="1000000", PGKD_STREAM_BATCH_SECONDS="0.2")
        try:
            yield ingest
        finally:
            ingest.processes.kill_all()
