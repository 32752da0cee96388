import pytest
from pgkd.allocation import allocate


def test_splits_in_proportion_and_sums_to_total():
    out = allocate({"a": 3.0, "b": 1.0}, 8)
    assert out == {"a": 6, "b": 2}


def test_largest_remainder_and_deterministic_ties():
    out = allocate({"a": 1.0, "b": 1.0, "c": 1.0}, 4)
    assert sum(out.values()) == 4
    assert out == allocate({"a": 1.0, "b": 1.0, "c": 1.0}, 4)
    assert sorted(out.values()) == [1, 1, 2]


def test_minimum_and_capacity_are_respected():
    out = allocate({"a": 100.0, "b": 0.0, "c": 0.0}, 10, minimum=2, capacity={"a": 5, "b": 9, "c": 9})
    assert out["a"] == 5 and out["b"] >= 2 and out["c"] >= 2
    assert sum(out.values()) == 10


def test_total_beyond_capacity_is_capped():
    assert allocate({"a": 1.0, "b": 1.0}, 50, capacity={"a": 3, "b": 4}) == {"a": 3, "b": 4}


def test_impossible_minimum_raises():
    with pytest.raises(ValueError):
        allocate({"a": 1.0, "b": 1.0, "c": 1.0}, 2, minimum=1)
