"""The one exception type a user ever sees: what is wrong and what to do about it."""


class KronaError(Exception):
    """A user-facing failure (bad input, bad configuration, a file that cannot be used).

    The CLI prints the message as one red line and exits with code 2; library code raises it and never prints.
    """

    exit_code = 2
