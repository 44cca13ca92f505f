"""Errors that the command line prints as one line (no traceback)."""


class DistillError(Exception):
    """A problem with the user's input or setup, worded as what is wrong and how to fix it."""


class ConfigError(DistillError):
    """A recipe or override that does not validate."""


class CheckpointError(DistillError):
    """A checkpoint that is missing, corrupt, unsafe or of another model."""


class TrainingDiverged(DistillError):
    """The loss became NaN or infinite."""
