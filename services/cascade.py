"""`pgkd cascade serve`: the served cascade (pgkd.serving.cascade_server), and the publisher that
sends each teacher label to the stream's input topic, so that the stream's runs distill production
traffic (ingest stores them as teacher labels: never in validation, their share of a run bounded).

The publisher never blocks a request: labels wait in a bounded buffer that one thread drains to the
broker (kafka-python's producer, as `pgkd send`); while the broker is down they wait there, and
when the buffer is full a label is dropped and counted (pgkd_cascade_labels{outcome="dropped"})."""
from __future__ import annotations

import argparse
import functools
import logging
import queue
import random
import threading
import time
from pathlib import Path

from pgkd.distributed.messages import TEACHER_SOURCE, LabeledSample
from pgkd.errors import Option, UserError
from pgkd.names import check_name
from pgkd.settings import TritonSettings, read
from pgkd.net import DEFAULT_HOST, host_option, port_option, require_free_ports, triton_host

from pgkd_services import kafka_security
from pgkd_services.runtime import Settings, bootstrap_servers

log = logging.getLogger("pgkd.cascade")

BATCH = 256               # labels sent between two flushes
RETRY_SECONDS = 1.0       # after the broker failed a send
BROKER_WAIT_MS = 5000     # a producer gives up on a broker it cannot reach (connect, metadata) after this
WARN_EVERY = 60.0         # while the broker stays away: the first failure said at once, then once a minute
MAX_INSTANCES = 64        # --instances: each is a Python-backend process of PyTriton's


class LabelPublisher:
    """`publisher(labels)` queues teacher labels (pgkd.serving.cascade.TeacherLabel) for `topic`;
    `start()` begins draining the queue, `stop()` sends what it can within `flush_timeout`."""

    def __init__(self, bootstrap: list[str], topic: str, capacity: int = 10_000, metrics=None, producer=None,
                 flush_timeout: float = 10.0):
        self.bootstrap, self.topic, self.metrics, self.flush_timeout = bootstrap, topic, metrics, flush_timeout
        self.queue: queue.Queue[bytes] = queue.Queue(maxsize=capacity)
        self.published = self.dropped = 0
        self._producer, self._stop, self._thread = producer, threading.Event(), None
        self._pending: list[bytes] = []
        self._left_lock, self._left_counted = threading.Lock(), False
        self._broker_up = False         # the last send went through
        self._warned_at: float | None = None     # when a failure was last said, while the broker stays away
        if metrics is not None:      # read at each scrape: a broker that is down shows as labels waiting
            metrics.labels_waiting.set_function(self.waiting)

    def waiting(self) -> int:
        """Labels not yet published nor dropped: in the buffer, and the batch being sent."""
        return 0 if self._left_counted else self.queue.qsize() + len(self._pending)

    def __call__(self, labels) -> None:
        for label in labels:
            body = LabeledSample(text=label.text, label=label.label, source=TEACHER_SOURCE,
                                 model=label.model).model_dump_json(exclude_none=True).encode()
            try:
                self.queue.put_nowait(body)
            except queue.Full:
                self.dropped += 1
                if self.metrics is not None:
                    self.metrics.labels.labels("dropped").inc()

    def start(self) -> "LabelPublisher":
        self._thread = threading.Thread(target=self._run, name="cascade-labels", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            # A broker not known to be up (the last send failed, or none went through yet) gets at most 5 s,
            # not flush_timeout and more: a stop within the orchestrator's grace (Docker's 10 s, Kubernetes'
            # 30 s) counts what is left as dropped.
            self._thread.join(self.flush_timeout + 5 if self._broker_up else min(self.flush_timeout, 5.0))
        self._drop_left()     # the thread still waiting on the broker: the process ends without it

    def _make_producer(self):
        from kafka import KafkaProducer
        return KafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=20, client_id="pgkd-cascade",
                             max_block_ms=BROKER_WAIT_MS, bootstrap_timeout_ms=BROKER_WAIT_MS,
                             reconnect_backoff_max_ms=BROKER_WAIT_MS, **kafka_security.current().kafka_python())

    def _run(self) -> None:
        deadline = None
        while True:
            if self._stop.is_set():
                deadline = deadline or time.monotonic() + self.flush_timeout
                if (not self._pending and self.queue.empty()) or time.monotonic() > deadline:
                    break
            while len(self._pending) < BATCH:
                try:
                    self._pending.append(self.queue.get(timeout=0.2 if not self._pending else 0))
                except queue.Empty:
                    break
            if not self._pending:
                continue
            try:
                sent = len(self._pending)
                self._send()
                self._broker_up = True
                if self._warned_at is not None:
                    log.warning("cascade: the broker is back: %d teacher label(s) published to %s", sent, self.topic)
                    self._warned_at = None
            except Exception as e:  # noqa: BLE001 -- the broker is down or refused: the labels wait, requests go on
                self._broker_up = False
                if self._warned_at is None or time.monotonic() - self._warned_at >= WARN_EVERY:
                    self._warned_at = time.monotonic()
                    log.warning("cascade: cannot publish %d teacher label(s) to %s (%s); they wait, and %d more in "
                                "the buffer of %d (said again each minute it lasts)", len(self._pending), self.topic,
                                str(e)[:200] or type(e).__name__, self.queue.qsize(), self.queue.maxsize)
                self._close_producer()
                self._stop.wait(RETRY_SECONDS * (1 + random.random()))
        self._close_producer()
        self._drop_left()

    def _drop_left(self) -> None:
        """Stopping: what the broker did not take within flush_timeout is said and counted, once."""
        with self._left_lock:
            left = 0 if self._left_counted else len(self._pending) + self.queue.qsize()
            self._left_counted = True
        if left:
            self.dropped += left
            if self.metrics is not None:
                self.metrics.labels.labels("dropped").inc(left)
            log.warning("cascade: stopping: %d teacher label(s) could not be published to %s and are dropped",
                        left, self.topic)

    def _send(self) -> None:
        if self._producer is None:
            self._producer = self._make_producer()
        futures = [self._producer.send(self.topic, value=body) for body in self._pending]
        self._producer.flush(timeout=self.flush_timeout)
        sent = 0
        for future in futures:
            future.get(timeout=self.flush_timeout)
            sent += 1
        self.published += sent
        if self.metrics is not None:
            self.metrics.labels.labels("published").inc(sent)
        self._pending = []

    def _close_producer(self) -> None:
        if self._producer is not None:
            try:
                self._producer.close(timeout=1)
            except Exception:  # noqa: BLE001 -- closing a producer of a broker that is gone
                pass
            self._producer = None


class _WithDefaults(argparse.HelpFormatter):
    """--help shows each option's default (one that has a value)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def serve_cascade(args) -> int:
    from pgkd.serving.cascade import Cascade, CascadeMetrics, Policy, PolicySource, prompt_parts
    from pgkd.serving.cascade_server import CascadeModel, serve
    from pgkd.serving.client import StudentClient

    for name in ("student_timeout", "teacher_timeout"):
        value = getattr(args, name)
        if not (value > 0 and value < float("inf")):
            raise UserError(Option(name, value), ": expected a finite number of seconds above 0")
    for name in ("teacher_concurrency", "max_per_call", "instances", "label_buffer"):
        if getattr(args, name) < 1:
            raise UserError(Option(name, getattr(args, name)), ": expected 1 or more")
    if args.instances > MAX_INSTANCES:   # each instance is a process of PyTriton's
        raise UserError(Option("instances", args.instances), f": at most {MAX_INSTANCES}")
    for name in ("price_prompt_per_1k", "price_completion_per_1k"):
        value = getattr(args, name)
        if not (value >= 0 and value < float("inf")):
            raise UserError(Option(name, value), ": expected a finite number, 0 or more")
    if args.examples_per_class < 0:
        raise UserError(Option("examples_per_class", args.examples_per_class), ": expected 0 or more")
    teacher = teacher_factory(args.teacher, args.teacher_timeout, args.price_prompt_per_1k,
                              args.price_completion_per_1k)
    check_name(args.student_model, Option("student_model"))    # named as this command spells it
    read(TritonSettings)              # a bad PGKD_TRITON_LOG is said now, not once the student is probed
    if args.policy_file and not Path(args.policy_file).parent.is_dir():
        raise UserError(Option("policy_file", args.policy_file), ": no such folder")
    given = {k: getattr(args, k) for k in ("threshold", "target_accuracy", "max_teacher_share")
             if getattr(args, k) is not None}
    policy = Policy(**given)          # none: the threshold the run recorded with the student
    args.host = triton_host(args.host)
    require_free_ports(args.host, {"--http-port": args.http_port, "--grpc-port": args.grpc_port,
                                   "--metrics-port": args.metrics_port,
                                   "--cascade-metrics-port": args.cascade_metrics_port})

    # The prompt's descriptions and examples for a student's labels: read once per set of labels (the wait
    # for a student checks its calibration every few seconds).
    parts = functools.lru_cache(maxsize=1)(lambda labels: prompt_parts(
        list(labels), args.taxonomy, args.data, args.examples_per_class, args.seed))

    def check(calibration) -> None:   # the input's faults, said before the student is reached
        if not calibration.labels:
            raise UserError(Option("calibration", args.calibration), ": names no labels (written by an older pgkd?)")
        PolicySource(policy, calibration, args.policy_file)      # a target its held scores cannot meet
        parts(tuple(calibration.labels))                         # a taxonomy or --data that does not fit them
    calibrations = student_ready(args, check)
    calibration = calibrations.current
    from prometheus_client import CollectorRegistry, start_http_server
    registry = CollectorRegistry()     # the cascade's own: served on --cascade-metrics-port
    metrics = CascadeMetrics(registry, price_prompt_per_1k=args.price_prompt_per_1k,
                             price_completion_per_1k=args.price_completion_per_1k)
    source = PolicySource(policy, calibration, args.policy_file, on_change=metrics.policy_changed).watch()
    if given and args.policy_file and Path(args.policy_file).exists():
        print(f"pgkd: note: the policy file {args.policy_file} sets the threshold, not "
              f"{', '.join('--' + k.replace('_', '-') for k in given)}", flush=True)
    elif args.policy_file and not Path(args.policy_file).exists():    # a typo would otherwise go unseen
        print(f"pgkd: note: no policy file {args.policy_file} yet: the threshold is {source.threshold:.4f} "
              f"({source.described}) until it is written", flush=True)
    _show_logs()
    descriptions, examples = parts(tuple(calibration.labels))
    try:                  # the teacher need not be: until it answers, deferred texts keep the student's answer
        teacher().check()
    except Exception as e:  # noqa: BLE001 -- said, not fatal
        print(f"pgkd: note: the teacher cannot be reached now ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__}); "
              "deferred texts keep the student's answer until it answers", flush=True)
    publisher = None
    if args.publish_labels:
        settings = Settings.from_env()
        publisher = LabelPublisher(bootstrap_servers(settings.broker_url), settings.topic_prefix + LabeledSample.topic,
                                   capacity=args.label_buffer, metrics=metrics).start()
    cascade = Cascade(calibration.labels, teacher, source, timeout=args.teacher_timeout,
                      concurrency=args.teacher_concurrency, max_per_call=args.max_per_call,
                      descriptions=descriptions, examples=examples, sink=publisher, metrics=metrics)
    model = CascadeModel(cascade, lambda: StudentClient(args.student, args.student_model, timeout=args.student_timeout),
                         calibrations, metrics)
    server, _ = start_http_server(args.cascade_metrics_port, addr=args.host, registry=registry)
    try:
        serve(model, args.http_port, args.grpc_port, args.metrics_port, host=args.host, instances=args.instances,
              announce=f"threshold {source.threshold:.4f} ({source.described}); teacher {args.teacher}; cascade "
                       f"metrics on :{args.cascade_metrics_port}/metrics"
                       + (f"; teacher labels to {publisher.topic}" if publisher else ""))
    finally:
        source.close()
        cascade.close()
        server.shutdown()
        if publisher is not None:
            publisher.stop()
    return 0


def student_ready(args, check):
    """The student's calibration and its served model, both there before the cascade says it serves: else
    one line, exit 1 when the server cannot be reached (Compose and Kubernetes start the cascade again), exit 2
    for a calibration or a model name that is not there; with --wait-for-student, waited for (a server beside a
    deployer that has not written its first student yet)."""
    from pgkd.errors import EnvironmentFailure
    from pgkd.serving.cascade import ServedCalibration
    from pgkd.serving.client import StudentClient
    said = False
    while True:
        try:
            calibrations = ServedCalibration(args.calibration)
        except UserError as e:      # no version with a calibration yet, or none at all
            if not args.wait_for_student:
                raise
            said = _waiting(e, said)
            continue
        check(calibrations.current)
        try:
            with StudentClient(args.student, args.student_model, timeout=args.student_timeout) as probe:
                served = probe.served_labels()
        except EnvironmentFailure as e:   # the server is not there (yet): named by the option that gave it
            if not args.wait_for_student:
                raise type(e)(f"--student {e} (or --wait-for-student, to wait for it)") from None
            said = _waiting(e, said)
            continue
        except UserError as e:
            if not args.wait_for_student:
                raise
            said = _waiting(e, said)
            continue
        labels = calibrations.current.labels
        if served != labels:
            differ = (f"{len(labels)} labels, not the served {len(served)}" if len(served) != len(labels) else
                      next(f"label {i + 1} is {a!r}, the served student's {b!r}"
                           for i, (a, b) in enumerate(zip(labels, served)) if a != b))
            raise UserError(Option("calibration", args.calibration), f": the calibration of another student ({differ}; "
                            f"the student served at {args.student}, model {args.student_model})")
        return calibrations


def _show_logs() -> None:
    """The cascade's own log lines (a new threshold, a failing teacher, labels waiting) on stderr, one each."""
    logger = logging.getLogger("pgkd.cascade")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("pgkd: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _waiting(e: Exception, said: bool) -> bool:
    if not said:
        print(f"pgkd: waiting for the student ({e})", flush=True)
    time.sleep(2)
    return True


def teacher_factory(url: str, timeout: float, price_prompt: float, price_completion: float):
    """A teacher client per worker thread, all sharing one circuit breaker: after two failures in a row
    the teacher is not asked for 10 s, and deferred texts keep the student's answer at once."""
    from pgkd.teachers.llm import CircuitBreaker, LLMSettings, LLMTeacher
    from pgkd.teachers.transports import is_llm_teacher
    if not is_llm_teacher(url):
        raise UserError(Option("teacher", url), ": expected a teacher URL (triton://, triton+grpc://, openai://)")
    # The client's own timeout a second past the cascade's, so the cascade's deadline is the one that
    # answers (the call left behind ends by itself soon after).
    settings = LLMSettings(timeout=timeout + 1.0, retries=0, concurrency=1, breaker_cooldown=10.0, max_prompt_tokens=None,
                           temperature=0.0, price_prompt_per_1k=price_prompt, price_completion_per_1k=price_completion)
    LLMTeacher(url, settings)     # the URL checked now, in one line, not in a worker thread
    breaker = CircuitBreaker(settings.breaker_threshold, settings.breaker_cooldown)

    def make():
        teacher = LLMTeacher(url, settings)
        teacher.breaker = breaker
        return teacher
    return make


def register(sub, distill_arguments=None) -> None:
    cascade = sub.add_parser("cascade", help="the student answers what it is sure of, the LLM the rest")
    cascade_sub = cascade.add_subparsers(dest="cascade_command", required=True)
    s = cascade_sub.add_parser("serve", help="serve the cascade as a Triton model (KServe v2 over HTTP and gRPC)",
                               formatter_class=_WithDefaults)
    s.add_argument("--student", required=True, help="the served student: http://HOST:PORT or grpc://HOST:PORT")
    s.add_argument("--student-model", default="student", help="its model name (pgkd export --model-name)")
    s.add_argument("--student-timeout", type=float, default=10.0, help="seconds a call to the student may take")
    s.add_argument("--wait-for-student", action="store_true", help="wait until the student serves and its calibration "
                   "is in --calibration (a student server whose deployer has not written a first version yet), "
                   "instead of exiting")
    s.add_argument("--teacher", required=True, help="the LLM: triton://HOST:PORT/MODEL, triton+grpc://..., "
                   "openai://HOST:PORT/v1?model=NAME (docs/real-llms.md)")
    s.add_argument("--calibration", required=True, help="the served model's folder in its repository (models/student: "
                   "each version's own calibration, followed as versions are promoted), or one pgkd-calibration.json "
                   "or a folder holding one (best/): the labels and held scores")
    policy = s.add_mutually_exclusive_group()
    policy.add_argument("--threshold", type=float, help="the student answers a text when its confidence is at least "
                        "this (default: the threshold the run recorded)")
    policy.add_argument("--target-accuracy", type=float, help="the threshold whose answers hold this accuracy on "
                        "the held scores")
    policy.add_argument("--max-teacher-share", type=float, help="the threshold that sends at most this share of "
                        "texts to the LLM on the held scores")
    s.add_argument("--policy-file", help="a JSON file {\"threshold\": T} (or target_accuracy, max_teacher_share), "
                   "read again whenever it changes: the threshold moves without a new model version")
    s.add_argument("--taxonomy", help="a taxonomy file (pgkd distill --taxonomy): descriptions and examples for the "
                   "prompt")
    s.add_argument("--data", help="a dataset folder whose train split gives the prompt's labeled examples")
    s.add_argument("--examples-per-class", type=int, default=2, help="labeled examples per class in the prompt")
    s.add_argument("--seed", type=int, default=1, help="seeds the examples' draw")
    s.add_argument("--teacher-timeout", type=float, default=5.0, help="seconds the teacher has to answer a batch's "
                   "deferred texts; later, the student's answers stand")
    s.add_argument("--teacher-concurrency", type=int, default=4, help="teacher calls at once, at most")
    s.add_argument("--max-per-call", type=int, default=16, help="deferred texts in one classification prompt")
    s.add_argument("--instances", type=int, default=8, help="requests served at once (each waits for its own "
                   f"texts' teacher answers only), at most {MAX_INSTANCES}")
    s.add_argument("--price-prompt-per-1k", type=float, default=0.0, help="the LLM's price of 1,000 prompt tokens "
                   "(pgkd_cascade_teacher_cost_total)")
    s.add_argument("--price-completion-per-1k", type=float, default=0.0, help="and of 1,000 completion tokens")
    s.add_argument("--publish-labels", action="store_true", help="send each teacher label to the stream's input "
                   "topic (PGKD_BROKER_URL, PGKD_TOPIC_PREFIX)")
    s.add_argument("--label-buffer", type=int, default=10_000, help="teacher labels kept while the broker is away; "
                   "more are dropped and counted")
    s.add_argument("--host", type=host_option, default=DEFAULT_HOST, help="the address to listen on")
    s.add_argument("--http-port", type=port_option, default=8020, help="KServe v2 over HTTP")
    s.add_argument("--grpc-port", type=port_option, default=8021, help="KServe v2 over gRPC")
    s.add_argument("--metrics-port", type=port_option, default=8022, help="Triton's own metrics")
    s.add_argument("--cascade-metrics-port", type=port_option, default=8023, help="the cascade's metrics "
                   "(pgkd_cascade_*, docs/metrics.md)")
    s.set_defaults(func=serve_cascade)
