"""User-facing errors: one line that names the problem and the fix."""


class SoftPromptError(Exception):
    """A mistake in what the user passed (file, name, input). The CLI prints it as one line, no traceback."""
