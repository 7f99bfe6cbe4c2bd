"""The reward-guided horizon search (relex_callback.engine.horizon) on score curves with a known answer."""

import math

import pytest

from relex_callback.engine.horizon import ProbeFailed, horizon_ladder, search_horizon, standard_error


def test_ladder_spans_the_window_end_to_the_cap_with_k_max():
    ladder = horizon_ladder(origin=0, last=20, cap=200, extra=[43.7])
    assert ladder == [30, 40, 43, 60, 80, 100, 120, 160, 200]
    assert horizon_ladder(origin=10, last=30, cap=50) == [40, 50]  # measured from start_step
    assert horizon_ladder(origin=0, last=20, cap=20) == []  # no room beyond the window


def test_standard_error_of_per_prompt_scores():
    scores = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    mean = sum(scores) / 8
    expected = math.sqrt(sum((s - mean) ** 2 for s in scores) / 7 / 8)
    assert standard_error(scores) == pytest.approx(expected)
    assert standard_error([1.0]) is None and standard_error(None) is None


def curve(peaks):
    """A score that rises linearly to ``peaks[family] = (K*, top)`` and falls after it."""
    calls = []

    def evaluate(family, target):
        calls.append((family, target))
        peak, top = peaks[family]
        return top - abs(target - peak) / 1000.0, None

    return evaluate, calls


def test_search_finds_the_peak_beyond_the_first_rungs_and_stops_each_family_after_it():
    ladder = [30, 40, 60, 80, 100, 120, 160, 200]
    evaluate, calls = curve({"trend": (100, 0.6), "scale": (40, 0.5)})
    search = search_horizon(["trend", "scale"], ladder, evaluate, current=0.3, margin=0.05)
    assert search.chosen.family == "trend" and search.chosen.target == 100
    # trend: 120 (0.58) is within the margin of the best 0.6, 160 (0.54) is not: the walk stops there, 200 unscored
    assert [t for f, t in calls if f == "trend"] == [30, 40, 60, 80, 100, 120, 160]
    # scale peaks at 40 (0.5): 60 (0.48) within the margin, 100 (0.44) below 0.5 − 0.05 stops it
    assert [t for f, t in calls if f == "scale"] == [30, 40, 60, 80, 100]
    assert "fell below the best so far" in search.stopped["scale"]
    assert len(search.calls) == len(calls)


def test_search_without_margin_stops_at_the_first_drop_and_takes_the_probe_standard_error():
    evaluate, calls = curve({"trend": (40, 0.6)})
    search = search_horizon(["trend"], [30, 40, 60, 80], evaluate, current=0.3, current_standard_error=0.1)
    assert search.margin == 0.1 and "standard error" in search.margin_source
    assert [t for _, t in calls] == [30, 40, 60, 80]  # 60 (0.58) and 80 (0.56) are within 0.1 of 0.6
    evaluate, calls = curve({"trend": (40, 0.6)})
    search = search_horizon(["trend"], [30, 40, 60, 80], evaluate, current=0.3)
    assert search.margin == 0.0 and [t for _, t in calls] == [30, 40, 60]


def test_search_never_chooses_below_the_trained_weights_unless_allowed():
    evaluate, _ = curve({"trend": (0, 0.5)})  # every rung scores 0.5 − target/1000, below θ_N
    search = search_horizon(["trend"], [30, 40], evaluate, current=0.49, margin=1.0)
    assert search.chosen is None
    search = search_horizon(["trend"], [30, 40], evaluate, current=0.49, margin=1.0, allow_worse=True)
    assert search.chosen.target == 30
    # a family whose first rung is already below θ_N − margin is not climbed further
    evaluate, calls = curve({"trend": (0, 0.5)})
    search_horizon(["trend"], [30, 40, 60], evaluate, current=0.49, margin=0.0)
    assert calls == [("trend", 30)]


def test_ties_go_to_the_nearer_target():
    search = search_horizon(["trend"], [30, 40, 60], lambda f, t: (0.5, None), current=0.3)
    assert search.chosen.target == 30


@pytest.mark.parametrize("bad", ["raise", "nan"])
def test_a_failing_probe_ends_the_search_with_nothing_chosen(bad):
    def evaluate(family, target):
        if target >= 60:
            if bad == "raise":
                raise ProbeFailed("the probe raised RuntimeError: out of memory")
            return math.nan, None
        return 0.9, None

    search = search_horizon(["trend", "scale"], [30, 40, 60, 80], evaluate, current=0.3)
    assert search.chosen is None and search.failure and "step 60" in search.failure
    assert [c.target for c in search.calls] == ([30, 40] if bad == "raise" else [30, 40, 60])
    assert "scale" not in search.stopped  # the next family never ran


def test_other_errors_propagate():
    def evaluate(family, target):
        raise FloatingPointError("non-finite predictions")

    with pytest.raises(FloatingPointError):
        search_horizon(["trend"], [30], evaluate, current=0.3)


def test_report_section_counts_cost_in_training_steps():
    search = search_horizon(["trend"], [30, 40], lambda f, t: (0.5, 0.01), current=0.3)
    for call in search.calls:
        call.seconds = 5.0
    section = search.as_dict(step_seconds=50.0)
    assert section["probe_calls"] == 3 and section["probe_seconds"] == 10.0 and section["step_equivalents"] == 0.2
    assert section["chosen"]["target_step"] == 30 and section["calls"][1]["step_equivalents"] == 0.1
