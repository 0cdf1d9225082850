"""User-facing errors.

Every problem a user can fix (a bad config key, a missing folder, an unknown
sampler) is raised as a :class:`DDPMError`.  The command line prints its message
on one line and exits with status 2 instead of showing a traceback.
"""

import re
from contextlib import contextmanager


class DDPMError(Exception):
    """An error caused by user input; the message says what is wrong and what to do."""


class ConfigError(DDPMError):
    """A config file or ``key=value`` override is invalid."""


class DataError(DDPMError):
    """A dataset cannot be found or read."""


OPTION = "{option}"  # where an OptionError's message names the option it is about
_MARK = re.compile(r"\{option(?::([a-z_]+))?\}")  # OPTION, or mention(name): another option named


def mention(option: str) -> str:
    """The mark for naming another option than the one an OptionError is about, e.g. the resize switch
    in a message about an image: ``f"... use {mention('resize')} to scale it"``."""
    return "{option:" + option + "}"


class OptionError(ConfigError):
    """A bad value of one option; ``option`` is the library's name of it ('steps', 'class').

    The message is written with ``{option}`` where the option is named (and :func:`mention` where
    another one is): ``str()`` names each by the library's word, and a front end in its own words
    (``--steps``, 'RePaint steps') with :meth:`named` where it catches the error, so no caller's
    names travel down the library.
    """

    def __init__(self, option: str, message: str):
        self.option, self.template = option, message
        super().__init__(self.named({}))

    def named(self, names) -> str:
        """The message with the options named as ``names`` (a mapping, e.g. {'steps': '--steps'}) says."""
        def name(m: re.Match) -> str:
            key = m.group(1) or self.option
            return names.get(key, key)

        return _MARK.sub(name, self.template)


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
