"""One exception family for everything a user can get wrong.

Each message says what was received, what was expected, and how to fix it.
"""
from __future__ import annotations


class AutoMLError(Exception):
    """Base class of every error automl raises on purpose."""


class DataError(AutoMLError, ValueError):
    """The dataset cannot be used as given."""


class SearchSpaceError(AutoMLError, ValueError):
    """A search-space file or override is invalid."""


class ModelLoadError(AutoMLError, OSError):
    """A backbone or an exported model cannot be loaded."""


class NoTrialScored(AutoMLError, RuntimeError):
    """The search ended without a single validation score."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during the search or the retrain: the run stopped there with what a resume needs saved, and nothing
    exported. A KeyboardInterrupt, so code that stops on Ctrl-C stops on it."""


def problem(what: str, got: object, expected: str, fix: str) -> str:
    """Format an error message in the house style."""
    return f"{what}: got {got!r}; expected {expected}. Fix: {fix}"
