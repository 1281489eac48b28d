"""The error a user can fix by changing the configuration or the launch."""


class ConfigError(ValueError):
    """A bad setting; the message is one line that names the fix. The CLI prints it without a traceback."""


class TrainingError(RuntimeError):
    """A run that cannot go on (a non-finite loss, a peer that stopped answering); one line naming the fix."""
