"""Errors that the entry points turn into one-line messages and a non-zero exit."""


class PipelineError(Exception):
    """A user-facing error: its message says what is wrong and what to do."""


class ConfigError(PipelineError, ValueError):
    """A configuration value outside its allowed range."""
