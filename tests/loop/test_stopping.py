import pytest

from pgkd.loop.stopping import StopPolicy


def test_patience_counts_cycles_since_the_best():
    p = StopPolicy(patience=2, max_cycles=10)
    assert not p.decide([0.5, 0.6, 0.55]).stop
    d = p.decide([0.5, 0.6, 0.55, 0.6])      # equal is no improvement
    assert d.stop and d.reason.startswith("patience") and "2 cycles" in d.reason
    assert p.best_cycle([0.5, 0.6, 0.55, 0.6]) == 1


def test_min_delta_and_lower_is_better():
    assert StopPolicy(patience=1, min_delta=0.05).decide([0.5, 0.52]).stop
    assert not StopPolicy(patience=1, min_delta=0.01).decide([0.5, 0.52]).stop
    loss = StopPolicy(patience=1, metric="loss", lower_is_better=True)
    assert not loss.decide([1.0, 0.8]).stop and loss.decide([1.0, 0.8, 0.9]).stop


def test_max_cycles_and_sample_budget():
    assert StopPolicy(patience=0, max_cycles=2).decide([0.1, 0.2, 0.3]).reason.startswith("max_cycles")
    assert not StopPolicy(patience=0, max_cycles=2).decide([0.1, 0.2]).stop
    d = StopPolicy(patience=0, max_cycles=9, sample_budget=64).decide([0.1, 0.2], samples_generated=64)
    assert d.stop and d.reason.startswith("sample_budget")


def test_target_score_and_teacher_budgets():
    target = StopPolicy(patience=0, max_cycles=9, target_score=0.8)
    assert not target.decide([0.5, 0.79]).stop
    assert target.decide([0.5, 0.81, 0.7]).reason.startswith("target_score: macro_f1 0.8100 reached 0.8")
    loss = StopPolicy(patience=0, metric="loss", lower_is_better=True, target_score=0.3)
    assert loss.decide([0.5, 0.29]).stop and not loss.decide([0.5, 0.31]).stop
    tokens = StopPolicy(patience=0, max_cycles=9, token_budget=10_000)
    assert not tokens.decide([0.1, 0.2], tokens=9_999).stop
    assert tokens.decide([0.1, 0.2], tokens=10_000).reason == "token_budget: 10000 of 10000 teacher tokens spent"
    cost = StopPolicy(patience=0, max_cycles=9, cost_budget=2.5)
    assert cost.decide([0.1, 0.2], cost=2.6).reason.startswith("cost_budget: 2.6000 of 2.5")
    assert not cost.decide([0.1, 0.2], cost=2.4).stop


def test_a_target_score_already_met_stops_the_embedded_run_after_cycle_0(toy_data, tmp_path):
    from pgkd.loop.config import DistillConfig
    from pgkd.loop.embedded import run
    config = DistillConfig(data=str(toy_data), labeled=40, student="tiny", teacher="pool-random", samples_per_cycle=8,
                           max_cycles=3, patience=5, epochs=2, cycle_epochs=1, learning_rate=1e-2,
                           head_learning_rate=1e-2, batch_size=16, target_score=0.0)
    report = run(config, tmp_path / "run", progress=False).report
    assert report.stop_reason.startswith("target_score") and len(report.cycles) == 1
    assert report.teacher_usage.calls == 0          # the teacher was never asked


def test_a_registry_without_the_cycles_value_is_metrics_unavailable():
    from prometheus_client import CollectorRegistry

    from pgkd.distributed.metrics_readers import RegistryReader
    from pgkd.loop.stopping import MetricsUnavailable
    with pytest.raises(MetricsUnavailable, match="no value for cycle"):
        RegistryReader(CollectorRegistry()).read("nothing", "macro_f1", 0)
