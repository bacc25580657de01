"""Importing TensorFlow for a command line tool without its start-up banner on stderr."""

from __future__ import annotations

import os
import sys


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with its C++ start-up banner (oneDNN, CPU features) kept off stderr.

    Those lines are written straight to file descriptor 2 while the shared libraries load, and
    no environment variable silences them; an error message should be the only thing there.
    Python exceptions still propagate once stderr is restored.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # later C++ logs (grappler INFO lines)
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
