"""Errors the factory raises on purpose. Each message names the thing and the reason."""


class IndusfactoryError(Exception):
    """Base of every error indusfactory raises deliberately."""


class BadInputError(IndusfactoryError, ValueError):
    """The input (data, model, config) cannot be used; retrying will not help."""


class ConfigError(BadInputError):
    """The configuration is invalid."""


class ModelLoadError(BadInputError):
    """A base or trained model is missing, incomplete or of the wrong kind."""


class NearChanceError(BadInputError):
    """The generated samples do not follow their labels and the config refuses to publish such a dataset."""


class IncompleteOutputError(IndusfactoryError):
    """A stage output on storage is incomplete: a completion marker without every file it describes."""


class VersionConflictError(BadInputError):
    """A dataset version folder holds (or published) another plan's data: it is never mixed or rewritten."""
