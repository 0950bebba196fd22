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
