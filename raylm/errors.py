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

    def __reduce__(self):
        # Raised in a Ray worker, it crosses a process boundary: rebuild it from (problem, fix).
        return (self.__class__, (self.problem, self.fix))


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


class DivergenceError(RaylmUserError):
    """The training loss became NaN or infinite."""


class TrainingFailed(RuntimeError):
    """A worker or the Ray Train controller failed: the root cause in one paragraph, the traceback in a log file."""


def root_cause(error: BaseException) -> BaseException:
    """The user-level exception inside Ray's wrappers (RayTaskError keeps it as `.cause`, UserCodeException as
    `__cause__`)."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = getattr(error, "cause", None) or error.__cause__
        if not isinstance(inner, BaseException):
            break
        error = inner
    return error
