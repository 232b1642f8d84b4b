"""User-facing errors: the CLI prints these as one clear line instead of a traceback."""


class FedrecError(Exception):
    """Bad input or configuration that the user can fix; the message names file, column, row."""


class DataError(FedrecError):
    """A data file is missing, malformed or inconsistent."""


class ConfigError(FedrecError):
    """A configuration file or option is invalid."""
