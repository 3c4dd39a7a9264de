"""Mixture specs and the seeded selection plan: deterministic, rank-independent, exact counts."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter

import pytest

from vlmtrain.config_sources import parse_source_spec
from vlmtrain.data.mixture import (
    format_mixture_table,
    plan_mixture,
    planned_count,
    summarize_mixture,
)

SOURCES = {"r2r": 40, "rxr": 25, "llava": 7, "empty": 0}
PERCENTS = {"r2r": 50.0, "rxr": 230.0, "empty": 300.0}  # llava: not listed -> 100 %


@pytest.mark.parametrize(
    "spec, want",
    [("r2r_125cm_0_30%50", ("r2r_125cm_0_30", 50.0)), ("llava", ("llava", 100.0)),
     ("a%12.5", ("a", 12.5)), (" b%250 ", ("b", 250.0)), ("c%0", ("c", 0.0))],
)
def test_parse_source_spec(spec: str, want: tuple[str, float]) -> None:
    assert parse_source_spec(spec) == want


@pytest.mark.parametrize("spec", ["", "%50", "a%", "a%-5", "a%x", "a%5%5", "a%1e3"])
def test_parse_source_spec_errors(spec: str) -> None:
    with pytest.raises(ValueError, match="source spec"):
        parse_source_spec(spec)


def test_plan_is_a_pure_function_of_its_arguments() -> None:
    a = plan_mixture(SOURCES, PERCENTS, seed=7)
    assert plan_mixture(dict(SOURCES), dict(PERCENTS), seed=7) == a
    assert plan_mixture(SOURCES, PERCENTS, seed=8) != a
    # another source added in front does not change this source's selection
    more = plan_mixture({"extra": 9, **SOURCES}, PERCENTS, seed=7)
    assert [p for p in more if p[0] != "extra"] == a


def test_plan_identical_across_processes() -> None:
    """Every rank is its own process: no hash() randomisation may leak into the plan."""
    code = (
        "import json,sys; from vlmtrain.data.mixture import plan_mixture; "
        "print(json.dumps(plan_mixture(json.loads(sys.argv[1]), json.loads(sys.argv[2]), 7)))"
    )
    plans = []
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        out = subprocess.run(
            [sys.executable, "-c", code, json.dumps(SOURCES), json.dumps(PERCENTS)],
            env=env, capture_output=True, text=True, check=True,
        ).stdout
        plans.append([tuple(p) for p in json.loads(out)])
    assert plans[0] == plans[1] == plan_mixture(SOURCES, PERCENTS, seed=7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_counts_and_sampling_rules(seed: int) -> None:
    plan = plan_mixture(SOURCES, PERCENTS, seed)
    counts = summarize_mixture(plan)
    for name, n in SOURCES.items():
        pct = PERCENTS.get(name, 100.0)
        want = math.floor(n * pct / 100 + 0.5)
        assert counts.get(name, 0) == want
        picked = Counter(i for s, i in plan if s == name)
        assert all(0 <= i < n for i in picked)
        whole, rest = divmod(want, n) if n else (0, 0)
        # down-sampling never repeats; up-sampling repeats every index whole or whole+1 times
        assert sorted(Counter(picked.values()).items()) == sorted(
            {k: v for k, v in {whole: n - rest, whole + 1: rest}.items() if k and v}.items()
        )
    # plan order: source by source as given, ascending indices within a source
    names = [s for s, _ in plan]
    assert names == sorted(names, key=list(SOURCES).index)
    for name in SOURCES:
        idx = [i for s, i in plan if s == name]
        assert idx == sorted(idx)


def test_planned_count_rounds_half_up() -> None:
    assert [planned_count(3, 50), planned_count(5, 50), planned_count(4, 12.5)] == [2, 3, 1]
    with pytest.raises(ValueError):
        planned_count(3, -1)


def test_unknown_source_and_zero_percent() -> None:
    with pytest.raises(ValueError, match="unknown source"):
        plan_mixture({"a": 3}, {"b": 50}, seed=0)
    assert plan_mixture({"a": 3}, {"a": 0}, seed=0) == []


def test_table_lists_every_source() -> None:
    plan = plan_mixture(SOURCES, PERCENTS, seed=0)
    table = format_mixture_table(SOURCES, PERCENTS, plan)
    counts = summarize_mixture(plan)
    rows = {line.split()[0]: line.split() for line in table.splitlines() if line and line[0] != "-"}
    for name, n in SOURCES.items():
        assert rows[name][1] == str(n) and rows[name][3] == str(counts.get(name, 0))
    assert rows["total"][2] == str(len(plan))
