"""Dead letters keep what an operator needs to trace or replay a message: its key and headers (as the
dead-letter record's own, and in its JSON), its source partition and offset, its exact bytes. A
tombstone, a message that is not UTF-8 and one with bytes no JSON starts with are each named as such,
and a service goes on consuming after any of them. Read back with kafka-python, and with librdkafka
(confluent-kafka), the client under kcat and most Kafka tools, over Tansu."""
import asyncio
import base64
import json
import time

import pytest
from faststream import Context
from faststream.kafka import TestKafkaBroker
from ingest_over_tansu import SAMPLES_TOPIC, ingest_over_tansu
from pgkd.artifacts import ArtifactStore
from pgkd.distributed.messages import DeadLetter, RunRequested
from pgkd.stream import Rejected, StreamSettings, parse_sample

from pgkd_services.runtime import Service, Settings, make_broker

GOOD = b'{"text": "please refund my last order", "label": "refund"}'
ORIGIN_HEADERS = ("pgkd.dead-letter.reason", "pgkd.dead-letter.service", "pgkd.dead-letter.topic",
                  "pgkd.dead-letter.partition", "pgkd.dead-letter.offset")


# -- each bad message named -----------------------------------------------------------------------------

@pytest.mark.parametrize("body, reason, said", [
    (None, "tombstone", "the record has no value (null)"),
    (b"\x80\x81" + GOOD, "not_utf8", "byte 0x80 at offset 0 is not UTF-8"),
    (b"\xe2\x80\x8b" + GOOD, "not_json", r"the message starts b'\xe2\x80\x8b{"),   # a zero-width space first
    (b"\x1b[0m" + GOOD, "not_json", r"the message starts b'\x1b[0m{"),            # a terminal's colour reset
    (b"", "not_json", "the message is empty"),
    (b'{"text": "cut off", "label": ', "not_json", "Expecting value at line 1 column 30; near byte 29"),
])
def test_a_tombstone_bad_bytes_and_an_empty_message_are_each_named(body, reason, said):
    with pytest.raises(Rejected) as rejected:
        parse_sample(body, StreamSettings())
    assert rejected.value.reason == reason and said in str(rejected.value)
    assert str(rejected.value).startswith(f"{reason}: ")


def test_a_byte_order_mark_is_taken_and_a_second_one_is_shown():
    assert parse_sample(b"\xef\xbb\xbf" + GOOD, StreamSettings()).label == "refund"
    with pytest.raises(Rejected) as rejected:
        parse_sample(b"\xef\xbb\xbf\xef\xbb\xbf" + GOOD, StreamSettings())
    assert str(rejected.value).startswith("not_json: Unexpected UTF-8 BOM") and \
        r"the message starts b'\xef\xbb\xbf\xef\xbb\xbf{" in str(rejected.value)


# -- any service, over FastStream's in-memory broker ----------------------------------------------------

def test_a_loop_service_dead_letters_a_tombstone_and_a_bad_message_with_their_key_and_headers(tmp_path):
    settings = Settings(broker_url="kafka://localhost:9092", artifacts=f"file://{tmp_path}/artifacts")
    broker = make_broker(settings.broker_url)
    service = Service("probe", settings=settings, broker=broker, store=ArtifactStore(settings.artifacts))
    service.consume(RunRequested, lambda message, store: pytest.fail("no message here is valid"))
    service.listen()
    letters = []

    @broker.subscriber("pgkd.dead-letter", group_id="test-listener")
    async def listener(message=Context("message")):
        letters.append(message.raw_message)

    async def scenario():
        async with TestKafkaBroker(broker) as test_broker:
            await test_broker.publish(None, "pgkd.run-requested", key=b"run-7", headers={"trace-id": "t-1"})
            await test_broker.publish(b'{"run_id": "run-8"}', "pgkd.run-requested", key=b"run-8",
                                      headers={"trace-id": "t-2", "origin": "a test"})
    asyncio.run(scenario())

    tombstone, bad = letters
    for record, key, trace in ((tombstone, b"run-7", "t-1"), (bad, b"run-8", "t-2")):
        letter = DeadLetter.model_validate_json(record.value)
        headers = {name: value.decode() for name, value in record.headers}
        assert record.key == key and letter.key == key.decode()
        assert headers["trace-id"] == trace and ("trace-id", trace) in letter.headers
        assert headers["pgkd.dead-letter.topic"] == letter.source_topic == "pgkd.run-requested"
        assert headers["pgkd.dead-letter.reason"] == letter.reason and headers["pgkd.dead-letter.service"] == "probe"
        assert (letter.source_partition, letter.source_offset) == (0, 0)    # what the in-memory broker says
    assert DeadLetter.model_validate_json(tombstone.value).reason.startswith("tombstone: ")
    assert DeadLetter.model_validate_json(tombstone.value).payload_bytes is None
    assert DeadLetter.model_validate_json(bad.value).reason.startswith("not a valid RunRequested")


# -- the ingest service over Tansu ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def ingest(tmp_path_factory):
    with ingest_over_tansu(tmp_path_factory.mktemp("dead-letters")) as running:
        yield running


@pytest.fixture(scope="module")
def sent(ingest):
    """Bad messages with keys and headers, each followed by good samples, sent once; what was sent
    (key -> value, headers, where it landed) and the good samples' ids, once all those are stored."""
    good = ingest.samples(8)
    bad = {b"line-3": (None, [("trace-id", b"t-3")]),                                       # a tombstone
           b"line-5": (b"\x80\x81" + GOOD, [("trace-id", b"t-5"), ("source-file", b"corrections.jsonl")]),
           b"line-7": (b"\xe2\x80\x8b" + GOOD, [("trace-id", b"t-7")]),
           b"line-9": (b"this is not json", [("trace-id", b"t-9"), ("trace-id", b"t-9b")])}   # a name twice
    records = []
    for (key, (value, headers)), row in zip(bad.items(), [good[0:2], good[2:4], good[4:6], good[6:8]]):
        records.append((key, value, headers))
        records += [(row_["id"].encode(), json.dumps(row_).encode(), []) for row_ in row]
    # A good sample whose header is not UTF-8: FastStream's parser dropped it, unseen (now: stored).
    records[1] = (records[1][0], records[1][1], [("origin", b"\xff\xfe latin-1 \xe9")])
    landed = ingest.produce(records)
    ingest.wait_stored([row["id"] for row in good])
    where = {key: meta for (key, _, _), meta in zip(records, landed)}
    return {key: (value, headers, where[key]) for key, (value, headers) in bad.items()}


def dead_letters(ingest, read, count: int, timeout: float = 60) -> dict:
    """The dead-letter records, by key, once there are `count` of them."""
    deadline = time.monotonic() + timeout
    while True:
        records = read()
        if len(records) >= count or time.monotonic() > deadline:
            assert len(records) == count, f"{len(records)} dead letters; logs:\n{ingest.processes.log_tails()}"
            return records
        time.sleep(0.5)


def test_ingest_keeps_consuming_after_a_tombstone_and_names_each_bad_message(ingest, sent):
    letters = {r.key: DeadLetter.model_validate_json(r.value)
               for r in dead_letters(ingest, lambda: ingest.processes.records("dead-letter"), len(sent))}
    assert {key: letter.reason.split(":")[0] for key, letter in letters.items()} == {
        b"line-3": "tombstone", b"line-5": "not_utf8", b"line-7": "not_json", b"line-9": "not_json"}
    assert r"the message starts b'\xe2\x80\x8b{" in letters[b"line-7"].reason
    assert ingest.processes.processes["ingest"].poll() is None       # still running: every good sample stored


def test_a_dead_letter_keeps_the_key_headers_partition_offset_and_exact_bytes(ingest, sent):
    records = dead_letters(ingest, lambda: ingest.processes.records("dead-letter"), len(sent))
    for record in records:
        value, headers, landed = sent[record.key]
        letter = DeadLetter.model_validate_json(record.value)
        assert (letter.source_topic, letter.service, letter.key) == (SAMPLES_TOPIC, "ingest", record.key.decode())
        assert (letter.source_partition, letter.source_offset) == (landed.partition, landed.offset)
        assert letter.headers == [(name, v.decode()) for name, v in headers]          # in order, repeats kept
        on_record = dict(record.headers)
        assert {name: v for name, v in headers} == {n: v for n, v in on_record.items() if n in dict(headers)}
        assert on_record["pgkd.dead-letter.partition"] == str(landed.partition).encode()
        assert on_record["pgkd.dead-letter.offset"] == str(landed.offset).encode()
        assert on_record["pgkd.dead-letter.topic"] == SAMPLES_TOPIC.encode()
        assert on_record["pgkd.dead-letter.reason"].decode() == letter.reason
        if value is None:
            assert (letter.payload, letter.payload_bytes, letter.payload_base64) == ("", None, None)
        elif letter.payload_base64 is not None:     # not UTF-8: the exact bytes are there too
            assert base64.b64decode(letter.payload_base64) == value and value == b"\x80\x81" + GOOD
        else:
            assert letter.payload.encode() == value and letter.payload_bytes == len(value)


def test_a_librdkafka_client_reads_a_dead_letters_key_headers_and_origin(ingest, sent):
    """confluent-kafka's bundled librdkafka, as kcat and most Kafka tools read the topic (Debian 12's
    kcat, librdkafka 2.0.2, cannot talk to Tansu 0.6 at all: docs/development.md, Tansu)."""
    try:
        from confluent_kafka import Consumer, TopicPartition
    except ImportError:
        pytest.fail("confluent-kafka is not installed: `make setup` installs it (pgkd[test])")

    def read() -> list:
        consumer = Consumer({"bootstrap.servers": ingest.bootstrap, "group.id": "test-librdkafka",
                             "enable.auto.commit": False})
        try:
            consumer.assign([TopicPartition("pgkd.dead-letter", p, 0) for p in range(3)])
            got, quiet = [], time.monotonic() + 2
            while time.monotonic() < quiet:
                message = consumer.poll(0.2)
                if message is not None and not message.error():
                    got.append(message)
                    quiet = time.monotonic() + 1
            return got
        finally:
            consumer.close()

    for message in dead_letters(ingest, read, len(sent)):
        value, headers, landed = sent[message.key()]
        on_record = message.headers()       # a list of (name, bytes), as kcat's %h shows them
        assert [(n, v) for n, v in on_record if not n.startswith("pgkd.dead-letter.") and n in dict(headers)] == \
            list(dict(headers).items())     # a repeated name: its last value, as FastStream passes it on
        found = {n: v.decode() for n, v in on_record if n in ORIGIN_HEADERS}
        assert set(found) == set(ORIGIN_HEADERS)
        assert (found["pgkd.dead-letter.partition"], found["pgkd.dead-letter.offset"]) == \
            (str(landed.partition), str(landed.offset))
        assert json.loads(message.value())["reason"] == found["pgkd.dead-letter.reason"]
