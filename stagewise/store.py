"""The per-image result store that makes curation incremental.

Each stage keeps one store folder of Parquet parts. A row is keyed by the image's ``sha256`` and the
``fingerprint`` of the settings that produced it, so adding 100 images to 100 000 computes 100 rows, and
switching a setting back and forth reuses what was computed before. Parts are flushed every
``flush_every`` rows (atomically), so a killed run keeps what it finished. The store is a memo, never
a source of truth: deleting the folder only costs recomputation.

``memo_map`` is the one loop every per-image curation step runs over its store: look up what is
memoised, load the rest in threads (an unreadable image becomes an ``Unreadable`` reason), run the model
in batches, store the results as they come, show progress. A step is then a config, a fingerprint (its
store's) and a load / batch function; ``Lazy`` builds its model once, on first need.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import pandas as pd
from tqdm import tqdm

from stagewise.images import ImageError
from stagewise.io import read_parquet_dir, write_parquet

log = logging.getLogger(__name__)

KEY = ["sha256", "fingerprint"]
MAX_PARTS = 32  # beyond this many parts, merge them: many small files make every lookup slower


class ResultStore:
    def __init__(self, root: Path | str, fingerprint: str, flush_every: int = 256):
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.flush_every = flush_every
        self._pending: list[dict[str, Any]] = []

    def lookup(self) -> dict[str, dict[str, Any]]:
        """Rows computed earlier with this fingerprint, by sha256."""
        frame = read_parquet_dir(self.root)
        if frame.empty:
            return {}
        frame = frame[frame["fingerprint"] == self.fingerprint].drop_duplicates("sha256", keep="last")
        frame = frame.astype(object).where(frame.notna(), None)  # Parquet nulls come back as NaN
        return {row["sha256"]: row for row in frame.to_dict("records")}

    def add(self, sha256: str, **values: Any) -> None:
        self._pending.append({"sha256": sha256, "fingerprint": self.fingerprint, **values})
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        name = f"part-{time.time_ns()}-{os.getpid()}.parquet"
        write_parquet(self.root / name, pd.DataFrame(self._pending))
        self._pending = []

    def close(self) -> None:
        self.flush()
        parts = sorted(self.root.glob("part-*.parquet"))
        if len(parts) > MAX_PARTS:
            self._compact(parts)

    def _compact(self, parts: list[Path]) -> None:
        merged = read_parquet_dir(self.root).drop_duplicates(KEY, keep="last")
        write_parquet(self.root / f"part-{time.time_ns()}-{os.getpid()}.parquet", merged)
        for part in parts:  # only after the merged part is safely in place
            part.unlink()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------- the image map


class Keyed(Protocol):
    """A row ``memo_map`` can work on: a manifest row (``itertuples``), an ImageRef, ..."""

    path: str
    sha256: str


R = TypeVar("R", bound=Keyed)
T = TypeVar("T")
L = TypeVar("L")


@dataclass(frozen=True)
class Unreadable:
    """What a row's load gave when its image could not be read (``ImageError``: vanished, changed since
    ingest, truncated, too large): the reason the stage records for it. Never memoised: the file may be
    fixed without its content hash changing."""

    reason: str


@dataclass
class MemoResult:
    values: dict[str, dict[str, Any]]  # sha256 -> stored values (memoised or computed now) of every readable row
    errors: dict[str, str]  # sha256 -> why its image could not be read (Unreadable.reason)
    computed: int  # images computed this call; the rest were memoised


def memo_map(
    rows: Iterable[R] | pd.DataFrame,
    store: ResultStore,
    load: Callable[[R], L],
    run_batch: Callable[[list[R], list[L]], list[dict[str, Any]]] | None = None,
    *,
    batch_size: int = 16,
    workers: int = 2,
    desc: str = "",
    reuse: Callable[[R, dict[str, Any]], bool] | None = None,
    cluster: Any = None,
) -> MemoResult:
    """The per-image result of every distinct ``sha256`` in ``rows``, computing only what ``store`` lacks.

    - Incremental: a row whose sha256 the store holds (and, with ``reuse``, whose memo ``reuse(row,
      stored)`` accepts) is not loaded; each content hash is computed once, however many rows share it.
    - ``load(row)`` runs in ``workers`` threads, the next two batches ahead of the one being consumed, so
      decoding overlaps the model. It reads the image (``images.load_verified``: the content hash is
      checked, so a memoised result is computed from the content it is keyed by) and does per-image work;
      an ``ImageError`` it raises becomes the row's ``Unreadable`` reason in ``errors``.
    - ``run_batch(rows, loaded)`` runs on the calling thread, once per batch of ``batch_size`` rows less
      the unreadable ones, and returns one dict of values to store per row. Without it, ``load`` returns
      those values itself (per-image work in the threads: hashes, the text detector).
    - Kill-safe: results go to ``store`` as they come, which writes a part every ``flush_every`` rows and
      flushes the rest when the map ends, also by an exception; a SIGKILL loses at most one part's rows.
    - Memory: the rows to compute are listed (small), images exist only for the batches in flight; what
      grows is the per-image values returned.
    - A progress bar (``desc``) counts the images to compute, shown only when there are some.
    - On a cluster (``cluster``, default ``stagewise.cluster.current()``: the params' ``cluster`` section of
      the running stage), the images to compute are split into shards of ``shard_images`` that run this
      same loop on the workers, each writing its results into ``store``'s folder; the results come back
      merged in the order of ``rows``, so every output is the same as a local run's. ``load`` and
      ``run_batch`` are pickled to the workers (a ``Lazy`` model is rebuilt there, on first need).
    """
    if isinstance(rows, pd.DataFrame):
        rows = rows.itertuples(index=False)
    memo = store.lookup()
    values: dict[str, dict[str, Any]] = {}
    todo: list[R] = []
    seen: set[str] = set()
    for row in rows:
        if row.sha256 in seen:
            continue
        seen.add(row.sha256)
        hit = memo.get(row.sha256)
        if hit is not None and (reuse is None or reuse(row, hit)):
            values[row.sha256] = hit
        else:
            todo.append(row)
    errors: dict[str, str] = {}
    if not todo:
        return MemoResult(values, errors, 0)
    log.info("%s: %d new images to compute (%d memoised)", desc, len(todo), len(values))
    if cluster is None:
        from stagewise.cluster import current

        cluster = current()
    job = _Job(store.root.absolute(), store.fingerprint, store.flush_every, load, run_batch, batch_size, workers, desc)
    with tqdm(total=len(todo), desc=desc, unit="img", mininterval=1.0) as bar:
        if cluster is None:
            with store:
                _compute(job, todo, store, values, errors, bar.update)
        else:
            from stagewise.cluster import absolute

            remote = [absolute(row) for row in todo]
            shards = [remote[start:start + cluster.cfg.shard_images] for start in range(0, len(remote), cluster.cfg.shard_images)]
            describe = lambda shard: f"{len(shard)} images, {shard[0].path} .. {shard[-1].path}"  # noqa: E731
            for shard_values, shard_errors in cluster.map_shards(_compute_shard, job, shards, desc=desc, describe=describe,
                                                                 progress=lambda shard, _: bar.update(len(shard))):
                values.update(shard_values)
                errors.update(shard_errors)
            store.close()  # the workers only flush; merging many small parts is done here, once
    return MemoResult(values, errors, len(todo) - len(errors))


@dataclass(frozen=True)
class _Job:
    """What a shard of ``memo_map`` needs on a worker: the store's place and key, and the step."""

    root: Path
    fingerprint: str
    flush_every: int
    load: Callable
    run_batch: Callable | None
    batch_size: int
    workers: int
    desc: str


def _compute(job: _Job, todo: list, store: ResultStore, values: dict, errors: dict, advance: Callable[[int], None],
             pool: ThreadPoolExecutor | None = None) -> None:
    """Load and compute ``todo`` in batches, adding each result to ``store`` as it comes."""
    batches = (todo[start:start + job.batch_size] for start in range(0, len(todo), job.batch_size))
    for batch, loaded in prefetched(batches, functools.partial(_guarded, job.load), job.workers, pool=pool):
        good = [(row, item) for row, item in zip(batch, loaded) if not isinstance(item, Unreadable)]
        errors.update({row.sha256: item.reason for row, item in zip(batch, loaded) if isinstance(item, Unreadable)})
        if good:
            results = job.run_batch([row for row, _ in good], [item for _, item in good]) if job.run_batch else [item for _, item in good]
            if len(results) != len(good):
                raise RuntimeError(f"{job.desc}: {len(results)} results for a batch of {len(good)} images")
            for (row, _), result in zip(good, results):
                store.add(row.sha256, **result)
                values[row.sha256] = result
        advance(len(batch))


def _compute_shard(job: _Job, shard: list) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """On a worker: one shard of ``memo_map``'s new images into the shared store (flushed, not compacted:
    other workers write beside it); returns its values and unreadable reasons."""
    store = ResultStore(job.root, job.fingerprint, job.flush_every)
    values: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    try:
        _compute(job, shard, store, values, errors, lambda n: None, pool=worker_pool(job.workers))
    finally:  # a failure keeps what was finished
        store.flush()
    return values, errors


def _guarded(load: Callable[[R], L], row: R) -> L | Unreadable:
    try:
        return load(row)
    except ImageError as exc:
        return Unreadable(str(exc))


def prefetched(
    batches: Iterable[list[T]], load: Callable[[T], L], workers: int, ahead: int = 2, pool: ThreadPoolExecutor | None = None,
) -> Iterator[tuple[list[T], list[L]]]:
    """Yield (batch, its loaded items) in order while the next ``ahead`` batches load in threads: a pool
    of ``workers`` made for the call, or ``pool`` (kept: a cluster worker's, see ``worker_pool``)."""
    own = pool is None
    pool = pool or ThreadPoolExecutor(workers, thread_name_prefix="prefetch")
    pending: deque[tuple[list[T], list[Future]]] = deque()
    try:
        for batch in batches:
            pending.append((batch, [pool.submit(load, item) for item in batch]))
            if len(pending) > ahead:
                done, futures = pending.popleft()
                yield done, [f.result() for f in futures]
        while pending:
            done, futures = pending.popleft()
            yield done, [f.result() for f in futures]
    finally:  # also on an exception in the consumer: drop what has not started
        if own:
            pool.shutdown(wait=True, cancel_futures=True)
        else:
            left = [f for _, futures in pending for f in futures]
            for future in left:
                future.cancel()
            concurrent.futures.wait(left)


_WORKER_POOLS: dict[int, ThreadPoolExecutor] = {}
_WORKER_POOLS_LOCK = threading.Lock()


def worker_pool(workers: int) -> ThreadPoolExecutor:
    """One decoding pool per size for the life of a cluster worker process: its threads outlive a shard,
    so what a step keeps per thread (``ThreadLocal``: a text detector session) is built once per worker,
    not once per shard."""
    with _WORKER_POOLS_LOCK:
        if workers not in _WORKER_POOLS:
            _WORKER_POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="shard-prefetch")
        return _WORKER_POOLS[workers]


class Lazy(Generic[T]):
    """A model built on first use, by whichever thread needs it first (often a decoding thread preparing an
    image for it), exactly once: a run with nothing new to compute, or only unreadable images, never
    loads it. ``value`` is None until then."""

    def __init__(self, build: Callable[[], T], value: T | None = None):
        self._build, self.value, self._lock = build, value, threading.Lock()

    def __reduce__(self):  # sent to a cluster worker: the recipe travels, the model is built there on need
        return (Lazy, (self._build,))

    def get(self) -> T:
        if self.value is None:
            with self._lock:
                if self.value is None:
                    self.value = self._build()
        return self.value


class ThreadLocal(threading.local):
    """``threading.local`` that a cluster worker receives empty (one detector session per thread there too)."""

    def __reduce__(self):
        return (type(self), ())
