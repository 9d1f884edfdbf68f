"""User errors: each message is one paragraph that names the problem, then the fix.

These are raised before Ray starts wherever the problem can be seen on the driver. Anything else
that escapes is our bug, and the console reports it as such.
"""


class RaylmUserError(ValueError):
    """A problem with what the user asked for (arguments, files, models), not a bug in raylm.

    Subclasses ValueError so code written against Simple Transformers that catches ValueError
    keeps working.
    """

    def __init__(self, problem: str, fix: str):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem.rstrip('.')}. {fix.rstrip('.')}.")


class ConfigError(RaylmUserError):
    """An unknown argument, or a value outside what a field accepts."""


class DataError(RaylmUserError):
    """A training or evaluation file that is missing, empty, binary or not UTF-8."""


class ModelError(RaylmUserError):
    """A model type, name, tokenizer or size that does not fit the requested training."""


class OutputDirError(RaylmUserError):
    """An output folder that would be overwritten or cannot be written."""


class ClusterError(RaylmUserError):
    """A Ray cluster that cannot run the requested workers."""
