from pgkd.stopping import StopPolicy


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
