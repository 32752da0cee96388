"""Compressed batches through the ingest service. A producer picks the codec of its batches (gzip,
snappy, lz4, zstd) and Apache Kafka hands them to consumers as written; so does Tansu 0.6, the broker
here (the last test shows it: a consumer without the codec fails on the batch). aiokafka decodes
snappy, lz4 and zstd only with its extras (cramjam); a service without them refuses to start."""
import subprocess
import sys
import textwrap

import pytest
from aiokafka import codec
from ingest_over_tansu import SAMPLES_TOPIC, ingest_over_tansu
from stream_fixtures import body

import pgkd_services as services
from pgkd_services import runtime

CODECS = ("gzip", "snappy", "lz4", "zstd")


def test_aiokafka_can_decode_every_codec_a_producer_may_choose():
    assert {name: getattr(codec, f"has_{name}")() for name in CODECS} == dict.fromkeys(CODECS, True)


def test_a_service_whose_aiokafka_lacks_a_codec_refuses_to_start_with_one_line(monkeypatch, tmp_path):
    """Rather than start and stall on the first such batch (the consumer fails on it again and again)."""
    monkeypatch.setattr(codec, "has_lz4", lambda: False)
    monkeypatch.setattr(codec, "has_zstd", lambda: False)
    settings = runtime.Settings(broker_url="kafka://127.0.0.1:9", artifacts=f"file://{tmp_path}/artifacts")   # never tried
    with pytest.raises(runtime.CannotServe) as refused:      # `pgkd service` prints it as one line, exit 1
        services.build("trainer", settings=settings).run()
    assert str(refused.value).startswith("trainer: aiokafka here cannot decode lz4, zstd compressed batches")
    assert "aiokafka[lz4,snappy,zstd]" in str(refused.value) and "\n" not in str(refused.value)


@pytest.fixture(scope="module")
def ingest(tmp_path_factory):
    with ingest_over_tansu(tmp_path_factory.mktemp("compressed")) as running:
        yield running


@pytest.mark.parametrize("compression", CODECS)
def test_a_compressed_batch_of_samples_is_stored(ingest, compression):
    rows = ingest.samples(25)
    landed = ingest.produce([(None, body(row), []) for row in rows], compression=compression)
    assert len({m.partition for m in landed}) == 1 or len(landed) == len(rows)
    ingest.wait_stored([row["id"] for row in rows])
    assert ingest.processes.processes["ingest"].poll() is None


def test_the_broker_hands_the_batches_over_compressed(ingest, tmp_path):
    """What makes the test above a test of ingest's decoding: a consumer whose aiokafka has none of
    cramjam's codecs (cramjam hidden) cannot read the samples topic, lz4 batches in it."""
    ingest.produce([(None, body(row), []) for row in ingest.samples(5)], compression="lz4")
    (tmp_path / "cramjam.py").write_text("raise ImportError('hidden by the test')\n")
    reader = textwrap.dedent(f"""
        import asyncio
        from aiokafka import AIOKafkaConsumer, TopicPartition, codec
        assert not (codec.has_lz4() or codec.has_snappy() or codec.has_zstd())
        async def main():
            consumer = AIOKafkaConsumer(bootstrap_servers={ingest.bootstrap!r}, enable_auto_commit=False)
            await consumer.start()
            try:
                partitions = [TopicPartition({SAMPLES_TOPIC!r}, p) for p in range(3)]
                consumer.assign(partitions)
                await consumer.seek_to_beginning(*partitions)
                for _ in range(20):
                    await consumer.getmany(timeout_ms=250)
                print("read everything")
            except Exception as e:
                print(type(e).__name__, e)
            finally:
                await consumer.stop()
        asyncio.run(main())
    """)
    read = subprocess.run([sys.executable, "-c", reader], capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    # the first batch it meets is of one of the three codecs cramjam brings: all are in the topic
    assert "UnsupportedCodecError" in read.stdout and any(c in read.stdout for c in ("snappy", "lz4", "zstd")), \
        read.stdout + read.stderr
