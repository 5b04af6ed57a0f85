"""The series' data: no sentence is both trained on and tested on, and what was dropped is counted."""

from mtl_utils.data import SPLITS, load_task
from mtl_utils.series import checkpoint_folder, repeats_dropped, series_task, series_tasks


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
