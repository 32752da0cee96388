"""The loop's Prometheus metrics: what the stop policy reads and what operators watch.

One `LoopMetrics` per registry: the services use prometheus-client's default registry (served on
/metrics), an embedded run a registry of its own. Label sets stay bounded: `run` and `cycle` (a run
has at most max_cycles + 1 cycles), a metric name, a reason or kind from a fixed set; never a text
or a sample id.
"""
from __future__ import annotations

import time

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from pgkd.types import METRICS
from pgkd.distributed.messages import SOURCE_KINDS
from pgkd.loop.screening import REASONS

TEACHER_ERROR_KINDS = ("timeout", "transport", "server_error", "rate_limited", "rejected_request", "incompatible_model")
REJECTION_REASONS = (*REASONS, "unparseable_answer", "malformed_sample")
# Why ingest rejects a streamed sample (pgkd.stream): the first word of its dead letter's reason.
INGEST_REJECTIONS = ("tombstone", "not_utf8", "not_json", "invalid_fields", "empty_text", "too_short", "oversized",
                     "unknown_label")

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
DURATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class LoopMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY):
        self.registry = registry
        r = dict(registry=registry)
        # evaluator
        self.validation_score = Gauge("pgkd_validation_score", "Validation metric of a cycle's student",
                                      ["run", "cycle", "metric"], **r)
        # What the stop policy decides on: the validation metric, or the out-of-fold selection scores
        # (--selection-source out-of-fold).
        self.selection_score = Gauge("pgkd_selection_score", "Selection metric of a cycle's student (what the "
                                     "stop policy reads)", ["run", "cycle", "metric"], **r)
        self.best_score = Gauge("pgkd_best_score", "Best selection value of the stop policy's metric so far",
                                ["run", "metric"], **r)
        self.best_cycle = Gauge("pgkd_best_cycle", "Cycle of the best student so far", ["run"], **r)
        self.cycles_since_improvement = Gauge("pgkd_cycles_since_improvement",
                                              "Cycles evaluated since the best one", ["run"], **r)
        self.last_cycle = Gauge("pgkd_last_cycle", "Last evaluated cycle", ["run"], **r)
        self.last_cycle_time = Gauge("pgkd_last_cycle_timestamp_seconds", "When the last cycle was evaluated",
                                     ["run"], **r)
        self.cycle_duration = Histogram("pgkd_cycle_duration_seconds", "Wall time of a cycle, mining to evaluation",
                                        buckets=DURATION_BUCKETS, **r)
        self.run_stopped = Gauge("pgkd_run_stopped", "1 when the stop policy ended the run, by reason",
                                 ["run", "reason"], **r)
        self.runs_completed = Counter("pgkd_runs_completed", "Runs ended, by status", ["status"], **r)
        # trainer
        self.train_loss = Gauge("pgkd_train_loss", "Training loss of a cycle's last epoch", ["run", "cycle"], **r)
        self.train_validation_loss = Gauge("pgkd_train_validation_loss", "Best validation loss within the round",
                                           ["run", "cycle"], **r)
        self.train_samples_per_second = Gauge("pgkd_train_samples_per_second", "Training throughput of a round",
                                              ["run", "cycle"], **r)
        self.train_duration = Histogram("pgkd_train_duration_seconds", "Wall time of a training round",
                                        buckets=DURATION_BUCKETS, **r)
        # generator
        self.teacher_calls = Counter("pgkd_teacher_calls", "Calls answered by the teacher", **r)
        self.teacher_tokens = Counter("pgkd_teacher_tokens", "Teacher tokens", ["kind"], **r)
        self.teacher_cost = Counter("pgkd_teacher_cost", "Teacher cost, from the configured prices", **r)
        self.teacher_errors = Counter("pgkd_teacher_errors", "Failed teacher calls, by kind", ["kind"], **r)
        self.teacher_cache_hits = Counter("pgkd_teacher_cache_hits", "Answers read from the response cache", **r)
        self.teacher_latency = Histogram("pgkd_teacher_latency_seconds", "Round trip of one teacher call",
                                         buckets=LATENCY_BUCKETS, **r)
        self.run_teacher_tokens = Gauge("pgkd_run_teacher_tokens", "A run's teacher tokens so far",
                                        ["run", "kind"], **r)
        self.run_teacher_cost = Gauge("pgkd_run_teacher_cost", "A run's teacher cost so far", ["run"], **r)
        self.samples_accepted = Counter("pgkd_samples_accepted", "Generated samples added to training", **r)
        self.samples_rejected = Counter("pgkd_samples_rejected", "Generated samples or answers dropped, by reason",
                                        ["reason"], **r)
        # ingest
        self.ingest_messages = Counter("pgkd_ingest_messages", "Streamed labeled samples, by outcome "
                                       "(accepted, duplicate, rejected)", ["outcome"], **r)
        self.ingest_rejected = Counter("pgkd_ingest_rejected", "Streamed samples rejected, by reason", ["reason"], **r)
        # whose label an accepted sample is: human, or teacher (an LLM's answer on a text the student deferred)
        self.ingest_accepted = Counter("pgkd_ingest_accepted", "Streamed samples stored, by source (human, "
                                       "teacher)", ["source"], **r)
        self.stream_samples = Gauge("pgkd_stream_samples", "Samples a stream stored, by split", ["stream", "split"],
                                    **r)
        self.stream_teacher_samples = Gauge("pgkd_stream_teacher_samples", "Teacher labels a stream stored (all "
                                            "in train, counted in pgkd_stream_samples too)", ["stream"], **r)
        self.stream_new_samples = Gauge("pgkd_stream_new_samples", "Samples accepted since the stream's last run "
                                        "started", ["stream"], **r)
        self.stream_window_accuracy = Gauge("pgkd_stream_window_accuracy", "The current student's accuracy on the "
                                            "last window of new samples", ["stream"], **r)
        self.stream_reference_accuracy = Gauge("pgkd_stream_reference_accuracy", "The current student's drift "
                                               "reference: its accuracy on its first windows of new samples",
                                               ["stream"], **r)
        self.stream_runs = Counter("pgkd_stream_runs_triggered", "Runs a stream started, by trigger (count, drift)",
                                   ["trigger"], **r)
        self.stream_decisions = Counter("pgkd_stream_decisions", "Stream runs decided: whether the new student "
                                        "replaced the current one (replaced, kept)", ["outcome"], **r)
        self.stream_current_score = Gauge("pgkd_stream_current_score", "The current student's validation score "
                                          "when it became current", ["stream", "metric"], **r)
        # deployer
        self.serving_promotions = Counter("pgkd_serving_promotions", "Promoted students a deployer took, by outcome "
                                          "(deployed, failed, skipped: not newer than the one served)",
                                          ["model", "outcome"], **r)
        self.serving_version = Gauge("pgkd_serving_version", "The model version a deployer's server serves", ["model"],
                                     **r)
        # every service
        # The service is the scrape target's label; a label of our own would clash with it.
        self.dead_letters = Counter("pgkd_dead_letters", "Messages sent to the dead-letter topic, by source topic",
                                    ["topic"], **r)
        # Children of labelled counters exist at 0 from the start, so rate() and increase() see the
        # first increment instead of a series born at its value.
        for kind in TEACHER_ERROR_KINDS:
            self.teacher_errors.labels(kind)
        for reason in REJECTION_REASONS:
            self.samples_rejected.labels(reason)
        for prompt_or_completion in ("prompt", "completion"):
            self.teacher_tokens.labels(prompt_or_completion)
        for outcome in ("accepted", "duplicate", "rejected"):
            self.ingest_messages.labels(outcome)
        for reason in INGEST_REJECTIONS:
            self.ingest_rejected.labels(reason)
        for source in SOURCE_KINDS:
            self.ingest_accepted.labels(source)
        for trigger in ("count", "drift"):
            self.stream_runs.labels(trigger)
        for outcome in ("replaced", "kept"):
            self.stream_decisions.labels(outcome)

    # -- what each step reports ----------------------------------------------------------------------------
    def cycle_evaluated(self, run: str, cycle: int, scores: dict[str, float], metric: str, history: list[float],
                        best_cycle: int, seconds: float | None, selection: dict[str, float] | None = None) -> None:
        for name in METRICS:
            self.validation_score.labels(run, str(cycle), name).set(scores[name])
            self.selection_score.labels(run, str(cycle), name).set((selection or scores)[name])
        self.best_score.labels(run, metric).set(history[best_cycle])
        self.best_cycle.labels(run).set(best_cycle)
        self.cycles_since_improvement.labels(run).set(len(history) - 1 - best_cycle)
        self.last_cycle.labels(run).set(cycle)
        self.last_cycle_time.labels(run).set(time.time())
        if seconds is not None:
            self.cycle_duration.observe(seconds)

    def trained(self, run: str, cycle: int, training) -> None:
        self.train_loss.labels(run, str(cycle)).set(training.train_loss)
        self.train_validation_loss.labels(run, str(cycle)).set(training.validation_loss)
        self.train_samples_per_second.labels(run, str(cycle)).set(training.samples_per_second)
        self.train_duration.observe(training.seconds)

    def generated(self, run: str, usage, accepted: int, rejected: dict[str, int], run_usage) -> None:
        """`usage` is this cycle's, `run_usage` the run's so far (kept in gauges that survive restarts
        of the generator, unlike counters)."""
        self.teacher_calls.inc(usage.calls)
        self.teacher_tokens.labels("prompt").inc(usage.prompt_tokens)
        self.teacher_tokens.labels("completion").inc(usage.completion_tokens)
        self.teacher_cost.inc(usage.cost)
        self.teacher_cache_hits.inc(usage.cache_hits)
        for kind, count in usage.errors.items():
            self.teacher_errors.labels(kind).inc(count)
        for seconds in usage.call_seconds:
            self.teacher_latency.observe(seconds)
        self.run_teacher_tokens.labels(run, "prompt").set(run_usage.prompt_tokens)
        self.run_teacher_tokens.labels(run, "completion").set(run_usage.completion_tokens)
        self.run_teacher_cost.labels(run).set(run_usage.cost)
        self.samples_accepted.inc(accepted)
        for reason, count in rejected.items():
            self.samples_rejected.labels(reason).inc(count)

    # -- a run's events (pgkd.loop.distillation): each exports what the run's state says ---------------------
    def on_trained(self, state) -> None:
        self.trained(state.run_id, state.cycle, state.training)

    def on_cycle_evaluated(self, state) -> None:
        """Every cycle of the run again: a restarted evaluator exports the whole run."""
        history, metric = state.selection_history(), state.config.metric
        for record in state.cycles:
            c = record.cycle
            self.cycle_evaluated(state.run_id, c, record.validation, metric, history[:c + 1], state.best_cycle(c),
                                 record.seconds if c == state.cycles[-1].cycle else None, selection=record.selection)

    def on_taught(self, state) -> None:
        p = state.provenance
        self.generated(state.run_id, p.teacher_usage, p.accepted, p.rejected, state.usage)

    def on_completed(self, state) -> None:
        self.completed(state.run_id, "completed", state.stop_reason)

    def completed(self, run: str, status: str, reason: str) -> None:
        """A failed run counts as stopped too (reason "failed"), so it does not look stalled."""
        self.runs_completed.labels(status).inc()
        self.run_stopped.labels(run, reason.split(":", 1)[0] if status == "completed" else "failed").set(1)

    def ingested(self, outcome: str, reason: str | None = None, source: str | None = None) -> None:
        """One sample message's outcome; a rejected one's reason; an accepted one's source kind (human,
        teacher: pgkd.distributed.messages.source_kind, never the free-text source itself)."""
        self.ingest_messages.labels(outcome).inc()
        if reason:
            self.ingest_rejected.labels(reason).inc()
        if outcome == "accepted":
            assert source in SOURCE_KINDS, source
            self.ingest_accepted.labels(source).inc()

    def stream_state(self, stream) -> None:
        """A stream's gauges from its state (pgkd.stream.Stream), after each change."""
        name, state = stream.state.name, stream.state
        for split in ("train", "validation"):
            self.stream_samples.labels(name, split).set(stream.log.split_count(split))
        self.stream_teacher_samples.labels(name).set(stream.log.teacher_count)
        self.stream_new_samples.labels(name).set(stream.new_samples())
        if state.drift_checks:
            self.stream_window_accuracy.labels(name).set(state.drift_checks[-1].accuracy)
        if state.current is not None:
            if state.current.drift_reference is not None:
                self.stream_reference_accuracy.labels(name).set(state.current.drift_reference)
            self.stream_current_score.labels(name, stream.metric).set(state.current.validation_score)

    def consuming(self, topic: str) -> None:
        self.dead_letters.labels(topic)

    def dead_letter(self, topic: str) -> None:
        self.dead_letters.labels(topic).inc()


def exported_names(metrics: LoopMetrics) -> set[str]:
    """Every series name this module exports (counters with _total, histograms with their parts)."""
    names = set()
    for collector in (v for v in vars(metrics).values() if hasattr(v, "describe")):
        for family in collector.describe():
            if family.type == "counter":
                names |= {family.name + "_total", family.name + "_created"}
            elif family.type == "histogram":
                names |= {family.name + s for s in ("_bucket", "_sum", "_count", "_created")}
            else:
                names.add(family.name)
    return names
