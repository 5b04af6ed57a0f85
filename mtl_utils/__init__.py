"""mtl_utils: the small library behind the multi-task sentence-transformer notebooks.

The flow is one way: offline (registry packages, the cache folder) -> backbone -> model -> freezing
-> features (and the caches behind it) -> evaluation -> training -> the notebooks. Importing the package
loads nothing heavy: the names below load their module on first use, so `python -m mtl_utils.cli --help`
answers at once.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "DATASETS": "data", "SENTIMENT_LABELS": "data", "TREC_LABELS": "data", "Task": "data", "load_task": "data",
    "task_from_dataframe": "data",
    "BACKBONES": "backbone", "BackboneSpec": "backbone", "BackboneUnavailableError": "backbone",
    "backbone_path": "backbone", "backbone_table": "backbone", "load_backbone": "backbone",
    "MultiTaskModel": "model", "TrainConfig": "recipes",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    try:
        return importlib.import_module(f".{name}", __name__)  # `mtl_utils.freezing` and the other modules
    except ModuleNotFoundError:
        raise AttributeError(f"module 'mtl_utils' has no attribute {name!r}") from None
