"""mtl_utils: the small library behind the multi-task sentence-transformer notebooks."""

# --- datasets (mtl_utils.data) ---
from .data import DATASETS, SENTIMENT_LABELS, TREC_LABELS, Task, load_task, task_from_dataframe  # noqa: F401
