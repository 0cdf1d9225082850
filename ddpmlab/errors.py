"""User-facing errors.

Every problem a user can fix (a bad config key, a missing folder, an unknown
sampler) is raised as a :class:`DDPMError`.  The command line prints its message
on one line and exits with status 2 instead of showing a traceback.
"""

from contextlib import contextmanager


class DDPMError(Exception):
    """An error caused by user input; the message says what is wrong and what to do."""


class ConfigError(DDPMError):
    """A config file or ``key=value`` override is invalid."""


class DataError(DDPMError):
    """A dataset cannot be found or read."""


OPTION = "{option}"  # where an OptionError's message names the option it is about


class OptionError(ConfigError):
    """A bad value of one option; ``option`` is the library's name of it ('steps', 'class').

    The message is written with ``{option}`` where the option is named: ``str()`` names it
    ``option``, and a front end in its own words (``--steps``, 'RePaint steps') with
    :meth:`named` where it catches the error, so no caller's names travel down the library.
    """

    def __init__(self, option: str, message: str):
        self.option, self.template = option, message
        super().__init__(message.replace(OPTION, option))

    def named(self, names) -> str:
        """The message with the option named as ``names`` (a mapping, e.g. {'steps': '--steps'}) says."""
        return self.template.replace(OPTION, names.get(self.option, self.option))


@contextmanager
def about(option: str):
    """Errors raised inside are about ``option``: a DDPMError whose message begins with ``option``
    (a library function's default name for it) or contains ``{option}`` becomes an OptionError."""
    try:
        yield
    except OptionError:
        raise
    except DDPMError as e:
        text = str(e)
        if OPTION not in text and text.startswith(option):
            text = OPTION + text[len(option):]
        raise OptionError(option, text) from None
