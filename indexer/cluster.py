"""Connecting to Ray (the optional `indexer[ray]` extra): a cluster's address, or a local one.

Every engine that runs on Ray calls `connect()` first; Ray itself is imported only here and by them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

from .errors import IndexerError

log = logging.getLogger(__name__)

RAY_EXTRA = "--engine ray needs Ray Data: pip install -e '.[ray]' (or pip install 'indexer[ray]')"
# Worker processes see these as the driver does: offline model loading must stay offline.
_FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME")


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise IndexerError(RAY_EXTRA) from exc
    return ray


def connect(address: str | None = None):
    """Join the Ray cluster at `address` ("auto", "HOST:PORT", "ray://HOST:PORT"), or start a local one
    (no dashboard) when None and RAY_ADDRESS is unset. Reuses a connection this process already has.
    Returns the `ray` module."""
    ray = import_ray()
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        kwargs: dict = {}
        if address is None and "RAY_ADDRESS" not in os.environ:
            kwargs["include_dashboard"] = False  # a local cluster inherits this process's environment
        else:
            env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
            kwargs["runtime_env"] = {"env_vars": env} if env else None
        _quiet_ray_logs()
        try:
            with quiet_ray():
                ray.init(address=address, ignore_reinit_error=True, logging_level=logging.ERROR,
                         log_to_driver=False, **kwargs)
        except ConnectionError as exc:
            raise IndexerError(f"cannot reach the Ray cluster at {address}: {exc}") from exc
    _quiet_ray_logs()
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False  # ours is the run's progress bar
    DataContext.get_current().print_on_execution_start = False
    return ray


@contextlib.contextmanager
def quiet_ray():
    """Ray's advice to its own developers (deprecations, concurrency hints, fork notices) is not for our users."""
    with warnings.catch_warnings():
        for message in ("lancedb fork support", "lance is not fork-safe", "`ray_remote_args` is deprecated",
                        "The argument ``concurrency``", "The maximum number of concurrent",
                        "The minimum number of concurrent"):
            warnings.filterwarnings("ignore", message=message)
        yield


def _quiet_ray_logs() -> None:
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
