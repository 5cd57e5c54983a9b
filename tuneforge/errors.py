"""Errors a user sees as one line (the CLI prints them without a traceback)."""


class TuneforgeError(Exception):
    """Base class: bad input, unknown model, corrupt database, timed-out signal, ..."""


class InputError(TuneforgeError, ValueError):
    """A tensor or argument is wrong: shape, dtype, stride, device, world size."""


class ConfigRejected(TuneforgeError):
    """A config violates a template constraint (rejected before compiling)."""


class SignalTimeout(TuneforgeError, RuntimeError):
    """A bounded device-side wait expired; names the rank, peer and signal."""


class DatabaseError(TuneforgeError):
    """The tuning database is missing, corrupt, or from a newer schema."""


class UnknownModel(TuneforgeError, KeyError):
    def __str__(self):  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown model"
