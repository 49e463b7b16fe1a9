"""Errors a user can fix. ``str(error)`` is one line: the problem, then the fix."""

from __future__ import annotations


class SlimformerError(Exception):
    """Base class of every error slimformer raises on bad input.

    The message is a single line of the form ``"<problem>; <fix>"`` so that the command line can
    print it as is and exit with status 2.
    """

    def __init__(self, problem: str, fix: str) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}; {fix}".replace("\n", " "))


class ConfigError(SlimformerError, ValueError):
    """An invalid method setting, recipe or evaluation setting."""


class ModelLoadError(SlimformerError):
    """A model path or hub id that cannot be loaded, or a corrupt checkpoint."""


class UnsupportedArchitectureError(SlimformerError):
    """A model whose family has no architecture adapter."""


class OutputExistsError(SlimformerError):
    """An output folder that already exists (and ``force`` was not given)."""


def is_int_at_least(value, minimum: int) -> bool:
    """Whether ``value`` is an int (not a bool) >= ``minimum``: the check behind every integer setting."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


class OutputWriteError(SlimformerError):
    """An output location that cannot be written (full disk, read-only, not a folder)."""


class InterruptedRunError(SlimformerError):
    """A run stopped (Ctrl-C) before its output was complete; nothing was written."""


def did_you_mean(word, choices) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``choices`` to ``word``, or ``""``."""
    import difflib

    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class ResumeError(SlimformerError):
    """A job that cannot be resumed: its work folder belongs to another recipe or model, is in
    use by a running job, or is unreadable."""
