"""Curation on a cluster: the new images of a per-image stage, split into shards that run on Dask workers.

Engine: Dask (``distributed``). It is pure Python and already a dependency of prefect-dask; a scheduler and
its workers are two commands (``dask scheduler``, ``dask worker``; ``make cluster``), a test starts a
``LocalCluster`` in a few seconds, and the same cluster serves Prefect's ``DaskTaskRunner``. Ray is not
installed here and is not an engine of this project.

One hook, for every stage: ``stagewise.cli.run`` opens ``session(params)`` around a stage's ``main``, which
makes the params' ``cluster`` section the *current* cluster. ``stagewise.store.memo_map`` (every per-image
curation step: ingest decode, watermark, near_dup hashing, vlm_filter, caption, CLIP, and any new step such
as ``align`` that maps images through it) and the latent cache's encoder ask ``current()``; with
``engine: local`` (the default) it is None and nothing changes. With ``engine: dask``:

- the stage still decides what is new (memo lookup, cache plan) and merges the results in its own order,
  so the outputs are byte-identical to a local run; only the computing of new images moves;
- the workers write their per-image results into the same content-hashed memo store (a shared folder:
  one machine, or a network file system for workers on other machines), part by part, so a worker killed
  mid-shard loses only that shard's unsaved rows, and a rerun computes only those;
- the cluster is started (``address: null``: a ``LocalCluster`` of ``workers`` processes bound to
  127.0.0.1) or connected to (``address: tcp://host:port``) only when there is something to compute, so
  a no-op rerun costs nothing; an unreachable address fails in ``connect_timeout_s`` naming it;
- a worker that dies (``KilledWorker``, a lost connection) is reported with its shard and the shard is
  retried once; a second death fails the stage naming the shard.

The ``cluster`` section is not a DVC param of any stage: it changes where a stage runs, not what it
computes (like ``cache.device``), so switching engines makes nothing stale.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from stagewise.cli import StageError
from stagewise.config import DEFAULT_PARAMS, Section, load_section, read_params

log = logging.getLogger(__name__)

START_LOCAL = "make cluster (a scheduler and 2 workers on 127.0.0.1, then cluster.address: tcp://127.0.0.1:8786), or cluster.address: null (each stage starts its own local cluster)"


class ClusterConfig(Section):
    # local: every stage computes in its own process (threads); no service needed. dask: new images go
    # to the workers of a Dask cluster in shards.
    engine: Literal["local", "dask"] = "local"
    # null: a stage that has new images starts a LocalCluster on 127.0.0.1 for the run and stops it after;
    # "tcp://host:port": connect to a running scheduler (make cluster, or one on another machine).
    address: str | None = None
    workers: int = Field(2, ge=1, description="worker processes of the LocalCluster a stage starts (address: null)")
    # One thread per worker: the per-image steps run their own decoding threads (the step's `workers`),
    # and rapidocr / torch parallelise poorly beyond one core each on small images.
    threads_per_worker: int = Field(1, ge=1)
    # Images per shard: a killed worker loses at most one shard's unsaved work, and each task carries
    # a few ms of scheduling overhead, so shards of tens of images keep both small.
    shard_images: int = Field(32, ge=1)
    connect_timeout_s: float = Field(5.0, gt=0, description="seconds to wait for the scheduler at `address` before failing")

    @field_validator("address")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value:
            raise ValueError("expected a scheduler address such as tcp://127.0.0.1:8786, or null for a local cluster")
        return value


class ClusterError(StageError):
    """The cluster cannot be reached, or a shard failed twice; the message names the address or shard."""


class Cluster:
    """A Dask client, made on first use: connect to ``cfg.address`` or start a LocalCluster on 127.0.0.1."""

    def __init__(self, cfg: ClusterConfig):
        self.cfg = cfg
        self._client = None
        self._local = None

    @property
    def address(self) -> str | None:
        return self._client.scheduler.address if self._client is not None else self.cfg.address

    def client(self):
        if self._client is None:
            _quiet_dask(logging.WARNING)  # the stage logs at INFO; Dask's start-up chatter is not for it
            self._client = self._connect() if self.cfg.address else self._start_local()
        return self._client

    def _connect(self):
        from distributed import Client

        started = time.monotonic()
        try:
            client = Client(self.cfg.address, timeout=self.cfg.connect_timeout_s, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise ClusterError(
                f"params.yaml cluster.address: no Dask scheduler answered at {self.cfg.address} within "
                f"{self.cfg.connect_timeout_s:g} s ({type(exc).__name__}: {exc}). Start one with {START_LOCAL}; "
                "or set cluster.engine: local."
            ) from None
        log.info("cluster: connected to %s in %.1f s (%d workers)", self.cfg.address, time.monotonic() - started, len(client.scheduler_info()["workers"]))
        return client

    def _start_local(self):
        import dask
        from distributed import Client, LocalCluster

        started = time.monotonic()
        # The scheduler's own rescheduling of a dead worker's tasks is off: map_shards retries a shard
        # once itself, and reports which shard it was.
        with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
            self._local = LocalCluster(
                n_workers=self.cfg.workers, threads_per_worker=self.cfg.threads_per_worker, processes=True,
                host="127.0.0.1", scheduler_port=0, dashboard_address="127.0.0.1:0",  # no fixed 8787: stages may run side by side
                silence_logs=logging.WARNING,
            )  # fmt: skip
        _quiet_dask(logging.WARNING)  # distributed sets its loggers' levels again as it starts
        client = Client(self._local, set_as_default=False)
        log.info("cluster: started a local Dask cluster at %s (%d workers x %d thread(s)) in %.1f s",
                 self._local.scheduler_address, self.cfg.workers, self.cfg.threads_per_worker, time.monotonic() - started)
        return client

    def close(self) -> None:
        _quiet_dask(logging.CRITICAL)  # workers leaving at shutdown are not news
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._local is not None:
            self._local.close()
            self._local = None

    def map_shards(
        self,
        fn: Callable[[Any, Any], Any],
        shared: Any,
        shards: Sequence[Any],
        *,
        desc: str,
        describe: Callable[[Any], str] = lambda shard: f"{len(shard)} items",
        progress: Callable[[Any, Any], None] | None = None,
    ) -> Iterator[Any]:
        """Yield ``fn(shared, shard)`` for every shard, in shard order, computed on the workers.

        ``shared`` (the step's functions, a codec) is sent to every worker once. A shard whose worker dies
        is logged with ``describe(shard)`` and retried once; any other exception in ``fn`` is raised as is
        (it would fail the same way again). ``progress(shard, result)`` is called as each shard finishes."""
        from distributed import as_completed

        client = self.client()
        [shared_future] = client.scatter([shared], broadcast=True, hash=False)
        run = uuid.uuid4().hex[:8]
        futures = {}
        for i, shard in enumerate(shards):
            futures[client.submit(fn, shared_future, shard, key=f"{desc or fn.__name__}-{run}-shard{i}", pure=False)] = i
        done: dict[int, Any] = {}
        retried: set[int] = set()
        lost_twice: list[str] = []
        following = 0
        pending = as_completed(list(futures), loop=client.loop)
        try:
            for future in pending:
                i = futures.pop(future)
                try:
                    done[i] = future.result()
                except Exception as exc:  # noqa: BLE001 - anything but a lost worker is raised as is
                    if not _worker_lost(exc):
                        raise
                    where = f"shard {i + 1}/{len(shards)} of {desc} ({describe(shards[i])})"
                    if i in retried:  # the other shards still finish (their results are saved), then the stage fails
                        lost_twice.append(f"{where} lost its worker twice ({type(exc).__name__}: {exc})")
                        continue
                    log.warning("cluster: %s: its worker died (%s: %s); retrying the shard once", where, type(exc).__name__, exc)
                    retried.add(i)
                    # A result or the shared data held by the dead worker is gone with it: send ``shared`` again.
                    shared_future = _scatter_again(client, shared)
                    again = client.submit(fn, shared_future, shards[i], key=f"{desc or fn.__name__}-{run}-shard{i}-retry", pure=False)
                    futures[again] = i
                    pending.add(again)
                    continue
                future.release()
                if progress is not None:
                    progress(shards[i], done[i])
                while following in done:
                    yield done.pop(following)
                    following += 1
            if lost_twice:
                raise ClusterError("\n".join(lost_twice) + "\nWhat the workers finished is in the store: run the stage again to continue.")
        finally:  # also when the consumer stops early: nothing keeps computing for nobody
            for future in futures:
                future.cancel()
            shared_future.cancel()


def _scatter_again(client, shared: Any, attempts: int = 5):
    """Broadcast ``shared`` after a worker died. The scheduler may still list the dead worker for a moment,
    and a broadcast to it fails with a KeyError naming its address: wait for the scheduler to drop it."""
    for attempt in range(attempts):
        try:
            [future] = client.scatter([shared], broadcast=True, hash=False)
            return future
        except (KeyError, OSError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))


def _quiet_dask(level: int) -> None:
    for name in ["distributed", *[n for n in logging.root.manager.loggerDict if n.startswith("distributed.")]]:
        logging.getLogger(name).setLevel(level)


def absolute(row: Any) -> Any:
    """``row`` with an absolute ``path``: a worker does not run in the stage's folder (its own cwd, or another
    machine that mounts the same file system at the same place)."""
    path = os.path.abspath(row.path)
    if path == row.path:
        return row
    if hasattr(row, "_replace"):  # a NamedTuple, a manifest row from itertuples
        return row._replace(path=path)
    if dataclasses.is_dataclass(row):
        return dataclasses.replace(row, path=path)
    raise TypeError(f"cannot send {type(row).__name__} rows to a cluster: relative path {row.path!r}")


def _worker_lost(exc: BaseException | None) -> bool:
    """A failure of the worker, not of the task: it died while running it, or held its result or input."""
    from concurrent.futures import CancelledError

    from distributed import KilledWorker
    from distributed.client import FutureCancelledError
    from distributed.comm.core import CommClosedError

    return isinstance(exc, (KilledWorker, CommClosedError, FutureCancelledError, CancelledError))


_CURRENT: contextvars.ContextVar[Cluster | None] = contextvars.ContextVar("stagewise_cluster", default=None)


def current() -> Cluster | None:
    """The cluster of the running stage (``session``), or None: compute in this process."""
    return _CURRENT.get()


@contextlib.contextmanager
def activate(cluster: Cluster | None) -> Iterator[Cluster | None]:
    """Make ``cluster`` current for the block (None: compute locally); it is not closed after."""
    token = _CURRENT.set(cluster)
    try:
        yield cluster
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def session(cfg: ClusterConfig | None) -> Iterator[Cluster | None]:
    """Make ``cfg``'s cluster current (None or engine local: none); a cluster started for it stops after."""
    cluster = Cluster(cfg) if cfg is not None and cfg.engine == "dask" else None
    try:
        with activate(cluster):
            yield cluster
    finally:
        if cluster is not None:
            cluster.close()


def config_from_params(path: Path | str = DEFAULT_PARAMS) -> ClusterConfig:
    """The ``cluster`` section (absent: local). A params file that does not exist is left to the stage."""
    if not Path(path).exists() or "cluster" not in read_params(path):
        return ClusterConfig()
    return load_section("cluster", ClusterConfig, path)
