"""Errors that are the user's to fix. The CLI prints them without a traceback, exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (spec, data, model path, flags).

    ``message`` says what is wrong, ``where`` points at it (``file:line:col`` or a path) and
    ``hint`` says what to do. Raise it instead of letting a library traceback reach the user.
    """

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.where = where
        self.hint = hint

    def render(self) -> str:
        head = f"{self.where}: {self.message}" if self.where else self.message
        return f"{head}\n  hint: {self.hint}" if self.hint else head
