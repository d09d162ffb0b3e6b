"""The error type for user mistakes: scripts print its message on one line and exit non-zero."""


class UserError(Exception):
    """Bad input from the user (a path, a file, an argument); the message says what and what was expected."""
