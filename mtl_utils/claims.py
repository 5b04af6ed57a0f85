"""The claims a notebook's text makes, checked against the numbers of the run that prints them.

Under `make run` and `make test` (MTL_UTILS_STRICT_CLAIMS=1) a claim that no longer holds raises, so text that a
rerun made stale fails the build. A reader who changes a parameter to experiment gets one friendly line instead:
their run's numbers no longer support that sentence, which is what experimenting is for.
"""

from __future__ import annotations

import os

STRICT_ENV = "MTL_UTILS_STRICT_CLAIMS"


class StaleClaim(AssertionError):
    """A claim of the text that this run's numbers no longer support (raised under `make run` / `make test`)."""


def strict() -> bool:
    """True under `make run` and `make test`: a failed claim stops the notebook."""
    return os.environ.get(STRICT_ENV, "") == "1"


def claim(holds: bool, sentence: str) -> bool:
    """Check one claim of the text (`sentence`, as the text says it); True if this run supports it."""
    if holds:
        return True
    if strict():
        raise StaleClaim(f"the text says: {sentence!r}, and this run's numbers do not support it: reread the text "
                         "against the outputs above")
    print(f"Note: with this run's numbers, the text's claim {sentence!r} does not hold. Expected if you changed a "
          "parameter: the saved notebook shows the run the text describes.")
    return False
