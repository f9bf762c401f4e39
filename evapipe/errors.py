"""Exceptions evapipe raises for bad input: each says what is wrong and what to do next."""


class EvapipeError(Exception):
    """Base class: the CLI prints these as one clear line instead of a traceback."""


class ConfigError(EvapipeError, ValueError):
    """A job config is unknown, mistyped or impossible; raised before any model is loaded."""


class DataError(EvapipeError, ValueError):
    """The task data is missing, empty or lacks the fields the config names."""


class StateError(EvapipeError, ValueError):
    """A state file is corrupt, not an evapipe state, from a newer evapipe, or for another model."""


class ConvergenceError(EvapipeError, RuntimeError):
    """Layers were still unconverged when the batch budget ran out."""


class DistributedError(EvapipeError, RuntimeError):
    """Another rank failed; carries its error so every rank can stop with it."""


class StorageError(EvapipeError, OSError):
    """A file could not be written (full disk, I/O error, permissions); what was there before is left as it was."""
