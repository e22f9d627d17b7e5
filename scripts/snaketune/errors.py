"""User-facing errors: one exception type whose message is advice, and a CLI wrapper that
prints it without a traceback."""

from __future__ import annotations

import functools
import sys


class SnaketuneError(Exception):
    """A problem the user can fix; the message says where and how."""


def cli(main):
    """Run ``main``; turn a SnaketuneError into a one-paragraph message and exit code 2."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except SnaketuneError as err:
            print(f"\nsnaketune: error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper
