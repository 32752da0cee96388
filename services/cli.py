"""The commands that talk to the services: `pgkd service`, `pgkd submit`, `pgkd status`,
`pgkd topics create`, `pgkd send`, `pgkd stream status`. `register` adds them to the `pgkd` command
(an entry point in the group `pgkd.commands`: the engine's CLI does not import the services)."""
from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import signal
import sys
import time
from pathlib import Path

from pgkd.artifacts import ArtifactStore, DamagedRecord
from pgkd.loop.config import DistillConfig
from pgkd.options import from_options
from pgkd.loop.cycle import log
from pgkd.loop.report import summary_table
from pgkd.errors import Option, UserError, dotted, invalid
from pgkd.names import check_name
from pgkd.processes import Stopped
from pgkd.distributed.messages import TOPICS, LabeledSample, RunCompleted, RunRequested
from pgkd.loop.report import RunReport
from pgkd.distributed.runs import RunFiles
from pgkd.stream.segments import SegmentLog
from pgkd.stream.state import stream_key
from tqdm.auto import tqdm

from pgkd_services import ALL, build, kafka_security
from pgkd_services.runtime import (Settings, bootstrap_servers, broker_errors, broker_failure, connect_timeout,
                                   connected, make_broker, send)


def serve(name: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    service = build(name)
    service.run()   # CannotServe (a port taken, a codec missing) is an EnvironmentFailure: one line, exit 1
    return 0


async def _publish_request(settings: Settings, store: ArtifactStore, make_request, promote: bool) -> RunRequested:
    """Store the data and record the run, then publish it. The broker is reached first, so an unreachable
    one leaves nothing behind; a publish that fails after that marks the run as not submitted."""
    broker = make_broker(settings.broker_url)
    from pgkd.distributed.steps import record_request
    async with connected(broker, settings.broker_url):
        request = make_request(store).model_copy(update={"promote": promote})
        files = RunFiles(request.run_id)
        # Created only if absent: of two submits of one id at once, one records its run and the other is
        # refused here, before it publishes (its data, stored by content, may be the first's too).
        if not record_request(store, request, new=True):
            raise _id_in_use(store, request.run_id)
        try:
            await send(broker, request.model_dump_json().encode(), settings.topic_prefix + request.topic,
                       key=request.run_id)
        except broker_errors() as e:
            store.put_json(files.not_submitted, {"run_id": request.run_id, "broker": settings.broker_url,
                                                 "reason": f"{type(e).__name__}: {e}"})
            raise UserError(f"PGKD_BROKER_URL={settings.broker_url}: cannot publish run {request.run_id} "
                            f"({type(e).__name__}: {e}); it is recorded as not submitted") from None
    return request


def submit_run(config: DistillConfig, run_id: str | None, wait: bool, timeout: float | None, poll: float,
               promote: bool = False, start_timeout: float | None = None) -> int:
    from pgkd.distributed.steps import checked_request
    if run_id is not None:
        check_name(run_id, "--run-id")   # before the data is read: it becomes the run's folder
    settings = Settings.from_env()
    store = ArtifactStore(settings.artifacts)
    if run_id is not None and store.exists(RunFiles(run_id).request):
        raise _id_in_use(store, run_id)   # said before the data is read; _publish_request makes it sure
    make_request = checked_request(config, run_id)     # the data checked; nothing stored until the broker answers
    store.check_owned()                                # a store of someone else's is refused before that too
    request = asyncio.run(_publish_request(settings, store, make_request, promote))
    print(f"submitted run {request.run_id} (artifacts {store.uri(RunFiles(request.run_id).base)})")
    if not wait:
        return 0
    try:
        completed = wait_for(store, request.run_id, timeout, poll,
                             START_TIMEOUT if start_timeout is None else start_timeout)
    except (KeyboardInterrupt, Stopped) as e:    # the wait ends; the run, submitted, goes on
        print(f"pgkd: stopped waiting; run {request.run_id} goes on (`pgkd status {request.run_id}`)", file=sys.stderr)
        return 128 + (e.signum if isinstance(e, Stopped) else signal.SIGINT)
    return _print_completion(store, completed)


def _id_in_use(store: ArtifactStore, run_id: str) -> UserError:
    # services read a run's options from its request: a second one would change a run under way
    return UserError(Option("run_id", run_id), f": a run of this id is already in {store.url} "
                     f"(`pgkd status {run_id}`); choose another")


POLL = 0.25            # seconds between two looks of `pgkd submit --wait` at the run's states
START_TIMEOUT = 60.0   # seconds `pgkd submit --wait` gives the services to take a run (--start-timeout)


def wait_for(store: ArtifactStore, run_id: str, timeout: float | None, poll: float = POLL,
             start_timeout: float | None = START_TIMEOUT) -> RunCompleted:
    """Follow the run's cycles as the evaluator records them, until its RunCompleted is stored. A run no
    trainer has taken within `start_timeout` seconds (no service running: the wait would never end) is a
    TimeoutError, one line and exit 1; a run that was taken is waited for as long as it takes (or
    `timeout` seconds). Either way the run stays submitted."""
    files = RunFiles(run_id)
    started = time.monotonic()
    deadline = started + timeout if timeout else None
    shown, taken, looked = 0, False, {}
    while True:
        shown = _show_cycles(store, run_id, shown, looked=looked)
        if store.exists(files.completed):
            _show_cycles(store, run_id, shown, looked=looked)
            return _completion(store, run_id)
        taken = taken or _taken(store, files)
        waited = time.monotonic() - started
        if not taken and start_timeout and waited > start_timeout:
            raise TimeoutError(f"run {run_id}: no trainer has taken it in {start_timeout:g} s: are the services "
                               f"running? It stays submitted, for a trainer to take (`pgkd status {run_id}`)")
        if deadline and time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id}: not completed after {timeout:.0f} s"
                               f"{'' if taken else ' (no trainer has taken it yet: are the services running?)'}; "
                               f"follow it with `pgkd status {run_id}`")
        time.sleep(poll)


def _taken(store: ArtifactStore, files: RunFiles) -> bool:
    """A service has taken the run: something besides its request is recorded in its folder (the
    trainer marks a message taken as it receives it, under handled/)."""
    return any(key not in (files.request, files.not_submitted) for key in store.list(files.base))


def _run_config(store: ArtifactStore, files: RunFiles) -> DistillConfig:
    """The run's options, from its request; a request whose config is not one is damaged (named), not
    a KeyError or missing command-line options."""
    from pydantic import ValidationError
    try:
        return DistillConfig.model_validate(store.get_model(files.request, RunRequested).config)
    except ValidationError as e:
        raise DamagedRecord(store.uri(files.request), f"not a RunRequested: {invalid(e, dotted(prefix='config.'))}") \
            from None


def _show_cycles(store: ArtifactStore, run_id: str, shown: int, write=None, looked: dict | None = None) -> int:
    """Print the cycles the run's state records after the first `shown` ones (to stderr by default,
    as progress), as the run printed them: the line is the state's (RunState.cycle_line). With
    `looked` (a wait's), the state is read only when a phase has saved a new one since the last look."""
    from pgkd.distributed.steps import latest_state
    keys = store.list(RunFiles(run_id).states)
    if not keys or (looked is not None and looked.get("states") == len(keys)):
        return shown
    if looked is not None:
        looked["states"] = len(keys)
    state = latest_state(store, run_id)
    for cycle in range(shown, len(state.cycles)):
        (write or log)(state.cycle_line(cycle))
    return max(shown, len(state.cycles))


def _completion(store: ArtifactStore, run_id: str) -> RunCompleted:
    """The run's stored completion; one of another run (a file copied in) is a damaged record, named."""
    key = RunFiles(run_id).completed
    completed = store.get_model(key, RunCompleted)
    if completed.run_id != run_id:
        raise DamagedRecord(store.uri(key), f"the completion of run {completed.run_id}, not of run {run_id}")
    return completed


def _print_completion(store: ArtifactStore, completed: RunCompleted) -> int:
    if completed.status == "failed":
        print(f"run {completed.run_id} failed: {completed.reason}", file=sys.stderr)
        return 1
    report = store.get_model(completed.report, RunReport)
    print(summary_table(report))
    print(f"stopped: {completed.reason}")
    print(f"report: {store.location(completed.report)}")
    print(f"best student (cycle {completed.best_cycle}): {store.location(completed.best_checkpoint)}")
    return 0


def status(run_id: str) -> int:
    store = ArtifactStore(Settings.from_env().artifacts)
    files = RunFiles(run_id)
    if not store.exists(files.request):
        raise UserError(f"run {run_id}: not found in {store.url}")
    if store.exists(files.not_submitted):
        record = store.get_json(files.not_submitted)
        reason = record.get("reason") if isinstance(record, dict) else None
        if not isinstance(reason, str):
            raise DamagedRecord(store.uri(files.not_submitted), 'not a record of a failed publish: no "reason"')
        print(f"run {run_id}: not submitted (publishing it failed: {reason})", file=sys.stderr)
        return 1
    config = _run_config(store, files)
    print(f"run {run_id}: {config.data}, student {config.student}, teacher {config.teacher}, seed {config.seed}")
    if not store.exists(files.completed) and not _taken(store, files):
        print("submitted; waiting for a trainer to take it (none has yet: are the services running?)")
        return 0
    if not _show_cycles(store, run_id, 0, write=print):
        print("no cycle evaluated yet")
    if store.exists(files.completed):
        return _print_completion(store, _completion(store, run_id))
    print("running")
    return 0


def create_topics(partitions: int, replication_factor: int) -> int:
    """Every topic, through kafka-python's admin client; idempotent: what exists is left as it is."""
    settings = Settings.from_env()
    topics = [settings.topic_prefix + t for t in TOPICS]
    created = create_kafka_topics(bootstrap_servers(settings.broker_url), topics, partitions, replication_factor)
    print(f"kafka: created {len(created)} topic(s){': ' + ', '.join(created) if created else ''}; "
          f"{len(topics) - len(created)} existed")
    return 0


def create_kafka_topics(bootstrap: list[str], topics: list[str], partitions: int, replication_factor: int,
                        admin=None) -> list[str]:
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError
    try:
        admin = admin or KafkaAdminClient(bootstrap_servers=bootstrap, client_id="pgkd-topics",
                                          bootstrap_timeout_ms=int(connect_timeout() * 1000),
                                          **kafka_security.current().kafka_python())
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
        raise broker_failure(f"kafka {','.join(bootstrap)}: cannot create topics ({_kafka_reason(e)})",
                             bootstrap) from None


def _kafka_reason(e: Exception) -> str:
    """kafka-python's errors already start with their class name; say it once."""
    text = str(e)
    return text if text.startswith(type(e).__name__) else f"{type(e).__name__}: {text}"


# -- the stream of labeled samples ---------------------------------------------------------------------------

# The largest row `pgkd send` sends: kafka-python's producer refuses a record over its max_request_size
# (1 MiB), a Kafka broker one over its message.max.bytes (about 1 MB), both by default.
MAX_MESSAGE_BYTES = 1_000_000


def _json_body(row: dict) -> bytes:
    text = json.dumps(row, ensure_ascii=False)
    try:
        return text.encode()
    except UnicodeEncodeError:    # a lone surrogate (a "\udce9" escape in the file): kept escaped, as it came
        return json.dumps(row).encode()


def read_sample_messages(path: Path, text_column: str, label_column: str, source: str | None) -> list[bytes]:
    """One message per row of a JSON Lines or CSV file. A JSON line goes as it is (its columns renamed
    to text and label if need be), even when it is not a sample: the ingest service is the one that
    validates, and rejects with a reason, so what it rejects is seen where everything else is. A row
    too large for a Kafka message is refused here, naming its line, before anything is sent."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    rename = lambda row: {("text" if k == text_column else "label" if k == label_column else k): v  # noqa: E731
                          for k, v in row.items()}
    with_source = lambda row: {**row, "source": source} if source and "source" not in row else row  # noqa: E731
    bodies: list[bytes] = []

    def add(body: bytes, line: int) -> None:
        if len(body) > MAX_MESSAGE_BYTES:
            raise UserError(f"{path}:{line}: a row of {len(body):,} bytes, more than a Kafka message takes "
                            f"({MAX_MESSAGE_BYTES:,}); nothing was sent")
        bodies.append(body)
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:   # -sig: a byte-order mark (Excel) is not text
            if path.suffix.lower() == ".csv":
                reader = csv.DictReader(f)
                missing = {text_column, label_column} - set(reader.fieldnames or [])
                if missing:
                    raise UserError(f"{path}:1: missing column(s) {', '.join(sorted(missing))} "
                                    f"(columns: {', '.join(reader.fieldnames or [])})")
                for row in reader:
                    row = {k: v for k, v in row.items() if k is not None and v not in (None, "")
                           or k in (text_column, label_column)}
                    add(_json_body(with_source(rename(row))), reader.line_num)
            else:
                for number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except ValueError:
                        row = None
                    if isinstance(row, dict) and (source or (text_column, label_column) != ("text", "label")):
                        add(_json_body(with_source(rename(row))), number)
                    else:
                        add(line.rstrip("\r\n").encode(), number)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise UserError(f"{path}: unreadable CSV ({e})") from None
    return bodies


def send_samples(path: str, text_column: str = "text", label_column: str = "label", source: str | None = None,
                 progress: bool = True, producer=None) -> int:
    """`pgkd send FILE`: each row to the labeled-samples topic, with kafka-python's producer."""
    settings = Settings.from_env()
    bodies = read_sample_messages(Path(path), text_column, label_column, source)
    topic = settings.topic_prefix + LabeledSample.topic
    bar = tqdm(total=len(bodies), desc=f"send {Path(path).name}", unit="sample", disable=not progress)
    _send_kafka(bootstrap_servers(settings.broker_url), topic, bodies, bar, producer)
    bar.close()
    print(f"sent {len(bodies)} sample(s) from {path} to {topic} ({settings.broker_url}); "
          "the ingest service validates them: rejected ones go to the dead-letter topic with the reason")
    return 0


def _send_kafka(bootstrap: list[str], topic: str, bodies: list[bytes], bar, producer=None) -> None:
    from kafka import KafkaProducer
    from kafka.errors import KafkaError
    futures, failure = [], None
    try:
        producer = producer or KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20,
                                             client_id="pgkd-send", bootstrap_timeout_ms=int(connect_timeout() * 1000),
                                             **kafka_security.current().kafka_python())
        for body in bodies:
            futures.append(producer.send(topic, value=body))
            bar.update(1)
        producer.flush()
        for future in futures:
            future.get(timeout=60)   # raises what the broker answered, for the first sample it refused
    except KafkaError as e:
        failure = e
    finally:
        if producer is not None:
            producer.close()         # sends what was queued
    if failure is not None:          # and say how many went out before it
        sent = sum(1 for f in futures if getattr(f, "is_done", False) and f.succeeded())
        raise broker_failure(f"kafka {','.join(bootstrap)}: cannot send to {topic} ({_kafka_reason(failure)}); "
                             f"{sent} of {len(bodies)} sample(s) sent", bootstrap)


def stream_status(name: str) -> int:
    """What a stream holds, its current student, its runs and their decisions, its last drift check."""
    from pgkd.stream import StreamState
    store = ArtifactStore(Settings.from_env().artifacts)
    key = f"{stream_key(name)}/state.json"
    if not store.exists(key):
        raise UserError(f"stream {name}: not found in {store.url}")
    state = store.get_model(key, StreamState)
    log = SegmentLog(store, f"{stream_key(name)}/segments")
    manifest = log.load_manifest()
    since = log.last_seq - (state.runs[-1].samples_through if state.runs else 0)
    teacher = log.teacher_count
    print(f"stream {name}: base run {state.base_run}, {len(state.labels)} labels, {log.count} samples stored "
          f"in {len(manifest.segments)} segment(s), {since} since the last run: {log.count - teacher} human labels "
          f"({log.split_count('train') - teacher} train, {log.split_count('validation')} validation), "
          f"{teacher} teacher labels (train only)")
    for repair in manifest.repairs:
        print(f"repaired: segment {repair.segment} ({repair.reason}): {repair.kept} samples kept, {repair.lost} lost")
    for segment, reason in log.damaged():
        print(f"DAMAGED: segment {segment.name}: {reason} (pgkd stream repair {name})")
    current = state.current
    reference = "not yet" if not current or current.drift_reference is None else f"{current.drift_reference:.4f}"
    print(f"current student: run {current.run_id}, validation accuracy {current.validation_accuracy:.4f}, "
          f"score {current.validation_score:.4f}, drift reference {reference}: "
          f"{store.location(current.checkpoint)}" if current
          else "current student: none yet (the base run has not completed)")
    for run in state.runs:
        outcome = (("replaced the current student" if run.decision.replaced else "kept the current student")
                   + f" (by {_criterion(run.decision)}): {run.decision.reason}") if run.decision else "running"
        teacher = f"{run.teacher_labels} teacher labels" + (f", {run.teacher_labels_left_out} left out"
                                                             if run.teacher_labels_left_out else "")
        print(f"run {run.run_id} ({run.trigger}; train {run.train_size} ({teacher}), validation "
              f"{run.validation_size}): {outcome}")
    if state.drift_checks:
        check = state.drift_checks[-1]
        reference = f"{'a reference window, floor' if check.role == 'reference' else 'reference'} {check.reference:.4f}"
        print(f"last drift check: accuracy {check.accuracy:.4f} on {check.window} human labels, samples "
              f"{check.first or check.through - check.window + 1}-{check.through}, {reference}"
              f"{' (drift)' if check.drifted else ''}")
    if state.pending_trigger:
        print(f"waiting to start: {state.pending_trigger}")
    return 0


def _criterion(decision) -> str:
    """What a promotion decided on: the cascade at its target, or the metric."""
    return f"the cascade at its {decision.cascade_target}" if decision.criterion == "cascade" else \
        f"validation {decision.metric}"


def stream_repair(name: str) -> int:
    """`pgkd stream repair NAME` (with ingest stopped): each damaged segment keeps its complete
    samples; the loss is recorded in the manifest and printed."""
    store = ArtifactStore(Settings.from_env().artifacts)
    if not store.exists(f"{stream_key(name)}/state.json"):
        raise UserError(f"stream {name}: not found in {store.url}")
    repairs = SegmentLog(store, f"{stream_key(name)}/segments").repair()
    for r in repairs:
        print(f"segment {r.segment} ({r.reason}): {r.kept} samples kept, {r.lost} lost; sent again, they are new")
    print(f"stream {name}: {len(repairs)} segment(s) repaired" if repairs else f"stream {name}: no damaged segment")
    return 0




# -- the command line ---------------------------------------------------------------------------------------

def _named_stream(name: str | None) -> str:
    """The stream a command names (an empty name is refused, not taken for the default), else PGKD_STREAM's."""
    return _stream_name() if name is None else check_name(name, "stream")


def _stream_name() -> str:
    from pgkd.settings import StreamVariables, one
    return one(StreamVariables, "stream")


def register(sub, distill_arguments) -> None:
    """Add the bus commands to `pgkd`'s subcommands; `distill_arguments` adds a run's options."""
    from pgkd.cli import Parser
    submit = sub.add_parser("submit", help="submit a run to the services (PGKD_BROKER_URL, PGKD_ARTIFACTS)")
    distill_arguments(submit, with_out=False, with_dry_run=True)
    submit.add_argument("--run-id", default=None, help="default: DATASET-DATE-TIME-RANDOM")
    submit.add_argument("--wait", action="store_true", help="follow the run until RunCompleted; print its report")
    submit.add_argument("--timeout", type=float, default=None, help="with --wait: give up after this many seconds")
    submit.add_argument("--start-timeout", type=float, default=START_TIMEOUT,
                        help="with --wait: give up when no trainer has taken the run within this many seconds "
                             f"(no service running; default {START_TIMEOUT:g}; 0: wait without this limit)")
    submit.add_argument("--poll", type=float, default=POLL, help=argparse.SUPPRESS)
    submit.add_argument("--promote", action="store_true",
                        help="once completed, serve its best student: StudentPromoted for the deployers")
    submit.set_defaults(func=_submit)
    status_parser = sub.add_parser("status", help="a submitted run's cycles so far, and its outcome")
    status_parser.add_argument("run_id")
    status_parser.set_defaults(func=lambda args: status(args.run_id))
    service = sub.add_parser("service", help="run one service: " + " | ".join(ALL))
    service.add_argument("name", choices=list(ALL))
    service.set_defaults(func=lambda args: serve(args.name))
    send_parser = sub.add_parser("send", help="stream a JSON Lines or CSV file of labeled samples to the ingest "
                                              "service")
    send_parser.add_argument("file", help="rows with text and label (and optional source, id)")
    send_parser.add_argument("--text-column", default="text")
    send_parser.add_argument("--label-column", default="label")
    send_parser.add_argument("--source", default=None, help="who labeled them, for rows that do not say")
    send_parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    send_parser.set_defaults(func=lambda args: send_samples(args.file, args.text_column, args.label_column,
                                                            args.source, progress=args.progress))
    stream = sub.add_parser("stream", help="the streams of labeled samples that keep the student current")
    stream_sub = stream.add_subparsers(dest="stream_command", required=True, parser_class=Parser)
    stream_status_parser = stream_sub.add_parser("status", help="a stream's samples, current student, runs and "
                                                                "decisions")
    stream_status_parser.add_argument("name", nargs="?", help="the stream (default: PGKD_STREAM, else default)")
    stream_status_parser.set_defaults(func=lambda args: stream_status(_named_stream(args.name)))
    repair = stream_sub.add_parser("repair", help="keep the complete samples of damaged segments (ingest stopped)")
    repair.add_argument("name", nargs="?", help="the stream (default: PGKD_STREAM, else default)")
    repair.set_defaults(func=lambda args: stream_repair(_named_stream(args.name)))
    topics = sub.add_parser("topics", help="create the message topics")
    topics_sub = topics.add_subparsers(dest="topics", required=True, parser_class=Parser)
    create = topics_sub.add_parser("create", help="idempotent: existing topics are left as they are")
    create.add_argument("--partitions", type=int, default=3)
    create.add_argument("--replication-factor", type=int, default=1)
    create.set_defaults(func=lambda args: create_topics(args.partitions, args.replication_factor))


def _submit(args) -> int:
    if not args.start_timeout >= 0:   # nan too
        raise UserError(f"--start-timeout {args.start_timeout:g}: expected seconds, 0 or more (0: no limit)")
    if args.timeout is not None and not args.timeout > 0:
        raise UserError(f"--timeout {args.timeout:g}: expected seconds, more than 0")
    config = from_options(DistillConfig, args)   # the run's options (distill_arguments), validated
    if args.dry_run:                             # nothing stored, nothing published
        from pgkd.cli import dry_run
        if args.run_id is not None:
            check_name(args.run_id, "--run-id")   # as the real submit would
        return dry_run(config, args.prompt_file)
    if args.prompt_file is not None:
        raise UserError("--prompt-file is for --dry-run only")
    return submit_run(config, args.run_id, args.wait, args.timeout, args.poll, promote=args.promote,
                      start_timeout=args.start_timeout)
