"""Training data: one resolution of the latent cache, streamed from its shards in a reproducible order.

The cache stores raw codec latents as float16 (``stagewise.latents``); a batch is read from the shards
(``ShardReader``: the row groups it needs, a bounded cache of recent ones), stays float16 until it is on
the device, and is normalised there (``codec.normalize``), so changing the codec scale never re-encodes.
Neither host nor device memory grows with the dataset: they hold the row index (a few dozen bytes per
row), the batches being prefetched, and the few held-out and preview rows.

Held-out images (``holdout_per_domain``) are chosen by sha256, so every stage and every resolution
holds out the same images, and they are never trained on (neither flip).

The order is a pure function of the position: domain d's stream is the concatenation of permutations
``randperm(N_d, seed=(seed, d, epoch))`` over its rows in (sha256, flipped) order, and a batch is a slice
of that stream. A resumed run therefore draws exactly the batches an uninterrupted one would, with no
data-loader state to save. Since the next position is known (the loop asks for consecutive slices),
background threads read the next ``PREFETCH_BATCHES`` batches of each domain ahead, into pinned memory
on CUDA so the copy to the device does not block; a jump (resume, rollback) only discards them.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from stagewise.cli import StageError
from stagewise.codecs import Codec
from stagewise.config import fingerprint
from stagewise.latents import ShardReader
from stagewise.models.autoencoder import DOMAINS

log = logging.getLogger(__name__)
FIXED_ROWS = 8  # training rows kept aside for previews (preview_rows is at most this)
# Batches per domain read ahead of the one the loop asks for: enough to cover a slow read (a row
# group of an old-layout shard) behind a few steps, few enough that memory stays at a few batches.
PREFETCH_BATCHES = 4
READ_THREADS = 2  # one per domain: Parquet reads and the row copies release the GIL
# Recent row groups kept decoded in host memory: a cache that small is read from disk once (the demo's,
# or an old-layout shard); a bigger one streams, and memory stays at this bound whatever its size.
CACHE_BYTES = 256 << 20


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (splitmix-style), so nearby inputs give unrelated streams."""
    x = 0x9E3779B97F4A7C15
    for part in parts:
        x = (x ^ (part + 0x9E3779B97F4A7C15 + (x << 6) + (x >> 2))) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


def _read_masks(reader: ShardReader) -> list[list[bytes | None]]:
    """Each shard's mask column (None per row for shards written without masks)."""
    import pyarrow.parquet as pq

    out = []
    for shard in reader.shards:
        if "mask" in pq.read_schema(shard).names:
            out.append(pq.read_table(shard, columns=["mask"]).column(0).to_pylist())
        else:
            out.append([None] * pq.ParquetFile(shard).metadata.num_rows)
    return out


class StageData:
    def __init__(self, cache_dir: Path, codec: Codec, resolution_px: int, holdout_per_domain: int, use_flipped: bool, seed: int, device: torch.device, half_dir: Path | None = None):
        """``half_dir``: the cache at half the resolution (a growth stage's fade-in): ``batch(..., with_half=True)``
        also returns the real latents of the same images downsized, read from there."""
        self.codec, self.seed, self.device = codec, seed, torch.device(device)
        try:
            self.reader = ShardReader(cache_dir, CACHE_BYTES)
        except FileNotFoundError as exc:
            raise StageError(str(exc)) from None
        frame = self.reader.index.sort_values(["domain", "sha256", "flipped"], kind="stable", ignore_index=True)
        codec_ids = sorted(set(frame["codec_id"]))
        if codec_ids != [codec.id]:
            raise StageError(f"{cache_dir}: latents were made by codec {', '.join(codec_ids)} but this run uses {codec.id}; rerun the cache stage (`dvc repro cache`)")
        resolutions = sorted(set(frame["resolution"]))
        if resolutions != [resolution_px]:
            raise StageError(f"{cache_dir}: holds resolution(s) {resolutions}, the stage trains at {resolution_px} px")
        shapes = {tuple(s) for s in frame["shape"]}
        if len(shapes) != 1:
            raise StageError(f"{cache_dir}: latent rows have mixed shapes {sorted(shapes)}; one resolution per cache folder")
        self._shape = shapes.pop()
        self._row_bytes = 2 * int(np.prod(self._shape))  # float16
        self.has_flipped = bool(frame["flipped"].any())
        self.use_flipped = use_flipped and self.has_flipped
        self._rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # domain -> (shard_id, position) per training row
        self._train_keys: dict[str, pd.DataFrame] = {}  # domain -> (sha256, flipped) per training row
        self.heldout: dict[str, torch.Tensor] = {}
        self.fixed: dict[str, torch.Tensor] = {}  # a few unflipped training rows, for previews
        ids = []
        for domain in DOMAINS:
            rows = frame[frame["domain"] == domain]
            shas = sorted(set(rows["sha256"]))
            if len(shas) <= holdout_per_domain:
                raise StageError(f"{cache_dir}: domain {domain!r} has {len(shas)} image(s); holdout_per_domain {holdout_per_domain} would leave none to train on: lower train.defaults.holdout_per_domain (or the stage's own; 0 measures training images) or add images of {domain!r}")
            held = set(shas[:holdout_per_domain])
            train_rows = rows[~rows["sha256"].isin(held) & (self.use_flipped | ~rows["flipped"])]
            held_rows = rows[rows["sha256"].isin(held) & ~rows["flipped"]]
            self._rows[domain] = (train_rows["shard_id"].to_numpy(np.int64), train_rows["position"].to_numpy(np.int64))
            self._train_keys[domain] = train_rows[["sha256", "flipped"]].reset_index(drop=True)
            self.fixed[domain] = self._load(train_rows[~train_rows["flipped"]].head(FIXED_ROWS)).to(self.device)
            if len(held_rows):
                self.heldout[domain] = self._load(held_rows).to(self.device)
            ids += [f"{domain}:{s}:{int(f)}" for s, f in zip(train_rows["sha256"], train_rows["flipped"])]
        self._half_rows: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
        if half_dir is not None:
            self._open_half(Path(half_dir), codec, resolution_px // 2)
        self.fingerprint = fingerprint(codec.id, resolution_px, ids, *(["half"] if half_dir is not None else []))  # which rows, in which order
        self._perm: dict[tuple[int, int], torch.Tensor] = {}
        self._pin = self.device.type == "cuda"
        self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="stage-data")
        self._ahead: dict[tuple[str, int, int], Future] = {}

    def _open_half(self, half_dir: Path, codec: Codec, half_px: int) -> None:
        """Map every training row to the row of the same image (and flip) in the half-size cache."""
        try:
            self.half_reader = ShardReader(half_dir, CACHE_BYTES // 4)
        except FileNotFoundError as exc:
            raise StageError(f"{exc} (the fade-in reads the real latents of the half-size images from it)") from None
        index = self.half_reader.index
        if sorted(set(index["codec_id"])) != [codec.id] or sorted(set(index["resolution"])) != [half_px]:
            raise StageError(f"{half_dir}: the fade-in needs {codec.id} latents at {half_px} px; it holds codec(s) {sorted(set(index['codec_id']))} at {sorted(set(index['resolution']))} px; rerun the cache stage")
        shapes = {tuple(s) for s in index["shape"]}
        expected = (self._shape[0], self._shape[1] // 2, self._shape[2] // 2)
        if shapes != {expected}:
            raise StageError(f"{half_dir}: half-size latents are {sorted(shapes)}, the fade-in expects {expected}")
        self._half_shape = expected
        lookup = index[["sha256", "flipped", "shard_id", "position"]].drop_duplicates(["sha256", "flipped"])
        self._half_rows = {}
        for domain, keys in self._train_keys.items():
            found = keys.merge(lookup, on=["sha256", "flipped"], how="left")
            missing = found["shard_id"].isna()
            if missing.any():
                first = found[missing].iloc[0]
                raise StageError(f"{half_dir}: {int(missing.sum())} training image(s) of domain {domain!r} have no half-size latent (e.g. sha256 {first['sha256'][:12]}, flipped {bool(first['flipped'])}); rerun the cache stage at {half_px} px")
            self._half_rows[domain] = (found["shard_id"].to_numpy(np.int64), found["position"].to_numpy(np.int64))

    @property
    def has_half(self) -> bool:
        return self._half_rows is not None

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self._shape

    def count(self, domain: str) -> int:
        return len(self._rows[domain][0])

    def _load(self, rows: pd.DataFrame) -> torch.Tensor:
        """Raw float16 latents of index ``rows`` (N, C, H, W) in host memory."""
        return self._read(rows["shard_id"].to_numpy(np.int64), rows["position"].to_numpy(np.int64), pin=False)

    def _read(self, shard_ids: np.ndarray, positions: np.ndarray, pin: bool, half: bool = False) -> torch.Tensor:
        out = torch.empty((len(positions), *(self._half_shape if half else self._shape)), dtype=torch.float16, pin_memory=pin)
        (self.half_reader if half else self.reader).read(shard_ids, positions, out.view(len(positions), -1).view(torch.uint8).numpy())
        return out

    def _permutation(self, domain_index: int, epoch: int) -> torch.Tensor:
        key = (domain_index, epoch)
        perm = self._perm.get(key)
        if perm is None:  # a prefetch thread and the loop may both get here: both compute the same tensor
            n = self.count(DOMAINS[domain_index])
            gen = torch.Generator().manual_seed(mix_seed(self.seed, domain_index, epoch))
            perm = torch.randperm(n, generator=gen)
            # one assignment of a new dict (no mutation another thread could see half done); memory stays flat
            self._perm = {k: v for k, v in self._perm.items() if k[0] != domain_index or k[1] >= epoch - 1} | {key: perm}
        return perm

    def indices(self, domain: str, position: int, count: int) -> torch.Tensor:
        """Rows ``position .. position + count`` of the domain's endless shuffled stream."""
        d = DOMAINS.index(domain)
        n = self.count(domain)
        parts, pos = [], position
        while pos < position + count:
            epoch, offset = divmod(pos, n)
            take = min(n - offset, position + count - pos)
            parts.append(self._permutation(d, epoch)[offset : offset + take])
            pos += take
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _gather(self, domain: str, position: int, count: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The raw float16 batch in host memory (pinned on CUDA), and its half-size rows when there is a half cache."""
        rows = self.indices(domain, position, count).numpy()
        shard_ids, positions = self._rows[domain]
        raw = self._read(shard_ids[rows], positions[rows], pin=self._pin)
        if self._half_rows is None:
            return raw, None
        half_ids, half_positions = self._half_rows[domain]
        return raw, self._read(half_ids[rows], half_positions[rows], pin=self._pin, half=True)

    def batch(self, domain: str, position: int, count: int, with_half: bool = False):
        """Normalised float32 latents (count, C, H, W) on the device; ``with_half``: (latents, the real
        latents of the same images at half the size) — needs ``half_dir``."""
        if with_half and self._half_rows is None:
            raise ValueError("StageData was opened without half_dir: no half-size latents to return")
        future = self._ahead.pop((domain, position, count), None)
        raw, raw_half = future.result() if future is not None else self._gather(domain, position, count)
        wanted = {(domain, position + k * count, count) for k in range(1, PREFETCH_BATCHES + 1)}
        for key in [k for k in self._ahead if k[0] == domain and k not in wanted]:  # a jump: drop the stale ones
            self._ahead.pop(key).cancel()
        for key in sorted(wanted - set(self._ahead)):
            self._ahead[key] = self._pool.submit(self._gather, *key)
        x = self.codec.normalize(raw.to(self.device, non_blocking=True).float())
        if with_half:
            return x, self.codec.normalize(raw_half.to(self.device, non_blocking=True).float())
        return x

    def mask_batch(self, domain: str, position: int, count: int) -> torch.Tensor:
        """The face masks (count, 2, h, w) in [0, 1] of the rows ``batch`` returns for the same arguments
        (stagewise.train.masked). Read from the shards on first use and held in host memory: 2 bytes per
        latent pixel, 1/32 of a TAEF2 latent's bytes. A cache without masks is a StageError."""
        if getattr(self, "_masks", None) is None:
            self._masks = _read_masks(self.reader)
        rows = self.indices(domain, position, count).numpy()
        shard_ids, positions = self._rows[domain]
        _, h, w = self._shape
        picked = [self._masks[s][p] for s, p in zip(shard_ids[rows].tolist(), positions[rows].tolist())]
        if any(m is None for m in picked):
            raise StageError(f"{self.reader.root}: latent rows without face masks; masked_training / eyes_mouth_prio need "
                             "the align stage (params.yaml align.enabled: true), then `dvc repro`")
        arr = np.frombuffer(b"".join(picked), dtype=np.uint8).reshape(len(picked), 2, h, w)
        return torch.from_numpy(arr.copy()).to(self.device).float().div_(255)

    def first(self, domain: str, count: int, heldout: bool = False) -> torch.Tensor:
        """The first ``count`` images (unflipped) in sha256 order: fixed rows for previews and metrics."""
        source = self.heldout.get(domain) if heldout else self.fixed[domain]
        if source is None:
            return torch.empty(0, device=self.device)
        return self.codec.normalize(source[:count].float())

    def close(self) -> None:
        """Stop the prefetch threads (they also stop at exit)."""
        for future in self._ahead.values():
            future.cancel()
        self._ahead.clear()
        self._pool.shutdown(wait=True)
