"""What every service shares: the broker named by PGKD_BROKER_URL, topic names, at-least-once
handling made idempotent, the dead-letter topic, and the HTTP side (/metrics, /healthz, /readyz).

A service is a FastStream app whose handlers are engine steps (pgkd.distributed.steps): decode the message,
call the step, publish what it returns. The bus is Kafka: Apache Kafka in production, the
Kafka-compatible Tansu broker in the multi-process tests, FastStream's in-memory broker in the fast ones.

Delivery is at least once: a message is acknowledged after its result is published. A handler
records its output under the run's `handled/` folder in the artifact store before publishing, so a
redelivered message repeats no work: its stored output is published again if it never was, and
nothing happens if it was.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import dataclasses
import errno
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
from pgkd.artifacts import ArtifactError, ArtifactStore
from pgkd.errors import EnvironmentFailure, UserError, dotted, invalid
from pgkd.net import DEFAULT_HOST, parse_address
from pgkd.settings import ArtifactSettings, BrokerSettings, ServiceSettings, one, read
from pgkd.distributed.messages import MESSAGES, DeadLetter, Message, RunCompleted
from pgkd.distributed.runs import RunFiles, fail_run
from pgkd.distributed.metrics import LoopMetrics
from prometheus_client import REGISTRY, make_asgi_app
from pydantic import BaseModel, ValidationError

from pgkd_services import kafka_security

log = logging.getLogger("pgkd.service")
_metrics: LoopMetrics | None = None
# The record a handler is taking (aiokafka's ConsumerRecord: topic, partition, offset, key, value,
# headers): what a dead letter keeps of it besides its value.
_received: contextvars.ContextVar = contextvars.ContextVar("pgkd_received_record", default=None)
# The headers a dead-letter record has besides the original's, each value UTF-8 text.
DEAD_LETTER_HEADERS = ("pgkd.dead-letter.reason", "pgkd.dead-letter.service", "pgkd.dead-letter.topic",
                       "pgkd.dead-letter.partition", "pgkd.dead-letter.offset")
PAYLOAD_LIMIT = 100_000    # characters of a dead letter's payload (a longer one is cut: payload_bytes says so)


class CannotServe(EnvironmentFailure):
    """The environment keeps a service from starting (its HTTP port taken, a compression codec
    missing): `pgkd service` prints the one line and exits 1."""


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
    http_host: str = DEFAULT_HOST       # where /metrics, /healthz and /readyz listen: PGKD_HTTP_HOST
    graceful_timeout: float = 300.0     # on SIGTERM, wait this long for the message in flight
    prometheus_url: str | None = None   # the evaluator's stop policy reads Prometheus there
    prometheus_wait: float = 30.0       # seconds it waits for Prometheus to scrape the current cycle

    @classmethod
    def from_env(cls, env=None) -> "Settings":
        """The process's settings (os.environ, or `env`): pgkd.settings' broker, artifact store and service
        sections; UserError naming the variable."""
        kafka_security.current()   # PGKD_KAFKA_*: a bad one fails a service at start, a command before any work
        broker, store, service = (read(BrokerSettings, env), read(ArtifactSettings, env), read(ServiceSettings, env))
        return cls(broker_url=broker.url, artifacts=store.artifacts, topic_prefix=broker.topic_prefix,
                   metrics_port=service.metrics_port, http_host=service.http_host,
                   graceful_timeout=service.graceful_timeout, prometheus_url=service.prometheus_url,
                   prometheus_wait=service.prometheus_wait)


def make_broker(url: str, graceful_timeout: float | None = None, app_name: str | None = None):
    """`kafka://host:9092,host2:9092`. With `app_name`, FastStream's Prometheus middleware counts and
    times the messages, in the default registry (/metrics)."""
    from faststream.kafka import KafkaBroker
    from faststream.kafka.prometheus import KafkaPrometheusMiddleware
    middlewares = [KafkaPrometheusMiddleware(registry=REGISTRY, app_name=app_name)] if app_name else []
    # Topics come from `pgkd topics create` (or Strimzi's KafkaTopics): a service whose Kafka user may
    # only read and write its own topics must not try to create them when it subscribes.
    return KafkaBroker(bootstrap_servers(url), graceful_timeout=graceful_timeout, middlewares=middlewares,
                       security=kafka_security.current().faststream(), allow_auto_create_topics=False)


def bootstrap_servers(url: str) -> list[str]:
    """The host:port list of `kafka://host:port[,host:port...]`; anything else is one line."""
    scheme, _, rest = url.partition("://")
    servers = [s.strip() for s in rest.split(",") if s.strip()]
    if scheme != "kafka" or not servers:
        raise UserError(f"PGKD_BROKER_URL={url}: expected kafka://host:port[,host:port...]")
    for server in servers:
        parse_address(server, f"PGKD_BROKER_URL={url}")
    return servers


def missing_codecs() -> list[str]:
    """The compression codecs aiokafka cannot decode here. A producer chooses the codec of its batches
    and Apache Kafka keeps it: a consumer without it fails on the batch, again and again."""
    from aiokafka import codec
    return [name for name, present in (("gzip", codec.has_gzip), ("snappy", codec.has_snappy),
                                       ("lz4", codec.has_lz4), ("zstd", codec.has_zstd)) if not present()]


def tombstone_reason(what: str) -> str:
    return f"tombstone: the record has no value (null): a delete marker, not {what}"


def broker_errors() -> tuple[type[BaseException], ...]:
    """What a broker that is down or unreachable raises."""
    from aiokafka.errors import KafkaError
    return OSError, asyncio.TimeoutError, KafkaError


def broker_failure(message: str, servers: list[str]) -> Exception:
    """A broker that failed a command. If no broker's port answers at all, the environment failed (it
    is down, or not where PGKD_BROKER_URL says): exit 1. If a port answers and the client still failed,
    the broker is there and refused what was asked of it (a login, a certificate, a record): the
    input's fault, exit 2."""
    for server in servers:
        host, port = parse_address(server, "broker")
        try:
            socket.create_connection((host, port), timeout=1.0).close()
            return UserError(message)
        except OSError:
            continue
    return EnvironmentFailure(message)


@contextlib.asynccontextmanager
async def connected(broker, url: str):
    """The broker, connected for a command (not a service): one that cannot be reached is one line,
    and its client is closed either way (no 'Unclosed AIOKafkaProducer')."""
    try:
        await asyncio.wait_for(_bootstrap_kafka(url), connect_timeout())
        await asyncio.wait_for(broker.connect(), connect_timeout())
    except broker_errors() as e:
        await _quietly_stop(broker)
        raise broker_failure(f"PGKD_BROKER_URL={url}: cannot reach the broker ({_reason(e)})",
                             bootstrap_servers(url)) from None
    try:
        yield broker
    finally:
        await _quietly_stop(broker)


def connect_timeout() -> float:
    """Seconds a command (submit, send, topics) waits for the broker to answer, and a service starting
    keeps trying to reach it: PGKD_CONNECT_TIMEOUT, 10 (pgkd.settings.BrokerSettings)."""
    return one(BrokerSettings, "connect_timeout")


async def _bootstrap_kafka(url: str) -> None:
    """Reach the Kafka brokers with a client of our own first: FastStream leaves the producer of a
    broker that failed to connect unclosed, and aiokafka then warns about it at exit."""
    from aiokafka.client import AIOKafkaClient
    from aiokafka.errors import KafkaError
    security = kafka_security.current()
    client = AIOKafkaClient(bootstrap_servers=bootstrap_servers(url), **security.aiokafka())
    quiet, level = logging.getLogger("aiokafka"), logging.getLogger("aiokafka").level
    quiet.setLevel(logging.CRITICAL)       # the one line we raise says what failed
    try:
        await client.bootstrap()
    except (KeyError, ValueError) as e:
        if not security.uses_sasl:
            raise
        # aiokafka's SCRAM client fails so on a refusal it cannot parse (Tansu answers `e=unknown-user`)
        detail = "the server's answer has no signature" if isinstance(e, KeyError) else str(e)
        raise KafkaError(f"SASL {security.sasl_mechanism} authentication as {security.sasl_username} failed: "
                         f"{detail}") from None
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
        return f"no answer within {connect_timeout():g} s"
    return str(e).strip() or type(e).__name__


async def send(broker, body: bytes, topic: str, key: str | None = None) -> None:
    """Publish to a Kafka topic, keyed by run: one run's messages stay in one partition, in order."""
    await broker.publish(body, topic, key=key.encode() if key else None)


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
        self._busy = asyncio.Lock()     # one message at a time: steps are heavy and share the process's cache
        self.subscriptions: list[str] = []   # topics this service consumes, as group `self.group`
        # topic -> (the message it carries, its handler, whether the handler takes it decoded)
        self._handlers: dict[str, tuple[type[BaseModel], Callable[..., Awaitable[None]], bool]] = {}
        # (most messages, most seconds to wait for them): a service that sets it takes its messages in
        # batches, in `handle_batch`, each batch acknowledged when that returns
        self.batch: tuple[int, float] | None = None
        self.warm: list[Callable[[], None]] = []   # run by `prepare`, before the service consumes
        self.fatal: str | None = None   # why the service stopped itself (`stop_failed`): its exit is 1

    def topic(self, name: str) -> str:
        return f"{self.settings.topic_prefix}{name}"

    def stop_failed(self, reason: str) -> None:
        """A condition no message is to blame for and none can fix (another ingest writes its stream): said
        once, and the service stops as on SIGTERM, its message in flight not acknowledged, then exits with
        code 1 (`run`): Compose and Kubernetes show it failed, not finished."""
        if self.fatal is None:
            log.error("%s: %s; stopping", self.name, reason)
            self.fatal = reason
            os.kill(os.getpid(), signal.SIGTERM)

    # -- consuming -----------------------------------------------------------------------------------------
    def consume(self, message_type: type[Message], step: Callable[..., Message]) -> None:
        """Run the engine step on each message of its type, once (`run_step`), and publish what it returns."""
        async def run(message: Message) -> None:
            await self.run_step(message, step)
        self.subscribe(message_type, run)

    def subscribe(self, message_type: type[BaseModel], handler: Callable[..., Awaitable[None]],
                  decode: bool = True) -> None:
        """Deliver each message of `message_type`'s topic to `handler` in this service's consumer group,
        once `listen` has run: decoded as `message_type` (one that is not goes to the dead-letter topic
        with the reason, here, for every service), or as its bytes with `decode=False`. Acknowledged
        when the handler returns, redelivered when it raises."""
        topic = self.topic(message_type.topic)
        self.subscriptions.append(topic)
        self._handlers[topic] = (message_type, handler, decode)
        self.metrics.consuming(topic)

    def listen(self) -> None:
        """One Kafka consumer for all the service's topics. Two consumers in one group would rebalance
        each other: on SIGTERM the idle one leaves first, the busy one's partitions are revoked in
        the middle of its message, and its commit after the message goes stale (redelivered)."""
        batch = {}
        if self.batch is None:
            async def handle(message=Context("message")) -> None:
                await self.deliver(message.raw_message)
        else:
            async def handle(message=Context("message")) -> None:
                await self.handle_batch(list(message.raw_message))
            batch = dict(batch=True, max_records=self.batch[0], batch_timeout_ms=int(self.batch[1] * 1000))

        handle.__name__ = f"{self.name}_messages"
        # Offsets are committed after the handler: a crash means redelivery, not loss. A long training
        # round must not count as a dead consumer, hence the long poll interval.
        self.broker.subscriber(*self._handlers, group_id=self.group, auto_offset_reset="earliest",
                               ack_policy=AckPolicy.NACK_ON_ERROR, max_poll_interval_ms=3_600_000,
                               parser=_any_header_bytes, decoder=_undecoded, **batch)(handle)

    async def handle_batch(self, records: list) -> None:
        """A batch of records (aiokafka's ConsumerRecord), in order: by default each to its topic's handler."""
        for record in records:
            await self.deliver(record)

    async def deliver(self, record) -> None:
        """One record to its topic's handler, decoded, the record known to `dead_letter` meanwhile. A
        tombstone (a null value) or a value that is not the topic's message goes to the dead-letter
        topic, with the reason."""
        token = _received.set(record)
        try:
            message_type, handler, decode = self._handlers[record.topic]
            if record.value is None:
                await self.dead_letter(record.topic, None, tombstone_reason(f"a {message_type.__name__} message"))
                return
            if not decode:
                await handler(record.value)
                return
            try:
                message = message_type.model_validate_json(record.value)
            except ValidationError as e:
                problems = invalid(e, dotted("message"), limit=3)
                await self.dead_letter(record.topic, record.value, f"not a valid {message_type.__name__}: {problems}")
                return
            await handler(message)
        finally:
            _received.reset(token)

    async def run_step(self, message: Message, step) -> None:
        """The step on `message`, once: a redelivered message publishes the output stored the first time
        (if it was not published yet), and repeats no work. A step that fails parks the message on the
        dead-letter topic and ends its run as failed, so nobody waits for it forever."""
        if not await asyncio.to_thread(self.store.exists, RunFiles(message.run_id).request):
            # Every run is recorded before its first message is published: this one belongs to none,
            # and failing "its" run would write a record for a run that never was.
            await self.park(f"run {message.run_id!r} is not recorded in {self.store.url}", message)
            return
        log.info("%s: run %s cycle %d: %s received", self.name, message.run_id, message.cycle, message.kind)
        await asyncio.to_thread(self._mark_taken, message)
        async with self._busy:  # not held while publishing: an in-memory test broker delivers in this call
            started = time.perf_counter()
            try:
                output, unpublished = await asyncio.to_thread(self._run_once, message, step)
            except Exception as e:  # the step failed for this run: park the message, end the run clearly
                reason = f"{self.name} failed on {message.kind} cycle {message.cycle}: {type(e).__name__}: {e}"
                if isinstance(e, UserError):    # a state or record that says what is wrong with it: one line
                    log.error("%s: run %s: %s", self.name, message.run_id, reason)
                else:
                    log.exception("%s: run %s: %s", self.name, message.run_id, reason)
                if await asyncio.to_thread(self.store.exists, RunFiles(message.run_id).completed):
                    # a stray or replayed message of a run that has ended: its outcome stands
                    await self.park(f"{reason} (run {message.run_id} had ended; its outcome stands)", message)
                    return
                await self.park(reason, message)
                output, unpublished = await asyncio.to_thread(self._record_failure, message, reason), True
        if not unpublished:
            log.info("%s: run %s cycle %d: %s already handled; nothing to do", self.name, message.run_id,
                     message.cycle, message.kind)
            return
        log.info("%s: run %s cycle %d: %s -> %s (%.1f s)", self.name, message.run_id, message.cycle,
                 message.kind, output.kind, time.perf_counter() - started)
        await self.publish(output)
        await asyncio.to_thread(self.store.put_bytes, self._handled_key(message) + ".published", b"")

    async def park(self, reason: str, message: Message | None = None) -> None:
        """The record being handled, to the dead-letter topic with `reason`."""
        record = _received.get()
        await self.dead_letter(record.topic, record.value, reason, message)

    def _handled_key(self, message: Message) -> str:
        return f"{RunFiles(message.run_id).base}/handled/{message.kind}-{message.cycle:04d}"

    def _mark_taken(self, message: Message) -> None:
        """A service has the message: `pgkd submit --wait` sees that the run was taken (and waits on)."""
        try:
            self.store.put_bytes(self._handled_key(message) + ".taken", b"")
        except (ArtifactError, OSError) as e:   # the step's own writes will say what is wrong with the store
            log.warning("%s: run %s: cannot mark %s taken: %s", self.name, message.run_id, message.kind, e)

    def _run_once(self, message: Message, step) -> tuple[Message, bool]:
        """The step's output, computed once: (output, not yet published)."""
        key = self._handled_key(message)
        if self.store.exists(key + ".json"):
            record = self.store.get_json(key + ".json")
            output = MESSAGE_BY_KIND[record["kind"]].model_validate(record["message"])
            return output, not self.store.exists(key + ".published")
        output = step(message, self.store, events=[self.metrics])
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

    async def dead_letter(self, topic: str, body: bytes | None, reason: str, message: Message | None = None,
                          record=None) -> None:
        """Park a message on the dead-letter topic with the reason. `record` is the one it came in (by
        default the one being handled, when it is from `topic`): the dead letter keeps its partition
        and offset, and its key and headers as the dead-letter record's own (docs/services.md: Dead letters)."""
        if record is None and (received := _received.get()) is not None and received.topic == topic:
            record = received
        letter = dead_letter_body(topic, self.name, body, reason, message, record)
        log.warning("%s: dead letter from %s: %s", self.name, topic, reason)
        self.metrics.dead_letter(topic)
        key = record.key if record is not None and record.key else (letter.run_id.encode() if letter.run_id else None)
        await self.broker.publish(letter.model_dump_json().encode(), self.topic(DeadLetter.topic), key=key,
                                  headers=dead_letter_headers(letter, record))

    async def send(self, body: bytes, topic: str, key: str | None = None) -> None:
        await send(self.broker, body, self.topic(topic), key)

    # -- running ---------------------------------------------------------------------------------------------
    def http_socket(self) -> socket.socket:
        """The socket /metrics, /healthz and /readyz will listen on, bound now: a port another process
        holds is one line naming PGKD_METRICS_PORT (CannotServe), before the broker is tried."""
        host, port = self.settings.http_host, self.settings.metrics_port
        where = f"PGKD_HTTP_HOST={host} PGKD_METRICS_PORT={port}"
        try:
            family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                 flags=socket.AI_PASSIVE)[0]
        except OSError as e:
            raise CannotServe(f"{self.name}: cannot listen on {where}: {e.strerror or e}") from None
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn does
        try:
            sock.bind(address)
        except OSError as e:
            sock.close()
            if e.errno == errno.EADDRINUSE:
                raise CannotServe(f"{self.name}: PGKD_METRICS_PORT={port}: port {port} on {host} is in use by "
                                  "another process; set PGKD_METRICS_PORT to a free port") from None
            raise CannotServe(f"{self.name}: cannot listen on {where}: {e.strerror or e}") from None
        return sock

    def prepare(self) -> None:
        """Before serving: read what the service needs (a bad setting raises UserError: one line, exit 2),
        and warm what its first message would otherwise pay for (`warm`)."""
        for warm in self.warm:
            warm()

    async def started(self) -> None:
        """Once the broker is connected: work left over from a previous process."""

    def app(self) -> AsgiFastStream:
        @get
        async def alive(scope) -> AsgiResponse:
            # Alive is consuming: a service whose consumer failed to start is to be restarted, not kept.
            return AsgiResponse(b"ok", 200) if self.broker.running else AsgiResponse(b"not consuming", 503)

        return AsgiFastStream(self.broker, after_startup=[self.started], asgi_routes=[
            ("/metrics", make_asgi_app()),
            ("/healthz", alive),
            ("/readyz", make_ping_asgi(self.broker, timeout=5.0)),
        ])

    def run(self) -> None:
        """Bind the HTTP port, `prepare`, connect to the broker, then serve until SIGTERM or SIGINT; then
        stop taking messages and finish (or hand back, by not acknowledging it) the one in flight within PGKD_GRACEFUL_TIMEOUT. A port
        taken or a bad setting is one line, said before anything else."""
        missing = missing_codecs()
        if missing:
            raise CannotServe(f"{self.name}: aiokafka here cannot decode {', '.join(missing)} compressed batches, "
                              "which Kafka delivers as their producer wrote them; install pgkd again (it requires "
                              "aiokafka[lz4,snappy,zstd])")
        sock = self.http_socket()    # a port taken is said at once, before warming and the broker
        try:
            self.prepare()
        except BaseException:
            sock.close()
            raise
        log.info("%s: broker %s, artifacts %s, topics %s*, HTTP on %s:%d", self.name, self.settings.broker_url,
                 self.store.url, self.settings.topic_prefix, self.settings.http_host, self.settings.metrics_port)
        # uvicorn shuts down gracefully, then raises the signal again under the handler it found:
        # let that handler be a clean exit, not death by signal.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            asyncio.run(self._serve(sock))
        except SystemExit:
            if self.fatal is None:
                raise
        finally:
            sock.close()
        if self.fatal is not None:
            raise CannotServe(f"{self.name}: {self.fatal}")

    async def _serve(self, sock: socket.socket) -> None:
        import uvicorn
        await self.connect()
        # AsgiFastStream.run, on the socket bound at start (it listens only now, once the broker is reached)
        config = uvicorn.Config(app=self.app(), log_level=logging.WARNING, host=self.settings.http_host,
                                port=self.settings.metrics_port)
        await uvicorn.Server(config).serve(sockets=[sock])

    async def connect(self) -> None:
        """Reach the broker before serving, trying each second for PGKD_CONNECT_TIMEOUT seconds, then give
        up with one line and exit 1 (a TimeoutError). A service never runs without its broker: FastStream,
        left to connect by itself, logs the failure and serves on, deaf, where Compose (`restart:
        unless-stopped`) and Kubernetes would restart a process that had exited."""
        url, timeout = self.settings.broker_url, connect_timeout()
        deadline = time.monotonic() + timeout
        while True:
            try:
                await asyncio.wait_for(_bootstrap_kafka(url), max(deadline - time.monotonic(), 0.5))
                await asyncio.wait_for(self.broker.connect(), max(deadline - time.monotonic(), 0.5))
                return
            except broker_errors() as e:
                await _quietly_stop(self.broker)
                if time.monotonic() + 1 >= deadline:
                    raise TimeoutError(f"{self.name}: cannot reach the broker at PGKD_BROKER_URL={url} within "
                                       f"{timeout:g} s ({_reason(e)})") from None
                log.info("%s: the broker is not reachable yet (%s); trying again", self.name, _reason(e))
            await asyncio.sleep(1)


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def dead_letter_body(topic: str, service: str, body: bytes | None, reason: str, message: Message | None,
                     record) -> DeadLetter:
    """The dead letter's JSON: the reason, the payload (as text, and as base64 where it is not UTF-8),
    and where the record was with its key and headers, when `record` is known."""
    exact = None
    if body is not None:
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            exact = base64.b64encode(body[:PAYLOAD_LIMIT * 3 // 4]).decode()
    return DeadLetter(
        source_topic=topic, service=service, reason=reason,
        payload=_text(body)[:PAYLOAD_LIMIT] if body is not None else "",
        payload_bytes=len(body) if body is not None else None, payload_base64=exact,
        run_id=message.run_id if message else None, cycle=message.cycle if message else None,
        source_partition=record.partition if record is not None else None,
        source_offset=record.offset if record is not None else None,
        key=_text(record.key) if record is not None and record.key is not None else None,
        headers=[(name, _text(value or b"")) for name, value in (record.headers if record is not None else ())])


def dead_letter_headers(letter: DeadLetter, record) -> dict[str, str]:
    """The dead-letter record's headers: the original's (as FastStream takes them: the last of a repeated
    name), then `pgkd.dead-letter.*`: reason, service, source topic, partition and offset."""
    headers = {name: value for name, value in letter.headers}
    headers.update({"pgkd.dead-letter.reason": letter.reason[:1000], "pgkd.dead-letter.service": letter.service,
                    "pgkd.dead-letter.topic": letter.source_topic})
    if record is not None:
        headers.update({"pgkd.dead-letter.partition": str(record.partition),
                        "pgkd.dead-letter.offset": str(record.offset)})
    return headers


async def _any_header_bytes(records, parse):
    """FastStream's parser decodes every header value as UTF-8 and drops a record whose one is not, before
    any handler sees it. Such a record is parsed with its header values decoded leniently; the handler
    reads the raw record (`raw_message`), the exact bytes, which a dead letter keeps."""
    try:
        return await parse(records)
    except UnicodeDecodeError:
        raw = records
        lenient = [dataclasses.replace(r, headers=[(k, v.decode("utf-8", "replace").encode()) for k, v in r.headers])
                   for r in (records if isinstance(records, tuple) else [records])]
        message = await parse(tuple(lenient) if isinstance(records, tuple) else lenient[0])
        message.raw_message = raw
        return message


async def _undecoded(message, decode):
    """No body decoding by FastStream (its batch decoder parses the raw records again): `deliver` decodes
    each record itself, from its raw bytes."""
    return None
