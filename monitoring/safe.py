"""Exception safety for everything that reports: a metrics or logging bug is logged once and
never reaches the training loop or a data job."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def never_raise(fn: F) -> F:
    """Run ``fn``; on any exception log once (per function) and return None.

    Metrics, the ledger and the loggers use it so that they can never stop training or a data
    job.
    """
    warned = False

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal warned
        try:
            return fn(*args, **kwargs)
        except Exception:
            if not warned:
                warned = True
                log.exception("%s failed; further failures are silent", fn.__qualname__)
            return None

    return wrapper  # type: ignore[return-value]
