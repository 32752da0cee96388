"""`pgkd topics create`, `pgkd submit`, `pgkd status`, `pgkd send` and `pgkd service ingest` where they
meet the outside world."""
import json
import subprocess
import sys

import pytest
from conftest import make_toy_dataset
from service_processes import ServiceProcesses


def pgkd(*args, env):
    return subprocess.run([sys.executable, "-m", "pgkd.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def bus(kafka_url, tmp_path):
    """The real broker (Tansu), its topics created; `.bodies(topic)` reads what was published."""
    processes = ServiceProcesses(kafka_url, tmp_path)
    created = processes.pgkd("topics", "create")
    assert created.returncode == 0, created.stderr
    return processes


@pytest.fixture
def env(bus):
    return bus.env


def test_submit_checks_its_input_before_publishing_anything(env, tmp_path, bus):
    bad = pgkd("submit", "--data", str(tmp_path / "missing"), env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no such file" in bad.stderr
    data = make_toy_dataset(tmp_path / "toy")
    too_many = pgkd("submit", "--data", str(data), "--labeled", "100000", env=env)
    assert too_many.returncode == 2 and "--labeled 100000" in too_many.stderr
    wrong_bus = pgkd("submit", "--data", str(data), "--labeled", "40", env={**env, "PGKD_BROKER_URL": "redis://x:6379"})
    assert wrong_bus.returncode == 2 and wrong_bus.stderr.count("\n") == 1, wrong_bus.stderr
    assert "PGKD_BROKER_URL='redis://x:6379': expected kafka://host:port" in wrong_bus.stderr
    assert bus.bodies("run-requested") == []     # nothing was published


@pytest.mark.parametrize("url", ["amqp://x", "redis://127.0.0.1:6379", "kafka://", "kafka://host:port", "kafka://:9092"])
def test_a_broker_url_that_is_not_kafka_host_port_is_one_line(url):
    from pgkd.errors import UserError

    from pgkd_services.runtime import bootstrap_servers
    with pytest.raises(UserError, match=f"PGKD_BROKER_URL={url}"):
        bootstrap_servers(url)
    assert bootstrap_servers("kafka://a:9092, b:9093") == ["a:9092", "b:9093"]


def test_submit_without_wait_publishes_one_request_and_status_follows_it(env, tmp_path, bus):
    data = make_toy_dataset(tmp_path / "toy")
    result = pgkd("submit", "--data", str(data), "--labeled", "40", "--run-id", "queued", env=env)
    assert result.returncode == 0 and "submitted run queued" in result.stdout
    (request,) = bus.bodies("run-requested")
    assert json.loads(request)["run_id"] == "queued"
    status = pgkd("status", "queued", env=env)
    assert status.returncode == 0 and "waiting for a trainer" in status.stdout \
        and "running" not in status.stdout.splitlines()
    missing = pgkd("status", "nope", env=env)
    assert missing.returncode == 2 and "run nope: not found" in missing.stderr
    request = (tmp_path / "artifacts" / "runs" / "queued" / "request.json").read_bytes()
    again = pgkd("submit", "--data", str(data), "--labeled", "30", "--run-id", "queued", env=env)   # a reviewer's
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [    # resubmit corrupted the run under way
        f"pgkd: error: --run-id queued: a run of this id is already in file://{tmp_path / 'artifacts'} "
        "(`pgkd status queued`); choose another"], again.stderr
    assert len(bus.bodies("run-requested")) == 1
    assert (tmp_path / "artifacts" / "runs" / "queued" / "request.json").read_bytes() == request
    waited = pgkd("submit", "--data", str(data), "--labeled", "40", "--wait", "--timeout", "1", env=env)
    assert waited.returncode == 1 and "not completed after 1 s" in waited.stderr


def test_ctrl_c_on_submit_wait_stops_the_wait_and_says_the_run_goes_on(env, tmp_path, bus, monkeypatch):
    """It said "interrupted; nothing was written to the output folder": submit has none, and the run stays."""
    import signal
    import time
    from process_tools import Pgkd
    data = make_toy_dataset(tmp_path / "toy")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    waiting = Pgkd(tmp_path, "submit", "--data", str(data), "--labeled", "40", "--run-id", "waited", "--wait")
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "artifacts" / "runs" / "waited" / "request.json").exists():   # submitted: now waiting
            assert waiting.process.poll() is None and time.monotonic() < deadline, waiting.log()
            time.sleep(0.1)
        time.sleep(1)
        assert waiting.stop(signal.SIGINT, timeout=30) == 130, waiting.log()
        lines = waiting.log().strip().splitlines()
        assert "submitted run waited" in waiting.log() and \
            lines[-1] == "pgkd: stopped waiting; run waited goes on (`pgkd status waited`)", lines
        assert len(bus.bodies("run-requested")) == 1
    finally:
        waiting.kill()


def test_submit_dry_run_spends_nothing_and_a_taxonomy_travels_with_the_run(env, tmp_path, bus):
    from pgkd.distributed.steps import run_context
    data = make_toy_dataset(tmp_path / "toy")
    taxonomy = tmp_path / "classes.json"
    taxonomy.write_text(json.dumps([{"label": c, "description": f"about {c}"} for c in
                                    ("card_lost", "refund", "transfer", "pin_change", "card_fraud")]))
    args = ["submit", "--data", str(data), "--labeled", "40", "--taxonomy", str(taxonomy),
            "--teacher", "openai://127.0.0.1:9/v1?model=m"]
    dry = pgkd(*args, "--dry-run", env=env)
    assert dry.returncode == 0 and "- card_fraud: about card_fraud" in dry.stdout and "teacher calls at most" in dry.stdout
    stored = tmp_path / "artifacts"
    assert bus.bodies("run-requested") == [] and not (stored.exists() and any(stored.rglob("*.json")))   # nothing kept
    submitted = pgkd(*args, "--run-id", "described", env=env)
    assert submitted.returncode == 0, submitted.stderr
    context = run_context(bus.store, "described")       # as a service rebuilds the run: the file's classes with it
    assert context.splits.taxonomy.descriptions["card_fraud"] == "about card_fraud"
    assert "card_fraud" in context.labels


def test_send_reads_json_lines_and_csv_and_publishes_every_row(env, tmp_path, bus):
    lines = tmp_path / "corrections.jsonl"
    lines.write_text('{"text": "lost my card", "label": "card_lost", "id": "t1"}\n\nnot json\n')
    sent = pgkd("send", str(lines), "--no-progress", env=env)
    assert sent.returncode == 0 and "sent 2 sample(s)" in sent.stdout, sent.stderr
    assert sorted(bus.bodies("labeled-samples")) == sorted([
        b'{"text": "lost my card", "label": "card_lost", "id": "t1"}', b"not json"])   # ingest rejects it

    table = tmp_path / "tickets.csv"
    # Saved by Excel as "CSV UTF-8": a byte-order mark before the header.
    table.write_bytes("body,intent,agent\n\"refund, please\",refund,ann\nempty one,,\n".encode("utf-8-sig"))
    sent = pgkd("send", str(table), "--text-column", "body", "--label-column", "intent", "--source", "support",
                "--no-progress", env=env)
    assert sent.returncode == 0, sent.stderr
    rows = [json.loads(b) for b in bus.bodies("labeled-samples") if b != b"not json"]
    assert sorted(rows, key=str) == sorted([
        {"text": "lost my card", "label": "card_lost", "id": "t1"},
        {"text": "refund, please", "label": "refund", "agent": "ann", "source": "support"},
        {"text": "empty one", "label": "", "source": "support"}], key=str)
    missing_column = pgkd("send", str(table), "--no-progress", env=env)
    assert missing_column.returncode == 2 and "missing column" in missing_column.stderr


def test_send_with_progress_and_the_bad_inputs_of_send_and_ingest(env, tmp_path, bus):
    rows = tmp_path / "samples.jsonl"
    rows.write_text("".join(f'{{"text": "sample {i}", "label": "refund"}}\n' for i in range(25)))
    sent = pgkd("send", str(rows), env=env)
    assert sent.returncode == 0 and "sent 25 sample(s)" in sent.stdout and "25/25" in sent.stderr
    assert len(bus.bodies("labeled-samples")) == 25

    missing = pgkd("send", str(tmp_path / "nope.jsonl"), env=env)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "no such file" in missing.stderr
    no_base = pgkd("service", "ingest", env=env)
    assert no_base.returncode == 2 and no_base.stderr.count("\n") == 1
    assert "set PGKD_STREAM_BASE_RUN" in no_base.stderr
    bad_setting = pgkd("service", "ingest", env={**env, "PGKD_STREAM_TRIGGER_COUNT": "-3"})
    assert bad_setting.returncode == 2 and "PGKD_STREAM_TRIGGER_COUNT='-3'" in bad_setting.stderr
    status = pgkd("stream", "status", "nope", env=env)
    assert status.returncode == 2 and "stream nope: not found" in status.stderr


def test_an_unreachable_broker_is_one_line_and_leaves_no_run_behind(tmp_path):
    """Nothing listens on the port: submit, send and topics create each say so in one line, exit 1 (the
    environment's failure, not the input's),
    close their clients, and submit records no run that `status` would then call running."""
    import os

    from pgkd.net import free_port
    data = make_toy_dataset(tmp_path / "toy")
    env = {**os.environ, "PGKD_BROKER_URL": f"kafka://127.0.0.1:{free_port()}",
           "PGKD_ARTIFACTS": f"file://{tmp_path}/artifacts", "PGKD_CONNECT_TIMEOUT": "2"}
    (tmp_path / "s.jsonl").write_text('{"text": "lost my card", "label": "card_lost"}\n')
    for args in (["submit", "--data", str(data), "--labeled", "40", "--student", "tiny", "--run-id", "never"],
                 ["send", str(tmp_path / "s.jsonl"), "--no-progress"], ["topics", "create"]):
        result = pgkd(*args, env=env)
        assert result.returncode == 1, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
        assert "127.0.0.1" in result.stderr and ("cannot reach" in result.stderr or "bootstrap" in result.stderr)
    status = pgkd("status", "never", env=env)
    assert status.returncode == 2 and "run never: not found" in status.stderr
    assert not list((tmp_path / "artifacts").rglob("*.json"))      # not even the dataset was stored
    bad = pgkd("topics", "create", env={**env, "PGKD_CONNECT_TIMEOUT": "soon"})
    assert bad.returncode == 2 and bad.stderr.strip() == \
        "pgkd: error: PGKD_CONNECT_TIMEOUT='soon': expected a number of seconds above 0"


def test_a_publish_that_fails_after_the_run_was_recorded_marks_it_not_submitted(tmp_path, kafka_url, monkeypatch,
                                                                                capsys):
    """The broker answered, then the publish failed: the run is recorded as not submitted, and
    `status` says so instead of `running` forever."""
    import pgkd_services.cli
    from pgkd.cli import main
    data = make_toy_dataset(tmp_path / "toy")
    monkeypatch.setenv("PGKD_BROKER_URL", kafka_url)
    monkeypatch.setenv("PGKD_ARTIFACTS", f"file://{tmp_path}/artifacts")

    async def broken_send(*args, **kwargs):
        raise ConnectionError("connection reset by peer")
    monkeypatch.setattr(pgkd_services.cli, "send", broken_send)
    assert main(["submit", "--data", str(data), "--labeled", "40", "--student", "tiny", "--run-id", "lost"]) == 2
    err = capsys.readouterr().err
    assert "cannot publish run lost" in err and "recorded as not submitted" in err
    assert main(["status", "lost"]) == 1
    captured = capsys.readouterr()
    assert "run lost: not submitted" in captured.err and "running" not in captured.out
