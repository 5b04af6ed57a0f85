"""Speed and memory measurements of the library and the notebooks, printed as markdown tables.

    python -m benchmarks             # what the caches and the shared backbone buy (`make bench`, ~4 min)
    python -m benchmarks notebooks   # each notebook's wall time and peak memory, and `make test` (`make bench-notebooks`)

Tables are also written as CSV to `results/benchmarks/`.
"""
