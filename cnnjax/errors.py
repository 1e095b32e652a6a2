"""Errors meant for the user: the command-line tools print their message on one line and exit
non-zero, instead of a traceback. Anything else that escapes is a bug and keeps its traceback."""


class CnnjaxError(Exception):
    """Base class of the errors a user can fix (bad name, missing data, wrong workdir...)."""


class UnknownNameError(CnnjaxError, ValueError):
    """A registry was asked for a name it does not have."""


class ConfigError(CnnjaxError, ValueError):
    """The configuration is inconsistent (e.g. a batch that does not split over the devices)."""


class InputTooSmallError(ConfigError):
    """A layer of a model gets an empty input, or a window larger than its input: the images are
    too small for the model."""


class DataUnavailableError(CnnjaxError):
    """A dataset is neither prepared, nor found locally, nor downloadable."""


class CheckpointError(CnnjaxError):
    """A workdir or checkpoint cannot be used with this configuration."""


class TrainingDivergedError(CnnjaxError):
    """The loss became non-finite; the last good checkpoint is kept."""


def unknown_name(kind: str, name: str, valid) -> UnknownNameError:
    """The standard 'unknown X' error that lists the valid names."""
    return UnknownNameError(f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(valid))}")


class ExportError(CnnjaxError):
    """An export directory that cannot be written, or read back (``tools.export``)."""
