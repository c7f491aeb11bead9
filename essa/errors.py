"""Errors that the CLI reports as one line and a non-zero exit, without a traceback."""


class EssaError(Exception):
    """A problem the user can fix: bad input, a missing file, a model that cannot be loaded."""

    exit_code = 2


class RecipeError(EssaError):
    """A recipe key is unknown, has the wrong type or value, or names a missing file."""

    def __init__(self, source: str, key: str, message: str) -> None:
        self.source, self.key = source, key
        super().__init__(f"{source}: {key}: {message}")
