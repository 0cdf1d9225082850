"""User-facing errors.

Every problem a user can fix (a bad config key, a missing folder, an unknown
sampler) is raised as a :class:`DDPMError`.  The command line prints its message
on one line and exits with status 2 instead of showing a traceback.
"""


class DDPMError(Exception):
    """An error caused by user input; the message says what is wrong and what to do."""


class ConfigError(DDPMError):
    """A config file or ``key=value`` override is invalid."""


class DataError(DDPMError):
    """A dataset cannot be found or read."""
