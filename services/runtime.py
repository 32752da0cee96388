"""What every service shares: the broker named by PGKD_BROKER_URL, topic names, at-least-once
handling made idempotent, the dead-letter topic, and the HTTP side (/metrics, /healthz, /readyz).

A service is a FastStream app whose handlers are engine steps (pgkd.distributed.steps): decode the message,
call the step, publish what it returns. The same code runs over Kafka (production) and Redis
Streams (multi-process tests, small installs); only `make_broker` knows which.

Delivery is at least once: a message is acknowledged after its result is published. A handler
records its output under the run's `handled/` folder in the artifact store before publishing, so a
redelivered message repeats no work: its stored output is published again if it never was, and
nothing happens if it was.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from faststream import AckPolicy, Context
from faststream.asgi import AsgiFastStream, AsgiResponse, get, make_ping_asgi
from pgkd.distributed.artifacts import ArtifactStore
from pgkd.errors import UserError
from pgkd.distributed.messages import MESSAGES, DeadLetter, Message, RunCompleted
from pgkd.distributed.steps import RunFiles, fail_run
from pgkd.distributed.metrics import LoopMetrics
from prometheus_client import REGISTRY, make_asgi_app
from pydantic import ValidationError

log = logging.getLogger("pgkd.service")
_metrics: LoopMetrics | None = None


def default_metrics() -> LoopMetrics:
    """The loop's metrics in prometheus-client's default registry, once per process."""
    global _metrics
    if _metrics is None:
        _metrics = LoopMetrics(REGISTRY)
    return _metrics
MESSAGE_BY_KIND = {m.kind: m for m in MESSAGES}


@dataclass
class Settings:
    broker_url: str
    artifacts: str | None
    topic_prefix: str = "pgkd."
    metrics_port: int = 9100
    claim_idle_ms: int = 600_000        # Redis: a message pending this long on a dead consumer is taken over
    graceful_timeout: float = 300.0     # on SIGTERM, wait this long for the message in flight
    prometheus_url: str | None = None   # the evaluator's stop policy reads Prometheus there
    prometheus_wait: float = 30.0       # seconds it waits for Prometheus to scrape the current cycle

    @classmethod
    def from_env(cls) -> "Settings":
        env = os.environ
        try:
            return cls(broker_url=env.get("PGKD_BROKER_URL", "redis://127.0.0.1:6379"),
                       artifacts=env.get("PGKD_ARTIFACTS"), topic_prefix=env.get("PGKD_TOPIC_PREFIX", "pgkd."),
                       metrics_port=int(env.get("PGKD_METRICS_PORT", 9100)),
                       claim_idle_ms=int(env.get("PGKD_CLAIM_IDLE_MS", 600_000)),
                       graceful_timeout=float(env.get("PGKD_GRACEFUL_TIMEOUT", 300)),
                       prometheus_url=env.get("PGKD_PROMETHEUS_URL") or None,
                       prometheus_wait=float(env.get("PGKD_PROMETHEUS_WAIT", 30)))
        except ValueError as e:
            raise UserError(f"service settings: {e}") from None


def make_broker(url: str, graceful_timeout: float | None = None, app_name: str | None = None):
    """`kafka://host:9092,host2:9092` or `redis://host:6379[/db]`. With `app_name`, FastStream's
    Prometheus middleware counts and times the messages, in the default registry (/metrics)."""
    scheme, _, rest = url.partition("://")
    if scheme == "kafka" and rest:
        from faststream.kafka import KafkaBroker
        from faststream.kafka.prometheus import KafkaPrometheusMiddleware
        middlewares = [KafkaPrometheusMiddleware(registry=REGISTRY, app_name=app_name)] if app_name else []
        return KafkaBroker(rest.split(","), graceful_timeout=graceful_timeout, middlewares=middlewares)
    if scheme in ("redis", "rediss") and rest:
        from faststream.redis import RedisBroker
        from faststream.redis.prometheus import RedisPrometheusMiddleware
        middlewares = [RedisPrometheusMiddleware(registry=REGISTRY, app_name=app_name)] if app_name else []
        return RedisBroker(url, graceful_timeout=graceful_timeout, middlewares=middlewares)
    raise UserError(f"PGKD_BROKER_URL={url}: expected kafka://host:port[,host:port...] or redis://host:port")


def broker_kind(broker) -> str:
    return "kafka" if type(broker).__name__.startswith("Kafka") else "redis"


def broker_errors() -> tuple[type[BaseException], ...]:
    """What a broker that is down or unreachable raises, from either client library."""
    from aiokafka.errors import KafkaError
    from redis.exceptions import RedisError
    return OSError, asyncio.TimeoutError, KafkaError, RedisError


@contextlib.asynccontextmanager
async def connected(broker, url: str):
    """The broker, connected for a command (not a service): one that cannot be reached is one line,
    and its client is closed either way (no 'Unclosed AIOKafkaProducer')."""
    try:
        if broker_kind(broker) == "kafka":
            await asyncio.wait_for(_bootstrap_kafka(url), CONNECT_TIMEOUT)
        await asyncio.wait_for(broker.connect(), CONNECT_TIMEOUT)
    except broker_errors() as e:
        await _quietly_stop(broker)
        raise UserError(f"PGKD_BROKER_URL={url}: cannot reach the broker ({_reason(e)})") from None
    try:
        yield broker
    finally:
        await _quietly_stop(broker)


CONNECT_TIMEOUT = 10.0   # seconds a command (submit, send, topics) waits for the broker to answer


async def _bootstrap_kafka(url: str) -> None:
    """Reach the Kafka brokers with a client of our own first: FastStream leaves the producer of a
    broker that failed to connect unclosed, and aiokafka then warns about it at exit."""
    from aiokafka.client import AIOKafkaClient
    client = AIOKafkaClient(bootstrap_servers=url.partition("://")[2].split(","))
    quiet, level = logging.getLogger("aiokafka"), logging.getLogger("aiokafka").level
    quiet.setLevel(logging.CRITICAL)       # the one line we raise says what failed
    try:
        await client.bootstrap()
    finally:
        quiet.setLevel(level)
        await client.close()


async def _quietly_stop(broker) -> None:
    try:
        await broker.stop()
    except Exception:  # noqa: BLE001 -- closing a client that never connected; the first error is the one to show
        pass


def _reason(e: BaseException) -> str:
    if isinstance(e, asyncio.TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT:g} s"
    return str(e).strip() or type(e).__name__


async def send(broker, body: bytes, topic: str, key: str | None = None) -> None:
    """Publish to a Kafka topic (keyed by run, so one run's messages stay in one partition, in
    order) or to the Redis stream of the same name."""
    if broker_kind(broker) == "kafka":
        await broker.publish(body, topic, key=key.encode() if key else None)
    else:
        await broker.publish(body, stream=topic)


async def create_redis_groups(url: str, groups: dict[str, str]) -> None:
    """Create each stream's consumer group from the stream's start, unless it exists. Left to
    FastStream, a group starts at the stream's end, and a run submitted before the service first
    started would wait forever."""
    import redis.asyncio as redis
    client = redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT)
    try:
        for stream, group in groups.items():
            try:
                await client.xgroup_create(stream, group, id="0", mkstream=True)
            except redis.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise
    except redis.ConnectionError as e:
        raise UserError(f"PGKD_BROKER_URL={url}: cannot reach the broker ({_reason(e)})") from None
    finally:
        await client.aclose()


class Service:
    """One service: a broker, the artifact store, and handlers registered with `consume`."""

    def __init__(self, name: str, settings: Settings | None = None, broker=None, store: ArtifactStore | None = None,
                 metrics: LoopMetrics | None = None):
        self.name = name
        self.settings = settings or Settings.from_env()
        self.broker = broker or make_broker(self.settings.broker_url, self.settings.graceful_timeout, app_name=name)
        self.metrics = metrics or default_metrics()
        self.store = store or ArtifactStore(self.settings.artifacts)
        self.group = f"{self.settings.topic_prefix}{name}"
        self.consumer = f"{name}-{socket.gethostname()}-{os.getpid()}"
        self._busy = asyncio.Lock()     # one message at a time: steps are heavy and share the process's cache
        self.subscriptions: list[str] = []   # topics this service consumes, as group `self.group`

    def topic(self, name: str) -> str:
        return f"{self.settings.topic_prefix}{name}"

    # -- consuming -----------------------------------------------------------------------------------------
    def consume(self, message_type: type[Message], step: Callable[[Message, ArtifactStore], Message]) -> None:
        """Call the engine step on each message of its topic and publish what it returns, once."""
        topic = self.topic(message_type.topic)

        async def handle(body: bytes) -> None:
            await self.handle(topic, body, message_type, step)
        self.subscribe(topic, handle, message_type.kind)

    def subscribe(self, topic: str, handler: Callable[[bytes], Awaitable[None]], kind: str) -> None:
        """Deliver each message's body from `topic` (full name) to `handler`, in this service's consumer
        group; acknowledged when the handler returns, redelivered when it raises."""
        self.subscriptions.append(topic)
        self.metrics.consuming(topic)

        async def handle(message=Context("message")) -> None:
            await handler(message.body)

        handle.__name__ = f"{self.name}_{kind.replace('-', '_')}"
        if broker_kind(self.broker) == "kafka":
            # Offsets are committed after the handler: a crash means redelivery, not loss. A long
            # training round must not count as a dead consumer, hence the long poll interval.
            self.broker.subscriber(topic, group_id=self.group, auto_offset_reset="earliest",
                                   ack_policy=AckPolicy.NACK_ON_ERROR, max_poll_interval_ms=3_600_000)(handle)
        else:
            from faststream.redis import StreamSub
            # One message read at a time: a batch would sit pending, unhandled, long enough for the
            # reclaiming subscriber below to take it for a dead consumer's and handle it twice.
            self.broker.subscriber(stream=StreamSub(topic, group=self.group, consumer=self.consumer, max_records=1),
                                   ack_policy=AckPolicy.NACK_ON_ERROR)(handle)
            # Redis does not hand a dead consumer's pending messages to anyone by itself: this second
            # subscriber claims those idle longer than PGKD_CLAIM_IDLE_MS (XAUTOCLAIM).
            self.broker.subscriber(stream=StreamSub(topic, group=self.group, consumer=f"{self.consumer}-reclaim",
                                                    min_idle_time=self.settings.claim_idle_ms),
                                   ack_policy=AckPolicy.NACK_ON_ERROR)(handle)

    async def handle(self, topic: str, body: bytes, message_type: type[Message], step) -> None:
        try:
            message = message_type.model_validate_json(body)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'message'}: {err['msg']}"
                                 for err in e.errors()[:3])
            await self.dead_letter(topic, body, f"not a valid {message_type.__name__}: {problems}")
            return
        async with self._busy:  # not held while publishing: an in-memory test broker delivers in this call
            started = time.perf_counter()
            try:
                output, unpublished = await asyncio.to_thread(self._run_once, message, step)
            except Exception as e:  # the step failed for this run: park the message, end the run clearly
                reason = f"{self.name} failed on {message.kind} cycle {message.cycle}: {type(e).__name__}: {e}"
                log.exception("%s: run %s: %s", self.name, message.run_id, reason)
                await self.dead_letter(topic, body, reason, message)
                output, unpublished = await asyncio.to_thread(self._record_failure, message, reason), True
        if not unpublished:
            log.info("%s: run %s cycle %d: %s already handled; nothing to do", self.name, message.run_id,
                     message.cycle, message.kind)
            return
        log.info("%s: run %s cycle %d: %s -> %s (%.1f s)", self.name, message.run_id, message.cycle,
                 message.kind, output.kind, time.perf_counter() - started)
        await self.publish(output)
        await asyncio.to_thread(self.store.put_bytes, self._handled_key(message) + ".published", b"")

    def _handled_key(self, message: Message) -> str:
        return f"{RunFiles(message.run_id).base}/handled/{message.kind}-{message.cycle:04d}"

    def _run_once(self, message: Message, step) -> tuple[Message, bool]:
        """The step's output, computed once: (output, not yet published)."""
        key = self._handled_key(message)
        if self.store.exists(key + ".json"):
            record = self.store.get_json(key + ".json")
            output = MESSAGE_BY_KIND[record["kind"]].model_validate(record["message"])
            return output, not self.store.exists(key + ".published")
        output = step(message, self.store)
        self.store.put_json(key + ".json", {"kind": output.kind, "message": output.model_dump(mode="json")})
        return output, True

    def _record_failure(self, message: Message, reason: str) -> RunCompleted:
        output = fail_run(self.store, message.run_id, message.cycle, reason)
        self.metrics.completed(message.run_id, "failed", reason)
        self.store.put_json(self._handled_key(message) + ".json",
                            {"kind": output.kind, "message": output.model_dump(mode="json")})
        return output

    # -- publishing -----------------------------------------------------------------------------------------
    async def publish(self, message: Message) -> None:
        await self.send(message.model_dump_json().encode(), message.topic, key=message.run_id)

    async def dead_letter(self, topic: str, body: bytes, reason: str, message: Message | None = None) -> None:
        letter = DeadLetter(source_topic=topic, service=self.name, reason=reason,
                            payload=body.decode("utf-8", errors="replace")[:100_000],
                            run_id=message.run_id if message else None, cycle=message.cycle if message else None)
        log.warning("%s: dead letter from %s: %s", self.name, topic, reason)
        self.metrics.dead_letter(topic)
        await self.send(letter.model_dump_json().encode(), DeadLetter.topic, key=letter.run_id)

    async def send(self, body: bytes, topic: str, key: str | None = None) -> None:
        await send(self.broker, body, self.topic(topic), key)

    # -- running ---------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Before serving: read what the service needs (a bad setting raises UserError: one line, exit 2)."""

    async def started(self) -> None:
        """Once the broker is connected: work left over from a previous process."""

    def app(self) -> AsgiFastStream:
        @get
        async def alive(scope) -> AsgiResponse:
            return AsgiResponse(b"ok", 200)

        async def create_groups() -> None:
            if broker_kind(self.broker) == "redis":
                await create_redis_groups(self.settings.broker_url, {topic: self.group for topic in self.subscriptions})

        return AsgiFastStream(self.broker, on_startup=[create_groups], after_startup=[self.started], asgi_routes=[
            ("/metrics", make_asgi_app()),
            ("/healthz", alive),
            ("/readyz", make_ping_asgi(self.broker, timeout=5.0)),
        ])

    def run(self) -> None:
        """Serve until SIGTERM or SIGINT; then stop taking messages and finish (or hand back, by not
        acknowledging it) the one in flight within PGKD_GRACEFUL_TIMEOUT."""
        log.info("%s: broker %s, artifacts %s, topics %s*, HTTP on :%d", self.name, self.settings.broker_url,
                 self.store.url, self.settings.topic_prefix, self.settings.metrics_port)
        # uvicorn shuts down gracefully, then raises the signal again under the handler it found:
        # let that handler be a clean exit, not death by signal.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        asyncio.run(self.app().run(logging.WARNING, {"host": "0.0.0.0", "port": self.settings.metrics_port}))
