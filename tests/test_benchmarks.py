"""The benchmarks' own logic: interleaving, statistics, tables, fixed subsets, process measurement (no model)."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest

import benchmarks.__main__ as cli
from benchmarks import common
from benchmarks.__main__ import DEFAULT, parse_args
from benchmarks.notebooks import measure
from mtl_utils.data import task_from_dataframe


def test_interleaved_alternates_cases_and_drops_warm_up():
    calls = []

    def case(name, seconds=None):
        def run():
            calls.append(name)
            return seconds
        return run

    times = common.interleaved({"a": case("a", 2.0), "b": case("b")}, repeats=3, warmup=1, progress=False)
    assert calls == ["a", "b", "b", "a"] * 2  # one warm-up round, then three timed ones; who goes first rotates
    assert times["a"] == [2.0, 2.0, 2.0]  # a case that measured itself is believed
    assert len(times["b"]) == 3 and all(0 <= t < 0.1 for t in times["b"])  # else timed from outside
    with pytest.raises(ValueError, match="at least 1"):
        common.interleaved({"a": case("a")}, repeats=0)
    raw = common.raw_rows("epoch", times)
    assert len(raw) == 6 and raw[0] == {"comparison": "epoch", "case": "a", "repeat": 1, "seconds": 2.0}


def test_summary_and_rows():
    s = common.Summary.of([3.0, 1.0, 2.0, 10.0, 2.5])
    assert (s.median, s.min, s.max, s.n) == (2.5, 1.0, 10.0, 5)
    assert s.spread == 10.0
    assert str(common.Summary.of([0.0123, 0.0125, 0.013])) == "0.013 [0.012–0.013]"
    with pytest.raises(ValueError):
        common.Summary.of([])

    times = {"cache": [1.0, 1.1, 0.9, 1.0, 1.2], "full": [3.0, 3.3, 2.9, 3.1, 3.0]}
    row = common.comparison_row("epoch", "tiny", "cache", "full", times, target=2, one_time=4.0)
    assert row["ratio"] == pytest.approx(3.0) and row["result"] == "3.00x faster"
    assert row["met"] == "yes" and row["target"] == "≥ 2x" and row["repeats"] == 5
    assert row["pays off after"] == "2.0 epochs"  # 4 s once, 2 s saved per epoch
    assert common.comparison_row("epoch", "tiny", "cache", "full", times, target=4)["met"] == "NO"
    slower = common.comparison_row("epoch", "tiny", "full", "cache", times, one_time=1.0)
    assert slower["pays off after"] == "never" and slower["met"] == ""

    over = common.overhead_row("inference", "tiny", "ours", "bare", {"ours": [1.04] * 5, "bare": [1.0] * 5}, 0.05)
    assert over["result"] == "+4.0% time" and over["met"] == "yes"
    assert common.overhead_row("inference", "tiny", "ours", "bare", {"ours": [1.1], "bare": [1.0]}, 0.05)["met"] == "NO"


def test_markdown_hides_machine_columns_and_empty_ones():
    table = pd.DataFrame([{"a": "x|y", "empty": "", "ratio": 2.0, "n": 1}, {"a": "z", "empty": None, "ratio": 1.0,
                                                                             "n": 2}])
    assert common.markdown(table).splitlines() == ["| a | n |", "|---|---|", "| x\\|y | 1 |", "| z | 2 |"]


def test_noise_note():
    quiet = pd.DataFrame([{"comparison": "a", "spread": 1.1}])
    busy = pd.DataFrame([{"comparison": "a", "spread": 1.1}, {"comparison": "b", "spread": 4.0}])
    assert common.noise_note(quiet) == ""
    assert "4.0x" in common.noise_note(busy) and "'b'" in common.noise_note(busy)
    short = {"cache": [0.03, 0.05, 0.04], "full": [3.0, 3.1, 3.2]}  # 0.02 s of jitter is not a busy machine
    assert common.comparison_row("epoch", "tiny", "cache", "full", short)["spread"] == pytest.approx(3.2 / 3.0)
    slow = {"cache": [0.3, 0.5, 0.4], "full": [3.0, 3.1, 3.2]}
    assert common.comparison_row("epoch", "tiny", "cache", "full", slow)["spread"] == pytest.approx(0.5 / 0.3)


def test_stratified_sample_is_fixed_sized_and_keeps_proportions():
    frame = pd.DataFrame({"text": [f"t{i}" for i in range(1000)], "label": [0] * 700 + [1] * 290 + [2] * 10})
    sample = common.stratified_sample(frame, 100, seed=0)
    assert len(sample) == 100
    assert sample["label"].value_counts().to_dict() == {0: 70, 1: 29, 2: 1}
    assert sample.equals(common.stratified_sample(frame, 100, seed=0))  # fixed
    assert not sample.equals(common.stratified_sample(frame, 100, seed=1))
    numbers = sample["text"].str[1:].astype(int)
    assert numbers.is_monotonic_increasing  # original order kept
    odd = common.stratified_sample(frame, 7, seed=0)  # largest remainders fill up to exactly n
    assert len(odd) == 7
    with pytest.raises(ValueError, match="from 1 to 1000"):
        common.stratified_sample(frame, 0)


def test_subset_task_samples_train_and_val_only():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"text": [f"sentence number {i}" for i in range(400)],
                          "label": rng.choice(["yes", "no"], 400)})
    task = task_from_dataframe("toy", frame, val_size=0.25, test_size=0.25, seed=0)
    small = common.subset_task(task, train_n=50, val_n=20)
    assert (len(small.train), len(small.val)) == (50, 20)
    assert small.test.equals(task.test) and small.label_names == task.label_names
    assert set(small.train["text"]) <= set(task.train["text"])
    assert len(common.subset_task(task, train_n=10_000, val_n=20).train) == len(task.train)  # capped


def test_measure_counts_the_whole_process_tree():
    child = "import time; x = bytearray(150 * 2**20); x[::4096] = b'1' * len(x[::4096]); time.sleep(0.6)"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}], check=True)"
    result = measure([sys.executable, "-c", parent], interval=0.05)
    assert result["returncode"] == 0 and result["seconds"] >= 0.6
    assert result["peak_rss_largest_mib"] >= 150  # the child, not the parent, holds the memory
    assert result["peak_rss_tree_mib"] >= result["peak_rss_largest_mib"]
    assert measure([sys.executable, "-c", "raise SystemExit(3)"])["returncode"] == 3


def test_command_line(monkeypatch):
    assert parse_args([]).suites == list(DEFAULT) and parse_args([]).repeats == common.MIN_REPEATS
    quick = parse_args(["layers", "notebooks", "--quick"])
    assert quick.suites == ["layers", "notebooks"] and quick.repeats == 2
    with pytest.raises(SystemExit):
        parse_args(["--repeats", "3"])  # fewer than 5 only for a smoke test
    with pytest.raises(SystemExit):
        parse_args(["everything"])

    # the notebooks get the environment `make` gives them, not the OpenMP setting the benchmarks add
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setattr(cli, "_ORIGINAL_ENV", {})
    assert "OMP_WAIT_POLICY" not in cli.notebook_env()
    monkeypatch.setattr(cli, "_ORIGINAL_ENV", {"OMP_WAIT_POLICY": "PASSIVE"})  # the user's own setting stays
    assert cli.notebook_env()["OMP_WAIT_POLICY"] == "PASSIVE"


# --- the deployment suite's own logic (no model) --------------------------------------------------------------

def test_deploy_suite_is_a_default_one_and_spreads_its_requests():
    from benchmarks import deploy

    assert "deploy" in DEFAULT and parse_args(["deploy", "--quick"]).suites == ["deploy"]
    texts = [f"t{i}" for i in range(10)]
    assert deploy.requests(texts, 3) == ["t0", "t4", "t9"]  # positions 0, 4.5, 9 (numpy rounds half to even)
    assert deploy.requests(texts, 10) == texts and deploy.requests(texts, 1) == ["t0"]
    with pytest.raises(ValueError, match="from 1 to 10"):
        deploy.requests(texts, 11)
    p50, p95 = deploy.percentiles_ms([0.001 * i for i in range(1, 101)])  # 1..100 ms
    assert p50 == pytest.approx(50.5) and p95 == pytest.approx(95.05)


def test_deploy_rows():
    from benchmarks import deploy

    times = {"int8": [1.0, 1.2, 0.8], "torch": [3.0, 3.3, 2.7]}
    row = deploy.throughput_row("int8", "torch", times, n=600, workload="w", target=2)
    assert row["this: median [range]"] == "600 [500–750] sentences/s"  # 600 sentences in 1.0 [0.8-1.2] s
    assert row["against: median [range]"] == "200 [182–222] sentences/s"
    assert row["result"] == "3.00x faster" and row["met"] == "yes" and "this: s, median [min–max]" not in row

    p50 = {"int8": [4.0, 5.0, 4.5], "torch": [20.0, 22.0, 18.0]}
    totals = {"int8": [0.4, 0.5, 0.45], "torch": [2.0, 4.4, 1.8]}
    lat = deploy.latency_row("p50", "int8", "torch", p50, totals, "w")
    assert lat["this: median [range]"] == "4.5 [4.0–5.0] ms" and lat["result"] == "4.44x faster"
    assert lat["spread"] == pytest.approx(4.4 / 1.8)  # whole repeats tell a busy machine, not single requests

    size = deploy.size_row("int8", "torch", {"int8": 23_000_000, "torch": 92_000_000}, target=3)
    assert size["result"] == "4.00x smaller" and size["met"] == "yes" and size["this: median [range]"] == "23.0 MB"
    assert deploy.size_row("int8", "torch", {"int8": 40, "torch": 100}, target=3)["met"] == "NO"

    gold = np.array([True] * 90 + [False] * 10)
    same = deploy.accuracy_row("trec", "int8", "torch", {"int8": gold, "torch": gold}, "w")
    assert same["met"] == "yes" and same["result"].startswith("+0.0 points") and "0 vs 0 differ" in same["result"]
    worse = gold.copy()
    worse[:3] = False  # 3 of 100 sentences lost: -3 points
    row = deploy.accuracy_row("trec", "int8", "torch", {"int8": worse, "torch": gold}, "w")
    assert row["met"] == "NO" and row["result"].startswith("-3.0 points") and "0 vs 3 differ" in row["result"]
    assert row["this: median [range]"].startswith("0.870 [")

    frame = deploy.table([size, lat, row])
    assert list(frame.columns[:4]) == ["comparison", "workload", "this", "this: median [range]"]
    assert frame["repeats"].tolist() == ["", 3, ""]
    lines = common.markdown(frame).splitlines()
    assert len(lines) == 5 and "| repeats |" in lines[0] and "| 4.5 [4.0–5.0] ms |" in lines[3]
