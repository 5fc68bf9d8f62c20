"""The one error type the command line reports as a single line (exit status 2)."""


class UsageError(Exception):
    """Bad input or an unusable run: reported as one line on stderr, exit status 2."""


def one_line(error):
    """An error's message with its whitespace collapsed, for a one-line report."""
    return " ".join(str(error).split())
