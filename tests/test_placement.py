"""Placement: strategies choosing holders from observed calls and run times, replicas, capacities,
give(), hysteresis and the sliding window. Pure Python, explicit clocks."""
from __future__ import annotations

import random

import pytest

from microswarm.coordinator.placement import BUCKETS, STRATEGIES, AgentView, Placement

pytestmark = pytest.mark.timeout(30)


def agents(*caps: int, slots: int = 2) -> list[AgentView]:
    return [AgentView(f"a{i}", cap, slots) for i, cap in enumerate(caps)]


def load(p: Placement, service: str, calls: int, run_ms: float, at: float = 0.0) -> None:
    for _ in range(calls):
        p.observe(service, run_ms, now=at)


def holders(plan: dict[str, set[str]], service: str) -> set[str]:
    return {a for a, held in plan.items() if service in held}


# calls, ms: common ranks A, E first; expensive B, F; combined (calls x ms) C, D
CRAFTED = {"A": (200, 1), "E": (150, 2), "C": (40, 100), "D": (30, 120), "B": (1, 1000), "F": (2, 900)}


@pytest.mark.parametrize(("strategy", "expected"), [
    ("common", {"A", "E"}), ("expensive", {"B", "F"}), ("combined", {"C", "D"}),
])
def test_strategies_choose_holders_from_calls_and_run_times(strategy: str, expected: set[str]) -> None:
    p = Placement(strategy, rng=random.Random(1))
    for s, (calls, ms) in CRAFTED.items():
        load(p, s, calls, ms)
    plan = p.plan(agents(1, 1), sorted(CRAFTED), now=1.0)
    held = set().union(*plan.values())
    assert held == expected
    assert all(len(h) == 1 for h in plan.values())
    assert p.ranking()[:2] == sorted(expected, key=lambda s: -p.score(s, now=1.0))


def test_scores_follow_the_window() -> None:
    p = Placement("combined", window_s=60.0)
    load(p, "x", 30, 10.0)
    load(p, "x", 30, 30.0, at=5.0)
    assert p.calls_per_min("x", now=10.0) == pytest.approx(60.0)
    assert p.mean_run_ms("x", now=10.0) == pytest.approx(20.0)
    assert p.score("x", now=10.0) == pytest.approx(1200.0)
    assert Placement("all").score("x") == 1.0


def test_sliding_window_forgets_old_calls_and_stays_bounded() -> None:
    p = Placement("common", window_s=120.0)
    load(p, "old", 10, 5.0, at=0.0)
    assert p.calls_per_min("old", now=60.0) == pytest.approx(5.0)
    load(p, "old", 4, 15.0, at=100.0)
    assert p.mean_run_ms("old", now=121.5) == pytest.approx(15.0)  # the first 10 calls left
    assert p.calls_per_min("old", now=221.5) == 0.0
    assert p.mean_run_ms("old", now=221.5) == 0.0
    for i in range(20_000):
        p.observe("hot", 1.0, now=1000.0 + i * 0.05)
    assert p.calls_per_min("hot", now=1999.95) == pytest.approx(2400 * 60 / 120, rel=0.01)
    assert len(p._windows["hot"].buckets) <= BUCKETS + 1


def test_unknown_strategy_names_the_choices() -> None:
    with pytest.raises(ValueError) as err:
        Placement("cheapest")
    for name in STRATEGIES:
        assert name in str(err.value)


def test_all_places_every_service_even_unused() -> None:
    p = Placement("all")
    plan = p.plan(agents(0, 0), ["x", "y", "z"], now=0.0)
    assert plan == {"a0": {"x", "y", "z"}, "a1": {"x", "y", "z"}}


def test_all_honours_max_packages_by_total_work_then_name() -> None:
    p = Placement("all")
    load(p, "z", 10, 50.0)   # most work
    load(p, "y", 10, 1.0)
    plan = p.plan(agents(0, 1, 2, 3), ["w", "x", "y", "z"], now=1.0)
    assert plan["a0"] == {"w", "x", "y", "z"}
    assert plan["a1"] == {"z"}
    assert plan["a2"] == {"z", "y"}
    assert plan["a3"] == {"z", "y", "w"}   # unused ones tie at zero: by name


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_max_packages_respected_in_every_strategy(strategy: str) -> None:
    p = Placement(strategy, rng=random.Random(3))
    names = [f"s{i}" for i in range(12)]
    for i, s in enumerate(names):
        load(p, s, 5 + i * 7, 1.0 + i)
    fleet = agents(1, 2, 3, 0)
    plan = p.plan(fleet, names, now=1.0)
    for a in fleet:
        if a.max_packages:
            assert len(plan[a.agent_id]) <= a.max_packages
            assert p.holds(a.agent_id) == plan[a.agent_id]
    assert plan["a3"]  # the unlimited agent takes its share
    # give() respects the same capacities
    for s in ("new1", "new2", "new3"):
        got = p.give(s, fleet[:3], now=2.0)
        if got is not None:
            assert len(p.holds(got)) <= next(a.max_packages for a in fleet if a.agent_id == got)


@pytest.mark.parametrize("strategy", ["common", "expensive", "combined", "arbitrary"])
def test_unused_services_are_placed_on_nobody(strategy: str) -> None:
    p = Placement(strategy, rng=random.Random(0))
    load(p, "used", 3, 10.0)
    plan = p.plan(agents(0, 0, 0), ["used", "idle1", "idle2"], now=1.0)
    assert set().union(*plan.values()) == {"used"}


def test_replicas_grow_with_load() -> None:
    p = Placement("common", rng=random.Random(0))
    fleet = agents(0, 0, 0, 0, 0, 0, 0, 0)
    load(p, "hot", 100, 5.0)
    load(p, "cold", 5, 5.0)
    plan = p.plan(fleet, ["hot", "cold"], now=1.0)
    assert len(holders(plan, "cold")) == 1
    assert len(holders(plan, "hot")) == 8
    load(p, "cold", 95, 5.0, at=2.0)       # now as common as hot
    plan = p.plan(fleet, ["hot", "cold"], now=40.0)
    assert len(holders(plan, "cold")) == 8
    load(p, "cold", 800, 5.0, at=41.0)     # now 9x hot: hot shrinks once its young holdings aged
    plan = p.plan(fleet, ["hot", "cold"], now=80.0)
    assert len(holders(plan, "hot")) == 2   # ceil(8 * 2 * 100/1000)
    assert len(holders(plan, "cold")) == 8


def test_arbitrary_gives_equal_replicas_and_is_deterministic_given_rng() -> None:
    def run() -> dict[str, set[str]]:
        p = Placement("arbitrary", rng=random.Random(42))
        for i, s in enumerate(["a", "b", "c", "d"]):
            load(p, s, 1 + 50 * i, 1.0 + i * 100)
        return p.plan(agents(*[0] * 8), ["a", "b", "c", "d"], now=1.0)

    plan = run()
    assert [len(holders(plan, s)) for s in "abcd"] == [4, 4, 4, 4]   # ceil(8 * 2 / 4)
    assert run() == plan


def test_capacity_short_top_ranked_win_and_coverage_beats_replicas() -> None:
    p = Placement("common", rng=random.Random(0))
    load(p, "big", 1000, 1.0)
    load(p, "mid", 10, 1.0)
    load(p, "small", 1, 1.0)
    plan = p.plan(agents(1, 1), ["big", "mid", "small"], now=1.0)
    # big alone would want both agents; one holder each for big and mid comes first
    assert len(holders(plan, "big")) == 1 and len(holders(plan, "mid")) == 1
    assert not holders(plan, "small")


def test_give_picks_the_emptiest_agent_then_most_slots_and_none_when_full() -> None:
    p = Placement("common", rng=random.Random(0))
    fleet = [AgentView("small", 2, 1), AgentView("big", 2, 4), AgentView("mid", 2, 2)]
    assert p.give("x", fleet, now=0.0) == "big"      # all empty: most slots
    assert p.give("y", fleet, now=0.0) == "mid"      # big has one now
    assert p.give("x", fleet, now=0.0) == "big"      # already held: its holder
    assert p.give("z", fleet, now=0.0) == "small"    # fewest planned
    for s in ("u", "v", "w"):
        assert p.give(s, fleet, now=0.0) is not None
    assert p.give("full", fleet, now=0.0) is None
    assert sum(len(p.holds(a.agent_id)) for a in fleet) == 6


def test_given_service_is_held_for_min_hold_then_dropped_if_never_called() -> None:
    p = Placement("combined", min_hold_s=30.0, rng=random.Random(0))
    fleet = agents(0, 0)
    who = p.give("x", fleet, now=100.0)
    assert who is not None and "x" in p.holds(who)
    assert p.plan(fleet, ["x"], now=110.0)[who] == {"x"}
    assert not any(p.plan(fleet, ["x"], now=131.0).values())


def test_service_out_of_the_window_keeps_its_holder_for_min_hold() -> None:
    p = Placement("common", window_s=10.0, min_hold_s=30.0, rng=random.Random(0))
    fleet = agents(0, 0)
    load(p, "x", 5, 1.0, at=0.0)
    plan = p.plan(fleet, ["x"], now=1.0)
    assert p.calls_per_min("x", now=20.0) == 0.0
    assert p.plan(fleet, ["x"], now=20.0) == plan
    assert not any(p.plan(fleet, ["x"], now=31.0).values())


def test_small_score_changes_do_not_move_packages_large_ones_do() -> None:
    p = Placement("common", rng=random.Random(5))
    fleet = agents(1, 1)
    names = ["a", "b", "c"]
    load(p, "a", 100, 1.0)
    load(p, "b", 90, 1.0)
    load(p, "c", 80, 1.0)
    first = p.plan(fleet, names, now=1.0)
    assert set().union(*first.values()) == {"a", "b"}
    load(p, "c", 15, 1.0, at=2.0)          # c now above b, but only 19% above its last score
    for t in (5.0, 10.0, 40.0, 80.0):
        assert p.plan(fleet, names, now=t) == first
    load(p, "c", 40, 1.0, at=81.0)         # 135 calls: re-ranked above b, which gives way
    plan = p.plan(fleet, names, now=82.0)
    assert set().union(*plan.values()) == {"a", "c"}
    assert holders(plan, "a") == holders(first, "a")   # untouched
    assert p.ranking() == ["c", "a", "b"]


def test_young_holdings_survive_a_replica_cut_until_min_hold() -> None:
    p = Placement("combined", min_hold_s=30.0, rng=random.Random(0))
    fleet = agents(0, 0, 0, 0)
    load(p, "a", 10, 10.0)
    assert len(holders(p.plan(fleet, ["a", "b"], now=1.0), "a")) == 4
    load(p, "b", 90, 10.0, at=2.0)
    plan = p.plan(fleet, ["a", "b"], now=3.0)
    assert len(holders(plan, "a")) == 4     # wants 1 now, but its holdings are 2 s old
    assert len(holders(plan, "b")) == 4
    plan = p.plan(fleet, ["a", "b"], now=40.0)
    assert len(holders(plan, "a")) == 1


def test_young_holding_gives_way_to_a_higher_ranked_service() -> None:
    p = Placement("common", min_hold_s=30.0, rng=random.Random(0))
    fleet = agents(1)
    assert p.give("low", fleet, now=0.0) == "a0"
    load(p, "top", 50, 1.0, at=1.0)
    assert p.plan(fleet, ["low", "top"], now=2.0) == {"a0": {"top"}}


def test_newcomer_displaces_the_lowest_ranked_holding() -> None:
    p = Placement("common", rng=random.Random(0))
    fleet = agents(1, 1)
    load(p, "b", 50, 1.0)
    load(p, "c", 10, 1.0)
    first = p.plan(fleet, ["a", "b", "c"], now=1.0)
    load(p, "a", 500, 1.0, at=2.0)
    plan = p.plan(fleet, ["a", "b", "c"], now=3.0)
    assert holders(plan, "b") == holders(first, "b")
    assert holders(plan, "a") == holders(first, "c")


def test_forget_removes_an_agent() -> None:
    p = Placement("combined", rng=random.Random(0))
    fleet = agents(1, 1)
    load(p, "x", 10, 1.0)
    load(p, "y", 5, 1.0)
    p.plan(fleet, ["x", "y"], now=1.0)
    assert p.holds("a0") and p.holds("a1")
    p.forget("a0")
    assert p.holds("a0") == set()
    assert p.give("z", fleet[1:], now=2.0) is None   # a1 is full and a0 is gone
    assert "a0" not in p.plan(fleet[1:], ["x", "y"], now=3.0)
    assert p.holds("nobody") == set()


def test_due_after_interval() -> None:
    p = Placement("common", interval_s=5.0)
    assert p.due(now=0.0)
    p.plan(agents(0), [], now=10.0)
    assert not p.due(now=14.9)
    assert p.due(now=15.0)
