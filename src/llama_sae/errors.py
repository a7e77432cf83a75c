"""Errors shown to users as one line, with the fix."""


class UserError(Exception):
    """A problem with the user's input; the message says what is wrong and how to fix it."""
