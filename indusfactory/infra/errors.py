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


class StorageAccessError(BadInputError):
    """Storage refused a request for a reason a retry will not cure (credentials, permissions, a missing
    bucket or key, no space left): the message names the place and what to check."""


class StoragePermissionError(StorageAccessError, PermissionError):
    """Credentials refused or missing, or access denied (still a ``PermissionError`` for callers catching one)."""


class StorageNotFoundError(StorageAccessError, FileNotFoundError):
    """No such bucket, key or file (still a ``FileNotFoundError``)."""


class StorageSpaceError(StorageAccessError, OSError):
    """No space left on the device or over quota (still an ``OSError``)."""


class PreflightError(BadInputError):
    """The checks before a run found problems; ``problems`` lists each one (key, place, what to check)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"preflight found {len(self.problems)} problem(s) before any work started:\n{lines}")
