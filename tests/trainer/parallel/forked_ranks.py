"""Entry points of the ranks test_local_launcher.py starts (a rank imports this module by name)."""

import os


def what_the_rank_sees(key: str) -> tuple[int, str | None, str]:
    """(the process this rank was forked from, ``key`` in its environment, its working directory)."""
    return os.getppid(), os.environ.get(key), os.getcwd()
