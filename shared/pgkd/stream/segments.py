"""A stream's accepted samples, in segment files: append-only, each write atomic, the manifest the
commit point, and the index of text keys that dedupe needs, read back at start without reading the
samples themselves.

streams/<name>/segments/
    manifest.json     the committed segments: each one's samples, bytes and sha256, its key file's sha256
    00000001.jsonl    up to `segment_samples` samples (StoredSample, one JSON object a line, in seq order)
    00000001.keys     their text keys, KEY_BYTES each, in the same order: the dedupe index

A batch is one commit: the last (open) segment is rewritten with the batch's lines after its own and
new segments are written for what does not fit (each a whole file put atomically: temporary name,
then rename; an object store's PUT), then the manifest that names them. A crash before the manifest
leaves bytes the manifest does not count: at start they are cut off (the batch was never
acknowledged, so the bus delivers it again); after the manifest the batch is stored, and its
redelivery finds every text in the index (a duplicate, stored once). A committed segment shorter on
disk than its manifest says, or whose bytes do not hash to it, is damaged: `open` and `read` refuse
with one line naming the file, and `repair` keeps its complete samples and records how many were lost.
A key file that does not match is rebuilt from its segment: no sample is lost with it.
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from pydantic import BaseModel, Field, ValidationError

from pgkd.artifacts import ArtifactError, ArtifactStore, DamagedRecord
from pgkd.errors import EnvironmentFailure, UserError, dotted, invalid
from pgkd.names import NAME_PATTERN
from pgkd.stream.samples import StoredSample, text_key

log = logging.getLogger("pgkd.stream")

KEY_BYTES = 16      # of a text key's sha256: a chance collision among 1e9 texts is about 1e-21


def index_key(text: str) -> bytes:
    """A text's key in the dedupe index: the first KEY_BYTES of its normalised text's sha256."""
    return bytes.fromhex(text_key(text))[:KEY_BYTES]


class Segment(BaseModel):
    name: str = Field(pattern=NAME_PATTERN)     # a file name in the stream's folder (pgkd.names)
    first_seq: int
    last_seq: int
    samples: int
    train: int
    validation: int
    teacher: int = 0              # teacher labels among them (all in train); 0 in manifests written before
    bytes: int
    sha256: str
    keys_sha256: str


class Repair(BaseModel):
    segment: str = Field(pattern=NAME_PATTERN)
    kept: int
    lost: int
    reason: str
    repaired_at: float


class Manifest(BaseModel):
    format: int = 1
    next_seq: int = 1
    segments: list[Segment] = []
    repairs: list[Repair] = []


class SegmentDamaged(UserError):
    """A committed segment is not what the manifest says: cut short, or other bytes."""


class AnotherWriter(EnvironmentFailure):
    """Another process committed to this stream since this one read it: two writers would overwrite each
    other's segments. The one that sees it writes nothing more."""


@dataclass
class _Tail:
    """The open segment's committed bytes, kept in memory: the next batch is appended to them."""
    lines: bytes = b""
    keys: bytes = b""
    samples: list[StoredSample] = field(default_factory=list)


class SegmentLog:
    """The accepted samples of one stream. One writer (the ingest service, one replica)."""

    def __init__(self, store: ArtifactStore, prefix: str, segment_samples: int = 10_000):
        self.store, self.prefix, self.segment_samples = store, prefix, segment_samples
        self.manifest = Manifest()
        self.keys: set[bytes] = set()
        self.teacher_keys: set[bytes] = set()   # texts stored with a teacher label
        self.corrected: set[bytes] = set()      # texts stored twice: a teacher label, then a person's
        self._tail = _Tail()

    # -- what is stored ----------------------------------------------------------------------------------------
    @property
    def count(self) -> int:
        return sum(s.samples for s in self.manifest.segments)

    def split_count(self, split: str) -> int:
        """Stored samples in `split`, teacher labels included (they are all in train)."""
        return sum(getattr(s, split) for s in self.manifest.segments)

    @property
    def teacher_count(self) -> int:
        """Stored teacher labels (pgkd.distributed.messages.source_kind)."""
        return sum(s.teacher for s in self.manifest.segments)

    @property
    def last_seq(self) -> int:
        return self.manifest.next_seq - 1

    def _key(self, name: str, suffix: str) -> str:
        return f"{self.prefix}/{name}.{suffix}"

    # -- opening -------------------------------------------------------------------------------------------------
    def open(self) -> None:
        """Read the manifest and the key index back; check every committed segment's size (and the
        open one's bytes); cut off what a crash left uncommitted. A damaged segment: SegmentDamaged."""
        self.load_manifest()
        damaged = self.damaged()
        if damaged:
            segment, reason = damaged[0]
            raise SegmentDamaged(f"{self.store.uri(self._key(segment.name, 'jsonl'))}: {reason}; "
                                 f"{len(damaged)} damaged segment(s) in all. Restore the file from a backup, or run "
                                 f"`pgkd stream repair {self.prefix.split('/')[-2]}` to keep their complete samples "
                                 "and record the loss")
        self.keys, self.teacher_keys, self.corrected = set(), set(), set()
        for segment in self.manifest.segments:
            self._index(self._segment_keys(segment))
        if self.manifest.segments:
            self._load_tail()
        for segment in self.manifest.segments:    # only the segments that hold teacher labels are read
            if segment.teacher:
                self.teacher_keys.update(index_key(s.text) for s in self._read_segment(segment) if s.is_teacher)

    def _index(self, keys) -> None:
        for key in keys:
            if key in self.keys:      # the one way a text is stored twice
                self.corrected.add(key)
            self.keys.add(key)

    def correctable(self, key: bytes) -> bool:
        """Whether a person's label for this text would correct the teacher's: the text is stored with a
        teacher label and has not been corrected yet."""
        return key in self.teacher_keys and key not in self.corrected

    def _still_the_only_writer(self) -> None:
        """The manifest in the store is still the one this log last read or committed. A second ingest of
        the stream (a replica, a copy started by hand) commits its own batches meanwhile; each would
        overwrite the other's segments, and acknowledged samples would be lost. The first to see the
        other's commit raises before writing (one small read a batch; two commits in the same instant
        still race)."""
        key = f"{self.prefix}/manifest.json"
        stored = self.store.get_model(key, Manifest) if self.store.exists(key) else Manifest()
        if stored != self.manifest:
            raise AnotherWriter(f"{self.store.uri(key)}: another process committed to this stream since this one "
                                f"read it ({stored.next_seq - 1} samples stored, not {self.manifest.next_seq - 1}): "
                                "one ingest writes a stream, never two replicas")

    def load_manifest(self) -> Manifest:
        key = f"{self.prefix}/manifest.json"
        try:
            self.manifest = self.store.get_model(key, Manifest) if self.store.exists(key) else Manifest()
        except DamagedRecord as e:   # written whole by pgkd: damaged by something else
            raise SegmentDamaged(f"{self.store.uri(key)}: not the manifest pgkd wrote ({e.problem}); "
                                 "restore it from a backup") from None
        return self.manifest

    def damaged(self) -> list[tuple[Segment, str]]:
        """The committed segments that are not what the manifest says: by size, and for the open one
        (the one a crash can leave longer) by its bytes."""
        out = []
        for i, segment in enumerate(self.manifest.segments):
            size = self.store.size(self._key(segment.name, "jsonl"))
            is_tail = i == len(self.manifest.segments) - 1
            if size is None:
                out.append((segment, "missing"))
            elif size < segment.bytes:
                out.append((segment, f"cut short: {size} of its {segment.bytes} bytes"))
            elif size > segment.bytes and not is_tail:
                out.append((segment, f"{size} bytes, not its {segment.bytes}"))
            elif is_tail:
                data = self.store.get_bytes(self._key(segment.name, "jsonl"))[:segment.bytes]
                if hashlib.sha256(data).hexdigest() != segment.sha256:
                    out.append((segment, "its bytes are not those committed (sha256)"))
        return out

    def _segment_keys(self, segment: Segment) -> list[bytes]:
        """The segment's keys from its key file; rebuilt from the segment when that file does not match."""
        try:
            data = self.store.get_bytes(self._key(segment.name, "keys"))[:segment.samples * KEY_BYTES]
        except ArtifactError:
            data = b""
        if hashlib.sha256(data).hexdigest() != segment.keys_sha256:
            log.warning("%s: the key file of segment %s does not match the manifest: rebuilt from the segment",
                        self.prefix, segment.name)
            data = b"".join(index_key(s.text) for s in self._read_segment(segment))
            self.store.put_bytes(self._key(segment.name, "keys"), data)
        return [data[i:i + KEY_BYTES] for i in range(0, len(data), KEY_BYTES)]

    def _load_tail(self) -> None:
        tail = self.manifest.segments[-1]
        if tail.samples >= self.segment_samples:   # full: the next batch starts a new segment
            self._tail = _Tail()
            return
        lines = self.store.get_bytes(self._key(tail.name, "jsonl"))
        keys = self.store.get_bytes(self._key(tail.name, "keys"))[:tail.samples * KEY_BYTES]
        if len(lines) > tail.bytes:
            log.info("%s: segment %s: %d bytes a crash left uncommitted cut off (their messages were never "
                     "acknowledged)", self.prefix, tail.name, len(lines) - tail.bytes)
            lines = lines[:tail.bytes]
            self.store.put_bytes(self._key(tail.name, "jsonl"), lines)
        self._tail = _Tail(lines=lines, keys=keys, samples=_parse(lines, self._key(tail.name, "jsonl")))

    # -- appending ---------------------------------------------------------------------------------------------
    def append(self, samples: list[StoredSample]) -> None:
        """One batch, committed at once (see the module's docstring). Their seqs must follow last_seq."""
        if not samples:
            return
        assert samples[0].seq == self.manifest.next_seq, (samples[0].seq, self.manifest.next_seq)
        self._still_the_only_writer()
        segments = list(self.manifest.segments)
        tail = self._tail
        if not segments or segments[-1].samples >= self.segment_samples:
            segments.append(None)     # a new segment
            tail = _Tail()
        rest = list(samples)
        while rest:
            room = self.segment_samples - len(tail.samples)
            chunk, rest = rest[:room], rest[room:]
            lines = tail.lines + b"".join(s.model_dump_json().encode() + b"\n" for s in chunk)
            keys = tail.keys + b"".join(index_key(s.text) for s in chunk)
            tail = _Tail(lines=lines, keys=keys, samples=tail.samples + chunk)
            name = segments[-1].name if segments[-1] is not None else f"{len(segments):08d}"
            self.store.put_bytes(self._key(name, "jsonl"), lines)
            self.store.put_bytes(self._key(name, "keys"), keys)
            segments[-1] = _describe(name, tail)
            if rest:
                segments.append(None)
                tail = _Tail()
        manifest = self.manifest.model_copy(update={"segments": segments, "next_seq": samples[-1].seq + 1})
        self.store.put_json(f"{self.prefix}/manifest.json", manifest.model_dump(mode="json"))   # the commit
        self.manifest, self._tail = manifest, (tail if len(tail.samples) < self.segment_samples else _Tail())
        self._index(index_key(s.text) for s in samples)
        self.teacher_keys.update(index_key(s.text) for s in samples if s.is_teacher)

    # -- reading -----------------------------------------------------------------------------------------------
    def read(self, after_seq: int = 0) -> Iterator[StoredSample]:
        """The stored samples with seq above `after_seq`, in order; every segment read is checked
        against its sha256 (SegmentDamaged if it does not match)."""
        for segment in self.manifest.segments:
            if segment.last_seq > after_seq:
                for sample in self._read_segment(segment):
                    if sample.seq > after_seq:
                        yield sample

    def _read_segment(self, segment: Segment) -> list[StoredSample]:
        if segment is self.manifest.segments[-1] and self._tail.samples and \
                len(self._tail.samples) == segment.samples:
            return list(self._tail.samples)
        key = self._key(segment.name, "jsonl")
        try:
            data = self.store.get_bytes(key)
        except ArtifactError:
            raise SegmentDamaged(f"{self.store.uri(key)}: missing") from None
        data = data[:segment.bytes]
        if hashlib.sha256(data).hexdigest() != segment.sha256:
            raise SegmentDamaged(f"{self.store.uri(key)}: its bytes are not those the manifest committed "
                                 f"(sha256); run `pgkd stream repair {self.prefix.split('/')[-2]}`")
        return _parse(data, key)

    # -- repairing ---------------------------------------------------------------------------------------------
    def repair(self) -> list[Repair]:
        """Each damaged segment rewritten with its complete samples (lines that parse whole, in seq
        order); the loss recorded in the manifest. Their texts leave the index: sent again, they are new.
        Run it with ingest stopped (`pgkd stream repair`)."""
        self.load_manifest()
        damaged = {segment.name: reason for segment, reason in self.damaged()}
        repairs, segments = [], []
        for segment in self.manifest.segments:
            if segment.name not in damaged:
                segments.append(segment)
                continue
            try:
                data = self.store.get_bytes(self._key(segment.name, "jsonl"))
            except ArtifactError:
                data = b""
            kept = []
            for line in data.splitlines():
                try:
                    sample = StoredSample.model_validate_json(line)
                except ValidationError:
                    continue
                if segment.first_seq <= sample.seq <= segment.last_seq and (not kept or sample.seq > kept[-1].seq):
                    kept.append(sample)
            tail = _Tail(lines=b"".join(s.model_dump_json().encode() + b"\n" for s in kept),
                         keys=b"".join(index_key(s.text) for s in kept), samples=kept)
            self.store.put_bytes(self._key(segment.name, "jsonl"), tail.lines)
            self.store.put_bytes(self._key(segment.name, "keys"), tail.keys)
            described = _describe(segment.name, tail)
            # a segment's seq range is what it was given, whatever is left of it
            segments.append(described.model_copy(update={"first_seq": segment.first_seq,
                                                         "last_seq": segment.last_seq}))
            repairs.append(Repair(segment=segment.name, kept=len(kept), lost=segment.samples - len(kept),
                                  reason=damaged[segment.name], repaired_at=time.time()))
        if repairs:
            self.manifest = self.manifest.model_copy(update={"segments": segments,
                                                             "repairs": self.manifest.repairs + repairs})
            self.store.put_json(f"{self.prefix}/manifest.json", self.manifest.model_dump(mode="json"))
        return repairs


def _describe(name: str, tail: _Tail) -> Segment:
    samples = tail.samples
    return Segment(name=name, first_seq=samples[0].seq if samples else 0, last_seq=samples[-1].seq if samples else 0,
                   samples=len(samples), train=sum(s.split == "train" for s in samples),
                   validation=sum(s.split == "validation" for s in samples),
                   teacher=sum(s.is_teacher for s in samples), bytes=len(tail.lines),
                   sha256=hashlib.sha256(tail.lines).hexdigest(), keys_sha256=hashlib.sha256(tail.keys).hexdigest())


def _parse(data: bytes, where: str) -> list[StoredSample]:
    try:
        return [StoredSample.model_validate_json(line) for line in data.splitlines() if line]
    except ValidationError as e:
        raise SegmentDamaged(f"{where}: a line is not a stored sample ({invalid(e, dotted('line'), limit=1)})") from None
