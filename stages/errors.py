"""The one error type for bad user input: the CLI prints its message as one line and exits non-zero."""


class UserError(Exception):
    """Input the user can fix (a path, a config field, a data file). The message names it and says what is wrong."""
