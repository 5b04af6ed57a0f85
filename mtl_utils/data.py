"""Datasets as DataFrames with fixed, seeded splits: a Task is a name, its label names and train/val/test."""

from __future__ import annotations

import csv
import dataclasses
import functools
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from .offline.assets import asset_path
from .recipes import DATASETS

SPLITS = ("train", "val", "test")
TREC_LABELS = ("DESC", "ENTY", "ABBR", "HUM", "NUM", "LOC")  # label-coarse 0..5, in this order
SENTIMENT_LABELS = ("negative", "positive")
TREC_TRAIN_ROWS = 5452  # rows 0..5451 of trec.csv are the official train set, the rest the 500-question test set

_RAW_ROWS = {"trec": 5952, "movies": 10605, "amazon": 3708, "nyt": 5190, "tweets": 4200}
_MAX_ROWS_SHOWN = 10
DUPLICATES = ("drop", "keep")  # what task_from_dataframe does with rows that repeat another row's text and label
_SPLIT_ORDER = {"test": 0, "val": 1, "train": 2, "": 3}  # which copy of a duplicate stays: test first; "" = to split


class DataWarning(UserWarning):
    """Something in the data that training can go on with, but you should know: duplicates, conflicting or
    look-alike labels, texts longer than the backbone reads."""


def check_task_name(name: object) -> str:
    """A task name that can name a head: a non-empty str without '.', and not a name torch's ModuleDict uses."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a task name must be a non-empty str, got {name!r}")
    if "." in name:
        raise ValueError(f"task name {name!r} contains '.', which cannot name a head (PyTorch module names use "
                         f"'.' as a separator); use e.g. {name.replace('.', '_')!r}")
    from torch import nn  # only here: the rest of this module needs no torch

    if hasattr(nn.ModuleDict(), name):
        raise ValueError(f"task name {name!r} is taken by PyTorch (nn.ModuleDict.{name}) and cannot name a head; "
                         f"use another name, e.g. {name + '_task'!r}")
    return name


def check_task_names(names: Sequence[object]) -> list[str]:
    """Task names that can each name a head, no two alike (one head per task)."""
    names = [check_task_name(n) for n in names]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"two tasks are named {', '.join(map(repr, twice))}: each task needs a name of its own "
                         f"(got {names})")
    return names


def check_texts(texts: Sequence[str]) -> list[str]:
    """The texts as a list of non-empty str; anything else is a clear error naming what is wrong."""
    if isinstance(texts, str):
        raise TypeError("expected a list of texts, got one string; wrap it in a list")
    if texts is None or isinstance(texts, Mapping) or not isinstance(texts, Sequence | pd.Series | np.ndarray):
        raise TypeError(f"expected a list of texts (str), got {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise ValueError("expected at least one text, got an empty list")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise ValueError(f"texts must be non-empty strings; positions {bad[:_MAX_ROWS_SHOWN]} are empty or not strings")
    unencodable = [i for i, t in enumerate(texts) if not _encodable(t)]
    if unencodable:
        raise ValueError(f"texts at positions {unencodable[:_MAX_ROWS_SHOWN]} are not valid Unicode (a lone surrogate, "
                         "e.g. from decoding bytes with errors='surrogateescape'); clean them before encoding")
    return texts


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True, eq=False)
class Task:
    """A classification task: label names and train/val/test DataFrames with columns id, text, label."""

    name: str
    label_names: tuple[str, ...]
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    description: str = ""

    @property
    def num_labels(self) -> int:
        """Number of classes; labels are ints in 0..num_labels-1."""
        return len(self.label_names)

    def split(self, name: str) -> pd.DataFrame:
        """The DataFrame of split `name`: "train", "val" or "test"."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; use one of {', '.join(map(repr, SPLITS))}")
        return getattr(self, name)

    def sizes(self, normalize: bool = False) -> pd.DataFrame:
        """Rows per label name (index) and split (columns), with totals; `normalize` gives fractions of each column."""
        counts = pd.DataFrame(
            {s: self.split(s)["label"].value_counts().reindex(range(self.num_labels), fill_value=0) for s in SPLITS}
        )
        counts.index = pd.Index(self.label_names, name="label")
        counts["total"] = counts.sum(axis=1)
        counts.loc["total"] = counts.sum()
        return counts / counts.loc["total"] if normalize else counts

    def with_train_sample(self, n: int, seed: int = 0) -> Task:
        """The same task with a fixed, stratified sample of `n` training rows (validation and test unchanged)."""
        if not 0 < n <= len(self.train):
            raise ValueError(f"n must be from 1 to the {len(self.train)} training rows of {self.name!r}; got {n}")
        if n == len(self.train):
            return self
        _, sample = _stratified_split(self.train, n, seed, "training sample", self.label_names)
        return dataclasses.replace(self, train=_finish(sample))

    def __repr__(self) -> str:
        labels = ", ".join(self.label_names[:8]) + (", ..." if self.num_labels > 8 else "")
        splits = ", ".join(f"{s}={len(self.split(s))}" for s in SPLITS)
        return f"Task({self.name!r}, {self.num_labels} labels: {labels}; {splits})"


def load_task(name: str, seed: int = 0, duplicates: str = "keep") -> Task:
    """A built-in dataset (see DATASETS) as a Task; the split is fixed for a given seed.

    `duplicates="keep"` (the default) gives the splits every notebook uses, as published: a few texts occur
    more than once, some in two splits (TREC: 21 texts, 10 of them in the official test set; movies: 1 text
    in train and test).
    `duplicates="drop"` keeps one copy of each (the official TREC test set stays whole) and says what it dropped.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    _check_choice("duplicates", duplicates, DUPLICATES)
    task = _build_task(name, seed, duplicates)
    # The cached Task must stay intact whatever the caller does with the frames it gets.
    return dataclasses.replace(task, train=task.train.copy(), val=task.val.copy(), test=task.test.copy())


def task_from_dataframe(
    name: str,
    df: pd.DataFrame,
    label_names: Sequence[str] | None = None,
    test: pd.DataFrame | None = None,
    val_size: float = 0.1,
    test_size: float = 0.1,
    seed: int = 0,
    description: str = "",
    duplicates: str = "drop",
    source: str = "df",
) -> Task:
    """A Task from your DataFrame with `text` and `label` columns, split stratified by label with `seed`.

    Labels are str class names (sorted, unless `label_names` fixes their order) or ints 0..n-1 with
    `label_names`. Sizes are fractions of `df`; with a `test` DataFrame only val is carved from `df`.
    A `split` column (values train, val, test) fixes each row's split; a split no row names is carved from
    the train rows (`val_size`, `test_size` are then fractions of them). The `id` column of every split holds
    the row's index label in `df` (or `test`); errors name rows by that label (name the index, e.g. "line", to
    have them named so) and name the data by `source`.

    Rows that repeat another row's text and label are dropped (`duplicates="drop"`), keeping one copy, in
    test if one is there, else in val, else in train: no text is trained on and tested on. A DataWarning
    says how many; `duplicates="keep"` keeps them (and warns). Texts with two different labels, and labels
    that differ only in case or surrounding spaces, are kept and warned about.
    """
    name = check_task_name(name)
    _check_choice("duplicates", duplicates, DUPLICATES)
    for what, frame in ((source, df), ("test", test)):
        if not isinstance(frame, pd.DataFrame) and (what != "test" or frame is not None):
            raise TypeError(f"{what} must be a pandas DataFrame with a 'text' and a 'label' column, got "
                            f"{type(frame).__name__}" + (" (pd.DataFrame(rows) makes one from a list of dicts)"
                                                         if isinstance(frame, list) else ""))
    inferred = label_names is None
    if label_names is not None:
        label_names = check_label_names(label_names)
    data, label_names = _clean(df, label_names, source)
    if test is not None:
        if "split" in df.columns:
            raise ValueError(f"{source} has a 'split' column and a test DataFrame was given: mark your test rows "
                             "split='test' in df, or leave out the split column")
        test_data, _ = _clean(test, label_names, "test")
        data = pd.concat([data.assign(split=""), test_data.assign(split="test")], ignore_index=True)
    elif "split" in df.columns:
        data["split"] = _check_splits(df["split"], source)
    else:
        data["split"] = ""
    if data["label"].nunique() < 2:
        only = label_names[data["label"].iloc[0]]
        raise ValueError(f"{source}: every row has the label {only!r}; a classification task needs at least two classes")
    what = f"task {name!r}"
    if duplicates == "drop":
        data = _drop_duplicates(data, what)
    splits = _carve(data, label_names, val_size, test_size, seed)
    if duplicates == "keep":
        _warn_kept_duplicates(splits, what)
    _warn_conflicting_labels(data, label_names, what)
    _warn_look_alike_labels(label_names, what, inferred)
    return Task(name, label_names, *(_finish(splits[s]) for s in SPLITS), description)


def _carve(data: pd.DataFrame, label_names: tuple[str, ...], val_size: float, test_size: float,
           seed: int) -> dict[str, pd.DataFrame]:
    """The three splits: rows with a split keep it; a missing val or test is carved from the rest, stratified."""
    given = {s: data[data["split"] == s].drop(columns="split") for s in SPLITS}
    pool = data[data["split"].isin(["", "train"])].drop(columns="split")
    if pool.empty:
        raise ValueError("df: no rows to train on; mark some rows split='train' (the split column accepts "
                         f"{', '.join(SPLITS)})")
    need_test, need_val = given["test"].empty, given["val"].empty
    if need_test and need_val:
        _check_fraction(val_size + test_size, "val_size + test_size")
    n_val = _count(val_size, len(pool), "val_size") if need_val else 0
    n_test = _count(test_size, len(pool), "test_size") if need_test else 0
    if need_test or need_val:
        _check_class_sizes(pool, label_names, 1 + need_test + need_val,
                           "/".join(["train", *(["val"] if need_val else []), *(["test"] if need_test else [])]))
    if need_test:
        pool, given["test"] = _stratified_split(pool, n_test, seed, "test", label_names)
    if need_val:
        pool, given["val"] = _stratified_split(pool, n_val, seed, "val", label_names)
    given["train"] = pool
    return given


def _check_splits(split: pd.Series, source: str = "df") -> np.ndarray:
    """The split column: every value train, val or test."""
    bad = ~split.isin(SPLITS)
    if bad.any():
        values = sorted({repr(v) for v in split[bad]})[:_MAX_ROWS_SHOWN]
        raise ValueError(f"{source}: split values {', '.join(values)} in {_rows(bad)} are not a split; the split column "
                         f"accepts {', '.join(SPLITS)} (leave the column out to split 80/10/10)")
    return split.to_numpy()


def _check_choice(name: str, value: object, known: Sequence[str]) -> None:
    if value not in known:
        raise ValueError(f"unknown {name} {value!r}; known: {', '.join(known)}")


def _drop_duplicates(data: pd.DataFrame, what: str) -> pd.DataFrame:
    """One row per (text, label): the copy in test if there is one, else val, else train."""
    order = data.assign(_rank=data["split"].map(_SPLIT_ORDER), _row=np.arange(len(data)))
    order = order.sort_values(["_rank", "_row"], kind="stable")
    keep = ~order.duplicated(["text", "label"])
    dropped = int((~keep).sum())
    if dropped:
        across = int((order.groupby(["text", "label"])["split"].nunique() > 1).sum())  # "" = still to split
        where = f" ({across} texts had copies in two of the splits given)" if across else ""
        warnings.warn(f"{what}: dropped {dropped} rows that repeat another row's text and label{where}; one copy of "
                      "each stays (in test if one is there, else val, else train), so no text is both trained on and "
                      "tested on. To keep every row: duplicates='keep' (command line: --duplicates keep)",
                      DataWarning, stacklevel=3)
    return order[keep].sort_values("_row").drop(columns=["_rank", "_row"])


def _warn_kept_duplicates(splits: dict[str, pd.DataFrame], what: str) -> None:
    """With duplicates='keep': how many rows repeat another, and how many texts sit in two splits."""
    rows = pd.concat([f.assign(split=s) for s, f in splits.items()], ignore_index=True)
    repeated = int(rows.duplicated(["text", "label"]).sum())
    if not repeated:
        return
    across = int((rows.groupby("text")["split"].nunique() > 1).sum())
    leak = (f", and {across} texts are in two splits (what is tested was trained on)" if across else "")
    warnings.warn(f"{what}: {repeated} rows repeat another row's text and label{leak}; kept (duplicates='keep'). "
                  "duplicates='drop' keeps one copy of each, in one split", DataWarning, stacklevel=3)


def _warn_conflicting_labels(data: pd.DataFrame, label_names: tuple[str, ...], what: str) -> None:
    """Texts that carry two or more labels: a model can get at most one of them right."""
    labels = data.groupby("text")["label"].unique()
    conflicting = labels[labels.map(len) > 1]
    if len(conflicting):
        text, ids = next(iter(conflicting.items()))
        example = f"{text[:60]!r}{'...' if len(text) > 60 else ''} is {' and '.join(label_names[i] for i in sorted(ids))}"
        warnings.warn(f"{what}: {len(conflicting)} texts carry two or more labels (e.g. {example}); a model can get "
                      "only one of them right. Fix the labels, or drop those rows", DataWarning, stacklevel=3)


def _warn_look_alike_labels(label_names: tuple[str, ...], what: str, inferred: bool) -> None:
    """Label names that differ only in case or surrounding spaces: one class written two ways?"""
    if not inferred:
        return
    groups: dict[str, list[str]] = {}
    for label in label_names:
        groups.setdefault(label.strip().casefold(), []).append(label)
    alike = [g for g in groups.values() if len(g) > 1]
    if alike:
        shown = "; ".join(" and ".join(map(repr, g)) for g in alike[:_MAX_ROWS_SHOWN])
        warnings.warn(f"{what}: labels {shown} differ only in case or surrounding spaces, so they are different "
                      "classes. If they are one class, write them one way (e.g. df['label'] = "
                      "df['label'].str.strip().str.lower())", DataWarning, stacklevel=3)


def _clean(df: pd.DataFrame, label_names: tuple[str, ...] | None, what: str) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """Check texts and labels; return a frame (id, text stripped, int label) and the label names."""
    missing = [c for c in ("text", "label") if c not in df.columns]
    if missing:
        raise ValueError(
            f"{what} has no {' and no '.join(map(repr, missing))} column (it has {list(df.columns)}); expected a "
            "'text' column of str and a 'label' column of str class names or int class ids with label_names"
        )
    if len(df) == 0:
        raise ValueError(f"{what} has no rows")
    texts, labels = df["text"], df["label"]
    not_str = ~texts.map(lambda t: isinstance(t, str)).astype(bool)
    if not_str.any():
        raise ValueError(f"{what}: missing or non-str text in {_rows(not_str)} "
                         f"(e.g. {texts[not_str].iloc[0]!r}); every text must be a non-empty str")
    texts = texts.astype(str).str.strip()
    empty = texts == ""
    if empty.any():
        raise ValueError(f"{what}: empty or whitespace-only text in {_rows(empty)}; every text must be a non-empty str")
    unencodable = ~texts.map(_encodable).astype(bool)
    if unencodable.any():
        raise ValueError(f"{what}: text that is not valid Unicode in {_rows(unencodable)} (a lone surrogate, e.g. from "
                         "decoding bytes with errors='surrogateescape'); clean it first")
    no_label = labels.isna() | labels.map(lambda v: isinstance(v, str) and not v.strip()).astype(bool)
    if no_label.any():
        raise ValueError(f"{what}: missing label (None, NaN or blank) in {_rows(no_label)}; every row needs a label")
    codes, label_names = _encode_labels(labels, label_names, what)
    data = pd.DataFrame({"id": df.index, "text": texts.to_numpy(), "label": codes.to_numpy()})
    return data, label_names


def _encode_labels(labels: pd.Series, label_names: tuple[str, ...] | None, what: str) -> tuple[pd.Series, tuple[str, ...]]:
    """Map str labels to their index in label_names (sorted names if None); check int labels are in range."""
    is_str = labels.map(lambda v: isinstance(v, str)).astype(bool)
    is_int = labels.map(lambda v: isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_)).astype(bool)
    accepted = "labels must be str class names, or int class ids 0..n-1 together with label_names"
    other = ~(is_str | is_int)
    if other.any():
        example = labels[other].iloc[0]
        example = example.item() if isinstance(example, np.generic) else example
        raise ValueError(f"{what}: label neither str nor int in {_rows(other)} "
                         f"(e.g. {example!r} of type {type(example).__name__}); {accepted} (float ids: use .astype(int))")
    if is_str.any() and is_int.any():
        raise ValueError(f"{what}: labels mix str and int, int labels in {_rows(is_int)}; {accepted}")
    if is_str.all():
        if label_names is None:
            label_names = tuple(sorted(set(labels)))
        unknown = ~labels.isin(label_names)
        if unknown.any():
            raise ValueError(f"{what}: labels {sorted(set(labels[unknown]))[:_MAX_ROWS_SHOWN]} in {_rows(unknown)} "
                             f"are not among the label names {label_names}")
        return labels.map({n: i for i, n in enumerate(label_names)}).astype("int64"), label_names
    if label_names is None:
        raise ValueError(f"{what}: int labels need label_names (the name of class 0, 1, ...); "
                         "pass label_names=... or give the labels as str class names")
    out = ~labels.map(lambda v: 0 <= v < len(label_names)).astype(bool)
    if out.any():
        raise ValueError(f"{what}: int labels {sorted(set(labels[out].tolist()))[:_MAX_ROWS_SHOWN]} in {_rows(out)} are "
                         f"outside 0..{len(label_names) - 1}, the ids of label_names {label_names}")
    return labels.astype("int64"), label_names


def check_label_names(label_names: Sequence[str], task: str = "") -> tuple[str, ...]:
    """label_names as a tuple of at least two distinct str."""
    what = f"task {task!r}: label names" if task else "label_names"
    if isinstance(label_names, str) or not isinstance(label_names, Sequence) \
            or not all(isinstance(n, str) for n in label_names):
        raise TypeError(f"{what} must be a list of str, got {label_names!r}"
                        + (f" (a str is not a list: [{label_names!r}]?)" if isinstance(label_names, str) else ""))
    names = tuple(label_names)
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"{what} must hold at least two distinct names, got {names}")
    return names


def _check_fraction(size: float, what: str) -> None:
    """A split size must be a fraction strictly between 0 and 1."""
    if not 0 < size < 1:
        raise ValueError(f"{what} must be a fraction strictly between 0 and 1, got {size}")


def _count(size: float, n: int, what: str) -> int:
    """Rows a fraction `size` of n rows gives; at least one."""
    _check_fraction(size, what)
    count = round(size * n)
    if count == 0:
        raise ValueError(f"{what}={size} of {n} rows gives an empty split; use more rows or a larger {what}")
    return count


def _check_class_sizes(data: pd.DataFrame, label_names: tuple[str, ...], minimum: int, splits: str) -> None:
    """Each class present needs `minimum` rows to appear on both sides of every stratified cut."""
    counts = data["label"].value_counts()
    small = counts[counts < minimum]
    if len(small):
        rows = data["label"].isin(small.index)
        named = {label_names[i]: int(c) for i, c in small.items()}
        raise ValueError(f"df: class(es) {named} in {_rows(rows)} are too small to stratify a {splits} split; "
                         f"each class needs at least {minimum} rows. Add rows, or merge or drop the rare class(es)")


def _stratified_split(data: pd.DataFrame, n_out: int, seed: int, what: str,
                      label_names: tuple[str, ...]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cut n_out rows off `data`, stratified by label; sklearn's limits turn into a readable error."""
    try:
        return train_test_split(data, test_size=n_out, stratify=data["label"], random_state=seed)
    except ValueError as error:
        counts = {label_names[i]: int(c) for i, c in data["label"].value_counts().sort_index().items()}
        raise ValueError(f"cannot carve a stratified {what} set of {n_out} rows from {len(data)} rows with class "
                         f"counts {counts}: {str(error).rstrip('.')}. Both sides need at least one row per class; "
                         f"change val_size/test_size or add rows") from None


def _finish(split: pd.DataFrame) -> pd.DataFrame:
    """Back in original row order, index 0..n-1."""
    return split.sort_index().reset_index(drop=True)


def _rows(mask: pd.Series) -> str:
    """'3 rows (index 4, 7, 9)', naming at most the first ten index labels."""
    index = mask.index[mask.to_numpy()].tolist()
    shown = ", ".join(map(repr, index[:_MAX_ROWS_SHOWN]))
    more = f" and {len(index) - _MAX_ROWS_SHOWN} more" if len(index) > _MAX_ROWS_SHOWN else ""
    return f"{len(index)} row{'s' if len(index) != 1 else ''} ({mask.index.name or 'index'} {shown}{more})"


@functools.lru_cache(maxsize=None)
def _read_raw(name: str) -> pd.DataFrame:
    """The verified data file of a built-in dataset as read from its package (shared: never modify)."""
    path = asset_path(name)
    if name == "trec":
        # First column is an unnamed row index 0..5951; some questions are quoted because they hold commas.
        raw = pd.read_csv(path, index_col=0, encoding="utf-8", keep_default_na=False, dtype={"text": str})
    else:
        # Tab-separated with unbalanced '"' inside texts: default quoting swallows rows (amazon 3546, nyt 5183).
        raw = pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, encoding="utf-8", index_col="id",
                          keep_default_na=False, dtype={"id": str, "text": str, "sentiment": float})
    if len(raw) != _RAW_ROWS[name]:
        raise RuntimeError(f"{name!r}: parsed {len(raw)} rows from {path.name}, expected {_RAW_ROWS[name]}")
    return raw


@functools.lru_cache(maxsize=32)
def _build_task(name: str, seed: int, duplicates: str = "keep") -> Task:
    """The Task of a built-in dataset (shared: load_task hands out copies)."""
    raw = _read_raw(name)
    with warnings.catch_warnings():
        if duplicates == "keep":  # the published splits, whose few duplicates load_task's docstring counts
            warnings.simplefilter("ignore", DataWarning)
        if name == "trec":
            df = raw.rename(columns={"label-coarse": "label"})[["text", "label"]]
            return task_from_dataframe(name, df.iloc[:TREC_TRAIN_ROWS], TREC_LABELS, test=df.iloc[TREC_TRAIN_ROWS:],
                                       val_size=0.1, seed=seed, description=DATASETS[name], duplicates=duplicates)
        rated = raw[raw["sentiment"] != 0]
        df = pd.DataFrame({"text": rated["text"], "label": (rated["sentiment"] > 0).astype("int64")})
        return task_from_dataframe(name, df, SENTIMENT_LABELS, val_size=0.1, test_size=0.1, seed=seed,
                                   description=DATASETS[name], duplicates=duplicates)
