"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class DensekitError(Exception):
    """Bad input from the user: a missing file, a corrupt video, a mask that does not fit.

    The message is a single line meant for a person; the CLI prints it as ``error: <message>``
    and exits with code 2 instead of showing a traceback.
    """
