"""The one error convention of every cxr_rf command.

Two kinds of failure are the user's to fix and are printed as ONE line, ``error: <message>``,
without a traceback:

    UserError   bad input: a flag, a config value, a file or directory that is missing or
                the wrong kind. Exit status 2 in every command.
    RunError    a run that cannot go on for a known, explained reason: no readable
                checkpoint, a streak of non-finite steps, too many rejected images.
                Exit status 1.

Everything else is a bug or an environment failure and keeps its traceback: commands catch
these two classes only (``cli.run``), never a bare ``ValueError``.

``UserError`` subclasses ``ValueError`` (and ``RunError`` ``RuntimeError``) so library callers
that already catch the builtin keep working; module-specific errors (``ConditionError``,
``ImageError``, ``RestoreError``, ...) subclass these two.
"""
from __future__ import annotations

EXIT_RUN = 1      # a RunError, or a command's own "no" (aot: does not fit)
EXIT_USAGE = 2    # a UserError: bad input


class UserError(ValueError):
    """Bad input the user can fix (flag, config value, path); one line, exit 2."""
    exit_code = EXIT_USAGE


class RunError(RuntimeError):
    """A run stopped for a known reason; one line, exit 1."""
    exit_code = EXIT_RUN
