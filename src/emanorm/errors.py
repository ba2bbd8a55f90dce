"""Errors a user can fix: the CLI prints their one-line message, never a traceback."""


class UserError(Exception):
    """Bad input from the user (a flag, a file, a config); the message says what and what is allowed."""
