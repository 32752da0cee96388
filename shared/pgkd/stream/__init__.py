"""Continuous distillation: a stream of labeled samples keeps the student current.

A stream grows the dataset of a base run (one submitted with `pgkd submit`). Each streamed sample
is validated (a bad one is rejected with a reason), deduplicated by normalised text against every
text the stream's data already holds (train, validation, test, and what the current student was
trained on), and routed to train or validation by a stable hash of that text, so validation stays
held out and a replay routes every sample the same way. A teacher label (`source` "teacher": an
LLM's answer on a text the served student deferred; pgkd.distributed.messages.source_kind tells it
from a human label) always goes to train: validation, the drift check and the promotion decision
use human labels only, and a run's training set holds at most `max_teacher_label_share` of teacher
labels (the newest). Two triggers start a new run, warm-started from the current best student on
the grown dataset:
    count: `trigger_count` samples (human or teacher labels) accepted since the last run started;
    drift: the current student's accuracy on a window of `drift_window` newly arrived human labels is
           below its drift reference by more than `drift_margin`; the reference is its accuracy on
           its first `drift_reference_windows` windows after it became current.
One run at a time: a trigger that fires while a run is going is kept and acted on when it ends.
When a stream run completes, its best student replaces the current one only if it scores better
on the current validation set (the base run's plus every streamed validation sample); the decision
is recorded either way.

Ingest takes messages in batches (up to `batch_max`, waiting at most `batch_seconds`): a batch's
new samples are stored in one commit before the batch is acknowledged, so a crash loses nothing
acknowledged, and its redelivery stores nothing twice (at least once from the bus, exactly once in
the store).

What a stream keeps in the artifact store, under streams/<name>/:
    state.json              the taxonomy, the current student, the runs and their decisions, drift checks
    segments/               the accepted samples in segment files, their text-key index, the manifest
    trained/<sha>.keys      text keys of a current student's training set that are not stored samples
    decisions/<run_id>.json a run's decision: both scores, the validation set they were measured on
The stream has one writer: run ingest as a single replica.

The parts: settings.py (PGKD_STREAM_* and the settings file), samples.py (validation, dedupe keys,
routing), teacher_share.py (the bound on teacher labels in a run's training set), segments.py (the samples' storage and index), state.py (what state.json holds; the typed
Trigger), promotion.py (the comparison of two students), stream.py (the Stream: `take_batch`,
`finished`, `resume`, each returning a StreamStep).
"""
from pgkd.stream.promotion import compare, score
from pgkd.stream.samples import REJECTION_REASONS, Rejected, StoredSample, parse_sample, route, split_for, text_key
from pgkd.stream.settings import StreamSettings
from pgkd.stream.state import CurrentStudent, DriftCheck, PromotionDecision, StreamRun, StreamState, Trigger
from pgkd.stream.segments import AnotherWriter, SegmentDamaged, SegmentLog
from pgkd.stream.stream import Stream, StreamStep, Taken

__all__ = ["REJECTION_REASONS", "AnotherWriter", "CurrentStudent", "DriftCheck", "PromotionDecision", "Rejected", "SegmentDamaged",
           "SegmentLog", "StoredSample", "Stream", "StreamRun", "StreamSettings", "StreamState", "StreamStep", "Taken",
           "Trigger", "compare", "parse_sample", "route", "score", "split_for", "text_key"]
