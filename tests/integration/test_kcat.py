"""Interoperability with an independent Kafka client: records produced by ``kcat`` are consumed by
our KafkaSource and decode into valid samples, and records we produce are read back by ``kcat``.

Debian's kcat is built against librdkafka 2.0.2, which fails the handshake with the Tansu broker
(DESIGN §6); the librdkafka bundled in the confluent-kafka wheel (2.1x) works. :func:`kcat_env`
points the dynamic linker at it. The helpers here (:func:`kcat`, :func:`kcat_produce_json`) are
meant for reuse by other tests (``from tests.integration.test_kcat import kcat_produce_json``).
"""

from __future__ import annotations

import functools
import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from growclip_stream.data.datasets import iter_records
from growclip_stream.data.images import ImageTransform
from growclip_stream.data.pipeline import Decoder, route
from growclip_stream.data.produce import produce
from growclip_stream.data.records import Record, RecordLimits, decode_json, encode_json, sniff_content_type
from tests.helpers import consume_topic


@functools.cache
def kcat_env() -> dict[str, str]:
    """The environment to run kcat in: ``LD_LIBRARY_PATH`` names a folder where ``librdkafka.so.1``
    is the librdkafka bundled in the installed confluent-kafka wheel (whose file name carries a hash)."""
    if shutil.which("kcat") is None:
        pytest.fail("kcat is not installed: run scripts/install-debian-packages.sh")
    import confluent_kafka  # the wheel installs its shared libraries next to the package

    libs = Path(confluent_kafka.__file__).resolve().parent.parent / "confluent_kafka.libs"
    bundled = sorted(libs.glob("librdkafka*.so*"))
    if not bundled:
        pytest.fail(f"no librdkafka in {libs}: is confluent-kafka installed from its wheel?")
    folder = Path(tempfile.mkdtemp(prefix="growclip-kcat-"))  # small, left to the OS's temp cleanup
    (folder / "librdkafka.so.1").symlink_to(bundled[0])
    return {**os.environ, "LD_LIBRARY_PATH": str(folder)}


def kcat(*args: str, stdin: bytes | None = None, timeout_s: float = 30) -> subprocess.CompletedProcess[bytes]:
    """Runs kcat with the working librdkafka; raises with its stderr when it fails."""
    proc = subprocess.run(
        ["kcat", *args], input=stdin, env=kcat_env(), capture_output=True, timeout=timeout_s, check=False
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"kcat {' '.join(args)} exited {proc.returncode}: {proc.stderr.decode()[-2000:]}"
        )
    return proc


def kcat_produce_json(
    bootstrap: str, topic: str, records: Iterable[Record], compression: str = "none"
) -> int:
    """Produces records in the JSON format with kcat, keyed by id (one ``key<TAB>value`` line each);
    returns how many. Values are single-line: the JSON encoding escapes every newline."""
    lines = [rec.id.encode() + b"\t" + encode_json(rec) + b"\n" for rec in records]
    kcat("-b", bootstrap, "-P", "-t", topic, "-K", "\t", "-z", compression, stdin=b"".join(lines))
    return len(lines)


@pytest.fixture(scope="module")
def real_records() -> list[Record]:
    """Real records of three datasets, images of different sizes and formats' worth."""
    return [
        *itertools.islice(iter_records("fashion-mnist", seed=7), 40),
        *itertools.islice(iter_records("tuxpaint", seed=7), 40),
        *itertools.islice(iter_records("emoji", seed=7), 40),
    ]


DECODER = Decoder(ImageTransform(size=32, channels=3), RecordLimits())


def test_kcat_uses_a_librdkafka_that_talks_to_the_broker(broker: str) -> None:
    version = kcat("-V").stdout.decode()
    assert "librdkafka 2.0.2" not in version  # Debian's, which fails the handshake
    metadata = kcat("-b", broker, "-L", "-m", "10").stdout.decode()
    assert "1 brokers:" in metadata and broker.split(":")[1] in metadata


# Every compression codec of the Kafka protocol: other clients may use any of them.
@pytest.mark.parametrize("compression", ["none", "gzip", "snappy", "lz4", "zstd"])
def test_json_records_from_kcat_train_through_our_source(
    broker: str, topic: str, real_records: list[Record], compression: str
) -> None:
    assert kcat_produce_json(broker, topic, real_records, compression) == 120
    kcat("-b", broker, "-P", "-t", topic, "-K", "\t", stdin=b"junk\tthis is not json\n")
    msgs = consume_topic(broker, topic, 121)
    assert [m.offset for m in msgs] == list(range(121))
    by_id = {r.id: r for r in real_records}
    for msg, rec in zip(msgs, real_records, strict=False):
        assert msg.value == encode_json(rec)  # the bytes kcat was given, unchanged
        status, sample = route(DECODER, msg, holdout_fraction=0.0)
        assert status == "trained", (status, sample)
        assert not isinstance(sample, Exception)
        assert sample.caption == by_id[sample.id].caption and sample.image.shape == (3, 32, 32)
        expected = DECODER.transform.pixels(by_id[sample.id].image, DECODER.limits)
        assert sample.image.dtype == torch.uint8 and np.array_equal(sample.image.numpy(), expected)
    assert route(DECODER, msgs[-1], 0.0)[0] == "bad_json"  # kcat's junk is dead-lettered, not trained


def test_binary_records_from_kcat_with_headers(broker: str, topic: str, tmp_path: Path) -> None:
    records = list(itertools.islice(iter_records("tuxpaint", seed=3), 5))
    for rec in records:
        path = tmp_path / f"{rec.id.replace('/', '_')}.img"
        path.write_bytes(rec.image)  # one file per message: the value is the file's exact bytes
        kcat(
            "-b", broker, "-P", "-t", topic,
            "-k", rec.id,
            "-H", f"id={rec.id}",
            "-H", f"caption={rec.caption}",
            "-H", f"content-type={sniff_content_type(rec.image)}",
            str(path),
        )  # fmt: skip
    msgs = consume_topic(broker, topic, 5)
    samples = [DECODER(m) for m in msgs]
    assert [(s.id, s.caption) for s in samples] == [(r.id, r.caption) for r in records]


def test_kcat_reads_what_we_produce(broker: str, topic: str, real_records: list[Record]) -> None:
    sent: Sequence[Record] = real_records[::4]
    assert produce(broker, topic, sent, fmt="json") == len(sent)
    out = kcat("-b", broker, "-C", "-t", topic, "-e", "-q", "-f", "%k\t%s\n").stdout
    lines = out.rstrip(b"\n").split(b"\n")
    assert len(lines) == len(sent)
    for line, rec in zip(lines, sent, strict=True):
        key, value = line.split(b"\t", 1)
        assert key.decode() == rec.id and decode_json(value, RecordLimits()) == rec
