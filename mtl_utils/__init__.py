"""mtl_utils: the small library behind the multi-task sentence-transformer notebooks."""

# --- datasets (mtl_utils.data) ---
from .data import DATASETS, SENTIMENT_LABELS, TREC_LABELS, Task, load_task, task_from_dataframe  # noqa: F401

# --- backbones (mtl_utils.backbones) ---
from .backbones import (  # noqa: F401
    BACKBONES, BackboneSpec, BackboneUnavailableError, backbone_path, backbone_table, embedding_module, load_backbone,
    transformer_layers,
)
