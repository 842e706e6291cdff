"""The one error type for bad user input: the CLI prints its message as one line and exits 2."""


class ConfigError(ValueError):
    """A setting, file or checkpoint the user handed in cannot be used; the message says which and what to do."""
