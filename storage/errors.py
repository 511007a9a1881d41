"""The base of errors caused by the user's input: the CLI prints them as one line, no type name."""


class UserError(Exception):
    """Bad input (a file, a row, a parameter, a name): the message says which and why."""
