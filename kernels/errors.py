"""The project's one error family.

Every error a user can act on derives from PretrainError and carries the exit code its entry
point returns; `pretrain.cli.run` catches the family in one place, prints one line and exits with
that code. Anything else is a bug and keeps its traceback.

This module lives in kernels/, the bottom room (kernels imports nothing of ours), so that every
room -- kernels, model, pretrain, launch, bench -- can import it without an arrow pointing up.
"""

from __future__ import annotations

import difflib


class PretrainError(Exception):
    """A problem the user can fix; the message says what and how."""

    exit_code = 1


class ConfigError(PretrainError, ValueError):
    """A wrong config key, value or size; raised before any process group starts."""

    exit_code = 2


class UsageError(PretrainError, ValueError):
    """A wrong command-line argument (a path, a size, a host list)."""

    exit_code = 2


class EnvironmentCheckError(PretrainError):
    """The machine cannot run what the config asks for (no GPU for triton, no async-io op, a full disk);
    found before any process group starts."""

    exit_code = 5


def did_you_mean(name: str, choices) -> str:
    """'; did you mean 'x'?' when `name` is close to one of `choices`, else ''."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""
