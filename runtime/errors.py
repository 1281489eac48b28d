"""The error a user can fix by changing the configuration or the launch."""


class ConfigError(ValueError):
    """A bad setting; the message is one line that names the fix. The CLI prints it without a traceback."""
