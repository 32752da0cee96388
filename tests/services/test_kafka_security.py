"""TLS and SASL for every Kafka client (pgkd_services.kafka_security), against the real broker where
it can show something, as configuration where it cannot.

Tansu 0.6 (the test broker) serves no TLS itself (`--cert` with `--key` is refused, `--cert` alone
still serves plaintext) and, with in-memory storage, cannot hold a SASL user for an authenticating
broker (`tansu user create` needs an authenticated connection once `--authentication` is on, and
without it the broker refuses every SASL handshake). So:
- TLS, with client certificates, is real: a TLS terminator of our own sits in front of Tansu (whose
  advertised listener is the terminator), and `pgkd topics create`, `pgkd send` and `pgkd submit`
  go through it with the CA, certificate and key of a throwaway PKI made with openssl;
- SASL goes as far as Tansu lets it: against `tansu broker --authentication` each command runs the
  SCRAM exchange and is refused (no such user): one line, exit code 2, the password nowhere;
- what each client library is given is checked as configuration, for every protocol.
"""
import asyncio
import logging
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from faststream.kafka.security import parse_security
from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512
from pgkd import processes
from pgkd.distributed.messages import TOPICS
from pgkd.errors import EnvironmentFailure, UserError
from pgkd.net import free_port
from pgkd_services import kafka_security
from pgkd_services.kafka_security import KafkaSecurity

PASSWORD = "s3cret-Passw0rd-do-not-print"
SMALL_RUN = ("--labeled", "100", "--student", "tiny")


def pgkd(*args, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pgkd.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def base_env(tmp_path: Path, broker_url: str, **security: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGKD_")}
    return {**env, "HF_HUB_OFFLINE": "1", "PGKD_BROKER_URL": broker_url,
            "PGKD_ARTIFACTS": f"file://{tmp_path}/artifacts",
            **{f"PGKD_KAFKA_{k.upper()}": v for k, v in security.items()}}


def assert_one_line_error(result: subprocess.CompletedProcess, *expected: str) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pgkd: error: "), result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


# -- a throwaway PKI ------------------------------------------------------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _issue(folder: Path, name: str, ca: str, cn: str, extensions: str) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=folder)
    (folder / f"{name}.ext").write_text(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=folder)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca.crt; server.crt/key for 127.0.0.1 and localhost; client.crt/key (CN pgkd-test-client);
    other-ca.crt, a CA that signed nothing here."""
    folder = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
                 f"{ca}.key", "-out", f"{ca}.crt", "-days", "2", "-subj", f"/CN=pgkd test {ca}", cwd=folder)
    _issue(folder, "server", "ca", "127.0.0.1", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                                "extendedKeyUsage=serverAuth\n")
    _issue(folder, "client", "ca", "pgkd-test-client", "extendedKeyUsage=clientAuth\n")
    return folder


# -- the broker, behind TLS -----------------------------------------------------------------------------------
def start_tansu(tmp_path: Path, listen: int, advertise: int, *options: str) -> subprocess.Popen:
    from pgkd_services.local import tansu_binary
    binary = tansu_binary()
    log = (tmp_path / f"tansu-{listen}.log").open("w")
    process = processes.spawn([str(binary), "broker", "--listener-url", f"tcp://127.0.0.1:{listen}",
                               "--advertised-listener-url", f"tcp://127.0.0.1:{advertise}", *options], log=log)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", listen), timeout=0.2).close()
            return process
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(0.05)
    processes.stop(process, timeout=0)
    pytest.fail(f"tansu did not start:\n{(tmp_path / f'tansu-{listen}.log').read_text()[-2000:]}")


class TlsFront:
    """A TLS terminator for Tansu, which serves no TLS itself: it requires a client certificate signed
    by the test CA and forwards the decrypted bytes to the broker. It records the client certificate's
    CN of every connection it let through, so a test can see that all traffic came over TLS."""

    def __init__(self, pki: Path, target_port: int):
        self.port, self.target_port, self.clients = free_port(), target_port, []
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.crt"))
        self.context.load_cert_chain(pki / "server.crt", pki / "server.key")
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.set_exception_handler(lambda loop, context: None)   # refused handshakes are the tests' point
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._forward, "127.0.0.1", self.port, ssl=self.context))
        ready.set()
        self.loop.run_forever()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        subject = dict(item for rdn in writer.get_extra_info("peercert")["subject"] for item in rdn)
        self.clients.append(subject["commonName"])
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                sink.close()
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def tls_broker(tmp_path, pki):
    """`kafka://127.0.0.1:PORT` of Tansu behind a TLS terminator that requires client certificates."""
    broker_port = free_port()
    front = TlsFront(pki, broker_port)
    tansu = start_tansu(tmp_path, broker_port, front.port)
    yield f"kafka://127.0.0.1:{front.port}", front
    processes.stop(tansu, timeout=10)
    front.stop()


def tls_settings(pki: Path, ca: str = "ca", client_cert: bool = True) -> dict:
    settings = {"security_protocol": "SSL", "ca_file": str(pki / f"{ca}.crt")}
    if client_cert:
        settings.update(cert_file=str(pki / "client.crt"), key_file=str(pki / "client.key"))
    return settings


def read_topic(url: str, topic: str, security: KafkaSecurity, expected: int) -> list[bytes]:
    from kafka import KafkaConsumer
    consumer = KafkaConsumer(topic, bootstrap_servers=[url.partition("://")[2]], auto_offset_reset="earliest",
                             consumer_timeout_ms=3000, **security.kafka_python())
    values: list[bytes] = []
    try:
        deadline = time.monotonic() + 30
        while len(values) < expected and time.monotonic() < deadline:
            values += [record.value for record in consumer]
    finally:
        consumer.close()
    return values


def test_topics_send_and_submit_go_over_tls_with_a_client_certificate(tls_broker, pki, tmp_path, toy_data):
    url, front = tls_broker
    env = base_env(tmp_path, url, **tls_settings(pki))
    created = pgkd("topics", "create", "--partitions", "1", env=env)
    assert created.returncode == 0, created.stderr
    assert f"kafka: created {len(TOPICS)} topic(s)" in created.stdout

    samples = tmp_path / "samples.csv"
    samples.write_text("text,label\nmy card was declined,card\nwhere is my refund,refund\n")
    sent = pgkd("send", str(samples), env=env)
    assert sent.returncode == 0, sent.stderr
    assert "sent 2 sample(s)" in sent.stdout

    # pgkd submit: aiokafka's client (the bootstrap probe), then FastStream's broker
    submitted = pgkd("submit", "--data", str(toy_data), *SMALL_RUN, "--run-id", "over-tls", env=env)
    assert submitted.returncode == 0, submitted.stderr
    assert "submitted run over-tls" in submitted.stdout

    security = KafkaSecurity.from_env({f"PGKD_KAFKA_{k.upper()}": v for k, v in tls_settings(pki).items()})
    labeled = read_topic(url, "pgkd.labeled-samples", security, expected=2)
    assert sorted(b'"text": "my card' in v or b'"text":"my card' in v for v in labeled) == [False, True]
    requested = read_topic(url, "pgkd.run-requested", security, expected=1)
    assert len(requested) == 1 and b'"run_id":"over-tls"' in requested[0].replace(b" ", b"")
    # Every connection of every client came through TLS with the client certificate.
    assert front.clients and set(front.clients) == {"pgkd-test-client"}


@pytest.mark.parametrize("command", ["topics", "submit"])     # kafka-python's client, and aiokafka's
def test_a_broker_certificate_from_another_ca_is_one_line_and_exit_2(command, tls_broker, pki, tmp_path, toy_data):
    url, front = tls_broker
    env = base_env(tmp_path, url, **tls_settings(pki, ca="other-ca"))
    samples = tmp_path / "samples.csv"
    samples.write_text("text,label\nhello,greeting\n")
    args = {"topics": ("topics", "create"), "send": ("send", str(samples), "--no-progress"),
            "submit": ("submit", "--data", str(toy_data), *SMALL_RUN, "--run-id", "untrusted")}[command]
    result = pgkd(*args, env=env)
    assert_one_line_error(result, url.partition("://")[2])
    assert front.clients == []     # nothing got past the handshake
    if command == "submit":        # the broker is reached first: no run is recorded
        assert not (tmp_path / "artifacts" / "runs" / "untrusted").exists()


def test_without_its_client_certificate_a_client_is_refused_by_a_broker_that_requires_one(tls_broker, pki, tmp_path):
    url, front = tls_broker
    result = pgkd("topics", "create", env=base_env(tmp_path, url, **tls_settings(pki, client_cert=False)))
    assert_one_line_error(result, "cannot create topics")
    assert front.clients == []


# -- SASL, as far as Tansu goes -------------------------------------------------------------------------------
@pytest.fixture
def authenticating_broker(tmp_path):
    port = free_port()
    tansu = start_tansu(tmp_path, port, port, "--authentication")
    yield f"kafka://127.0.0.1:{port}", tmp_path / f"tansu-{port}.log"
    processes.stop(tansu, timeout=10)


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512"])    # SCRAM-SHA-256 reaches the clients the same way (above)
def test_a_refused_scram_login_is_one_line_exit_2_and_the_password_is_never_shown(mechanism, authenticating_broker,
                                                                                   tmp_path, toy_data):
    url, broker_log = authenticating_broker
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")
    env = base_env(tmp_path, url, security_protocol="SASL_PLAINTEXT", sasl_mechanism=mechanism,
                   sasl_username="pgkd-nobody", sasl_password_file=str(password_file))
    samples = tmp_path / "samples.csv"
    samples.write_text("text,label\nhello,greeting\n")
    for args, expected in ((("topics", "create"), "cannot create topics"),
                           (("send", str(samples), "--no-progress"), "cannot send"),
                           (("submit", "--data", str(toy_data), *SMALL_RUN, "--run-id", "refused"),
                            "cannot reach the broker")):
        result = pgkd(*args, env=env)
        assert_one_line_error(result, expected)
        assert PASSWORD not in result.stdout + result.stderr
    assert not (tmp_path / "artifacts" / "runs" / "refused").exists()
    log = broker_log.read_text()
    assert "NotAuthenticated" not in log     # each client asked for SASL rather than skipping it
    assert PASSWORD not in log


def test_a_client_without_sasl_is_refused_by_the_authenticating_broker(authenticating_broker, tmp_path):
    """The counterpart: the broker does enforce authentication, so the refusal above is the SASL login's."""
    url, broker_log = authenticating_broker
    result = pgkd("topics", "create", env=base_env(tmp_path, url))
    assert_one_line_error(result, "cannot create topics")
    assert "NotAuthenticated" in broker_log.read_text()


# -- configuration: what each client library is given ---------------------------------------------------------
def env_of(**settings: str) -> dict:
    return {f"PGKD_KAFKA_{k.upper()}": v for k, v in settings.items()}


def test_plaintext_is_the_default_and_gives_the_clients_nothing_to_secure():
    security = KafkaSecurity.from_env({})
    assert security == KafkaSecurity("PLAINTEXT")
    assert security.faststream() is None
    assert security.aiokafka() == {"security_protocol": "PLAINTEXT"}
    assert security.kafka_python() == {"security_protocol": "PLAINTEXT"}


def test_tls_reaches_every_client_with_verification_on(pki):
    security = KafkaSecurity.from_env(env_of(**tls_settings(pki)))
    fast = security.faststream()
    assert type(fast) is BaseSecurity and fast.use_ssl
    assert parse_security(fast)["security_protocol"] == "SSL"
    for context in (fast.ssl_context, security.aiokafka()["ssl_context"]):
        assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert security.aiokafka()["security_protocol"] == "SSL"
    assert security.kafka_python() == {"security_protocol": "SSL", "ssl_cafile": str(pki / "ca.crt"),
                                       "ssl_certfile": str(pki / "client.crt"), "ssl_keyfile": str(pki / "client.key")}


@pytest.mark.parametrize("protocol", ["SASL_PLAINTEXT", "SASL_SSL"])
@pytest.mark.parametrize("mechanism,faststream_class", [("PLAIN", SASLPlaintext), ("SCRAM-SHA-256", SASLScram256),
                                                        ("scram-sha-512", SASLScram512)])
def test_sasl_reaches_every_client(protocol, mechanism, faststream_class, pki):
    tls = {"ca_file": str(pki / "ca.crt")} if protocol == "SASL_SSL" else {}
    security = KafkaSecurity.from_env(env_of(security_protocol=protocol, sasl_mechanism=mechanism,
                                             sasl_username="pgkd-trainer", sasl_password=PASSWORD, **tls))
    sasl = {"sasl_mechanism": mechanism.upper(), "sasl_plain_username": "pgkd-trainer", "sasl_plain_password": PASSWORD}
    fast = security.faststream()
    assert type(fast) is faststream_class
    # what FastStream hands to aiokafka equals what our own aiokafka client gets
    given = parse_security(fast)
    ours = security.aiokafka()
    assert {k: given[k] for k in ("security_protocol", *sasl)} == {"security_protocol": protocol, **sasl}
    assert {k: ours[k] for k in ("security_protocol", *sasl)} == {"security_protocol": protocol, **sasl}
    assert (given["ssl_context"] is not None) == (protocol == "SASL_SSL") == ("ssl_context" in ours)
    assert security.kafka_python() == {"security_protocol": protocol, **sasl,
                                       **({"ssl_cafile": str(pki / "ca.crt"), "ssl_certfile": None,
                                           "ssl_keyfile": None} if tls else {})}


def test_the_clients_accept_what_they_are_given(pki):
    """The real constructors take the adapters' arguments (aiokafka checks them without connecting)."""
    from aiokafka.client import AIOKafkaClient
    from faststream.kafka import KafkaBroker
    for settings in ({}, tls_settings(pki), {"security_protocol": "SASL_SSL", "ca_file": str(pki / "ca.crt"),
                                              "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "u",
                                              "sasl_password": PASSWORD}):
        async def construct(security: KafkaSecurity) -> None:
            AIOKafkaClient(bootstrap_servers=["127.0.0.1:1"], **security.aiokafka())
            KafkaBroker(["127.0.0.1:1"], security=security.faststream())
        asyncio.run(construct(KafkaSecurity.from_env(env_of(**settings))))


def test_make_broker_and_the_commands_read_the_process_settings(monkeypatch, pki):
    from pgkd_services.runtime import make_broker
    monkeypatch.setattr(kafka_security, "current", lambda: KafkaSecurity.from_env(env_of(**tls_settings(pki))))
    given = make_broker("kafka://127.0.0.1:1")._connection_kwargs     # what FastStream hands to aiokafka
    assert given["security_protocol"] == "SSL" and given["ssl_context"].verify_mode == ssl.CERT_REQUIRED


def test_settings_are_read_once_per_process(monkeypatch):
    kafka_security.current.cache_clear()
    monkeypatch.setenv("PGKD_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT")
    first = kafka_security.current()
    monkeypatch.setenv("PGKD_KAFKA_SECURITY_PROTOCOL", "SSL")
    assert kafka_security.current() is first
    kafka_security.current.cache_clear()


BAD_SETTINGS = [
    ({"security_protocol": "TLS"}, "PGKD_KAFKA_SECURITY_PROTOCOL='TLS': expected one of"),
    ({"security_protocol": "SSL", "ca_file": "/no/such/ca.crt"}, "PGKD_KAFKA_CA_FILE=/no/such/ca.crt: cannot read it"),
    ({"security_protocol": "SSL", "ca_file": "{tmp}/not-pem"}, "not a PEM CA bundle"),
    ({"security_protocol": "SSL", "ca_file": "{pki}/ca.crt", "cert_file": "{pki}/client.crt"},
     "PGKD_KAFKA_CERT_FILE is set without PGKD_KAFKA_KEY_FILE"),
    ({"security_protocol": "SSL", "cert_file": "{pki}/client.crt", "key_file": "{pki}/server.key"},
     "not a PEM certificate and its key"),
    ({"ca_file": "{pki}/ca.crt"}, "PGKD_KAFKA_CA_FILE is set but PGKD_KAFKA_SECURITY_PROTOCOL=PLAINTEXT does not use TLS"),
    ({"security_protocol": "SASL_SSL", "sasl_username": "u", "sasl_password": PASSWORD},
     "needs PGKD_KAFKA_SASL_MECHANISM"),
    ({"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "GSSAPI", "sasl_username": "u",
      "sasl_password": PASSWORD}, "PGKD_KAFKA_SASL_MECHANISM='GSSAPI': expected one of"),
    ({"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_password": PASSWORD},
     "needs PGKD_KAFKA_SASL_USERNAME"),
    ({"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_username": "u"},
     "needs PGKD_KAFKA_SASL_PASSWORD or PGKD_KAFKA_SASL_PASSWORD_FILE"),
    ({"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_username": "u",
      "sasl_password": PASSWORD, "sasl_password_file": "{tmp}/password"}, "are both set"),
    ({"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_username": "u",
      "sasl_password_file": "{tmp}/missing"}, "PGKD_KAFKA_SASL_PASSWORD_FILE={tmp}/missing: cannot read it"),
    ({"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_username": "u",
      "sasl_password_file": "{tmp}/empty"}, "the file is empty"),
    ({"sasl_password": PASSWORD}, "PGKD_KAFKA_SASL_PASSWORD is set but PGKD_KAFKA_SECURITY_PROTOCOL=PLAINTEXT"),
]


@pytest.fixture
def bad_files(tmp_path, pki):
    (tmp_path / "not-pem").write_text("hello\n")
    (tmp_path / "password").write_text(PASSWORD)
    (tmp_path / "empty").write_text("\n")
    return lambda text: text.format(tmp=tmp_path, pki=pki)


@pytest.mark.parametrize("settings,message", BAD_SETTINGS)
def test_a_bad_setting_is_a_user_error_naming_the_variable(settings, message, bad_files):
    with pytest.raises(UserError) as raised:
        KafkaSecurity.from_env(env_of(**{k: bad_files(v) for k, v in settings.items()}))
    text = str(raised.value)
    assert bad_files(message) in text and "PGKD_KAFKA_" in text and "\n" not in text
    assert PASSWORD not in text


# Each command with another bad setting: every setting is checked in process above; here, that each
# command reads them before any work (a subprocess each: seconds apiece).
@pytest.mark.parametrize("args,settings,message", [
    (args, *bad) for args, bad in zip([("topics", "create"), ("send", "{tmp}/samples.csv"),
                                       ("submit", "--data", "{tmp}/no-data", "--run-id", "bad"), ("service", "miner")],
                                      [BAD_SETTINGS[0], BAD_SETTINGS[3], BAD_SETTINGS[9], BAD_SETTINGS[10]])])
def test_the_cli_says_a_bad_setting_in_one_line_with_exit_2_before_any_work(args, settings, message, bad_files,
                                                                            tmp_path):
    env = base_env(tmp_path, "kafka://127.0.0.1:1", **{k: bad_files(v) for k, v in settings.items()})
    result = pgkd(*(bad_files(a) for a in args), env=env, timeout=60)
    line = assert_one_line_error(result, bad_files(message))
    assert PASSWORD not in line + result.stdout
    assert not (tmp_path / "artifacts").exists()     # before any work: nothing stored


def test_the_password_stays_out_of_repr_and_of_kafka_pythons_debug_log(caplog, monkeypatch):
    from pgkd_services.cli import create_kafka_topics
    security = KafkaSecurity.from_env(env_of(security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-512",
                                             sasl_username="u", sasl_password=PASSWORD))
    assert PASSWORD not in repr(security) and PASSWORD not in str(security)
    monkeypatch.setattr(kafka_security, "current", lambda: security)
    monkeypatch.setenv("PGKD_CONNECT_TIMEOUT", "1")
    logging.getLogger("kafka").setLevel(logging.NOTSET)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(EnvironmentFailure) as raised:
        create_kafka_topics(["127.0.0.1:1"], ["pgkd.x"], 1, 1)   # nothing listens there: the environment's failure
    assert PASSWORD not in str(raised.value)
    assert caplog.records and PASSWORD not in caplog.text
