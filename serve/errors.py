"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class DensekitError(Exception):
    """Bad input from the user: a missing file, a corrupt video, a mask that does not fit.

    The message is a single line meant for a person; the CLI prints it as ``error: <message>``
    and exits with code 2 instead of showing a traceback.
    """


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``exc``'s message as one line for a person: whitespace collapsed, cut at ``limit`` characters.

    A message-less exception gives its type name, so ``error: `` is never followed by nothing.
    """
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
