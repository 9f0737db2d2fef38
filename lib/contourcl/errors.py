"""Errors that name the problem with a user's input.

Every error a clinician or a client can trigger derives from :class:`ContourCLError`, a
``ValueError``, so that the server answers it as a bad request and keeps serving.
"""


class ContourCLError(ValueError):
    """Base class of input errors."""


class InvalidImageError(ContourCLError):
    """A file is not a readable 3D volume."""


class LabelMismatchError(ContourCLError):
    """A label's grid (shape or affine) differs from its image's."""


class UnknownLabelError(ContourCLError):
    """A structure name or a label value that the model does not know."""


class InvalidClickError(ContourCLError):
    """A request's clicks (points) or uploaded starting label that cannot be used."""


class UnsafeIdError(ContourCLError):
    """An image id or label tag that could leave the datastore folder."""


class UnknownModelError(ContourCLError):
    """A model name that the app does not serve."""


class InvalidModelError(ContourCLError):
    """A file that is not a servable ContourCL model (wrong format, model, labels or weights)."""


class ConfigError(ContourCLError):
    """A training setting that is unknown or has a wrong value."""


class DataNotFoundError(ContourCLError):
    """A data set that a command needs was not given, or is not where it was said to be."""
