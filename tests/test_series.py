"""The series' data: no sentence is both trained on and tested on, and what was dropped is counted."""

import pytest

from mtl_utils.data import SPLITS, load_task
from mtl_utils.embedding_store import texts_key
from mtl_utils.offline.cache import fingerprint
from mtl_utils.series import (LAB_ENV, checkpoint_folder, lab_mode, repeats_dropped, series_data_key, series_task,
                              series_tasks)


def test_series_tasks_share_no_text_between_training_and_test():
    for task in series_tasks():
        seen = set(task.train.text) | set(task.val.text)
        assert not seen & set(task.test.text), task.name
        assert not set(task.train.text) & set(task.val.text), task.name


def test_the_official_trec_test_set_stays_whole():
    assert series_task("trec").test.text.tolist() == load_task("trec").test.text.tolist()


def test_repeats_dropped_counts_the_difference_to_the_published_splits():
    table = repeats_dropped(["trec", "movies"])
    for name in ("trec", "movies"):
        published, used = load_task(name), series_task(name)
        assert table.loc[name, "rows dropped"] == sum(len(published.split(s)) - len(used.split(s)) for s in SPLITS)
    assert table.loc["trec", "rows dropped"] > 0  # TREC repeats 10 official test questions in train/val


def test_the_checkpoint_is_named_by_backbone_and_data(tmp_path, monkeypatch):
    monkeypatch.setenv("MTL_UTILS_CACHE", str(tmp_path))
    folder = checkpoint_folder("all-MiniLM-L6-v2")
    assert folder.name.startswith("multitask-heads-all-MiniLM-L6-v2-") and folder == checkpoint_folder("all-MiniLM-L6-v2")


def test_the_data_key_is_computed_once_and_names_the_data():
    series_data_key.cache_clear()
    expected = fingerprint([], [(t.name, texts_key([*t.train.text, *t.val.text]), t.train.label.tolist(),
                                 t.val.label.tolist()) for t in series_tasks()])[:12]
    assert series_data_key() == expected and series_data_key.cache_info().misses == 1
    assert series_data_key() == expected and series_data_key.cache_info().hits == 1
    assert checkpoint_folder("x").name == f"multitask-heads-x-{expected}"


@pytest.mark.parametrize("value, expected", [(None, False), ("", False), ("0", False), ("1", True), (" 1 ", True)])
def test_lab_mode_reads_its_environment_variable(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(LAB_ENV, raising=False)
    else:
        monkeypatch.setenv(LAB_ENV, value)
    assert lab_mode() is expected


def test_lab_mode_refuses_a_value_it_does_not_know(monkeypatch):
    monkeypatch.setenv(LAB_ENV, "yes")
    with pytest.raises(ValueError, match=r"MTL_UTILS_LAB is 'yes'; accepted: 1 .* 0 or unset"):
        lab_mode()
