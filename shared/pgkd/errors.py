"""The one error type a user sees: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (a path, a file's content, an option). The message says what and where."""
