"""nbval settings for the notebooks under `make test`."""

# nbval waits a fixed 5 seconds (IPyNbCell.output_timeout) for each output message once a cell has finished.
# On a busy machine (a learner's laptop, a shared CI runner) the kernel can take longer than that to flush the
# outputs of a long cell, and the cell fails although it ran. Pytest's collection hook lets us raise it.
OUTPUT_TIMEOUT = 120


def pytest_collection_modifyitems(items):
    for item in items:
        if hasattr(item, "output_timeout"):
            item.output_timeout = OUTPUT_TIMEOUT
