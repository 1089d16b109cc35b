"""The latent cache: every dataset image encoded at one resolution, kept up to date incrementally.

The output folder is its own store (a DVC ``persist: true`` output). A row is keyed by the image's
``sha256``, ``flipped``, and the ``fingerprint`` of what made the latent (codec id, resolution, crop and
resize policy). A rerun

- encodes only the keys that are missing (new images, or all of them after a codec change),
- rewrites only the shards holding rows that are no longer wanted (image gone, stale fingerprint, flip
  turned off) or whose caption / domain changed: captions never force a re-encode; and shards in an
  older file layout (``latents.needs_relayout``), copied row for row into the streaming one,
- never writes a key twice: each key lives in exactly one shard, every shard write is an atomic
  replace of one file, and new rows go to new shards or to the newest, partly filled shard (replaced
  whole). A killed run leaves whole shards; running again continues where it stopped.

Images are decoded by a thread pool while the previous batch encodes; the codec runs batched, in
inference mode, channels-last, on the device ``pick_device`` chooses.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import Field, field_validator
from tqdm import tqdm

from stagewise.codecs import Codec
from stagewise.config import Section, fingerprint
from stagewise.faces.masks import MASK_VERSION
from PIL import Image

from stagewise.images import ImageError, center_square, decode, read_file
from stagewise.io import remove_partial_writes
from stagewise.latents import SHARD_GLOB, ShardWriter, needs_relayout, read_index, shard_number, to_bytes, write_shard
from stagewise.store import prefetched, worker_pool

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the file -> tensor path changes: every latent is then re-encoded
RESIZE_POLICY = "center-square/lanczos/uint8"  # what center_square does; part of every row's fingerprint
# Ingest already applied the user's max_pixels, and the sha256 is checked before decoding, so a file
# swapped since cannot reach the decoder; this bound only keeps Pillow's own guard out of the way.
MAX_PIXELS = 2**31
DATASET_COLUMNS = ["path", "domain", "sha256", "caption"]
MASK_POLICY = f"faces-mask-v{MASK_VERSION}/center-square/box/uint8x2"  # what latent_masks does; part of the fingerprint with masks
METADATA = ["domain", "caption"]  # row columns that may change without re-encoding


class CacheConfig(Section):
    # The growth schedule: dvc.yaml makes one `cache@<res>` stage per entry (foreach).
    resolutions: list[int] = Field(default_factory=lambda: [128, 256, 512], min_length=1)
    # Also store each image's horizontal mirror, so training can flip (DFL's random_flip) without a
    # codec in the loop; a TAEF2 latent of a mirrored image is not the mirror of its latent. Doubles encode time.
    flip: bool = True
    batch_size: int = Field(8, ge=1, description="rows per codec forward pass; 8 x 512 px needs about 1.5 GB in float32")
    # Latent bytes per shard: 64 MB is ~256 rows at 512 px (taef2) or ~4000 at 128 px: few files to scan,
    # and a kill loses at most one shard of work.
    shard_mb: float = Field(64.0, gt=0)
    workers: int = Field(4, ge=1, description="threads decoding the next batch while this one encodes (PIL releases the GIL)")
    device: str = "auto"  # cuda, then mps, then cpu; the latents differ only by float rounding, so not a fingerprint part

    @field_validator("resolutions")
    @classmethod
    def _distinct_positive(cls, value: list[int]) -> list[int]:
        if any(r < 8 for r in value) or len(set(value)) != len(value):
            raise ValueError("resolutions must be distinct sizes in pixels, each at least 8")
        return value


@dataclass
class CacheResult:
    """What one update did, in rows (an image has two rows when flips are stored)."""

    encoded: int = 0
    reused: int = 0
    pruned: int = 0
    relabelled: int = 0  # kept rows whose caption or domain was updated in place
    images_encoded: int = 0
    rewritten_shards: list[str] = field(default_factory=list)  # existing shards replaced or deleted
    new_shards: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # path -> reason; retried on the next run

    def summary(self) -> str:
        text = (
            f"encoded {self.encoded} rows ({self.images_encoded} images), reused {self.reused} rows, "
            f"pruned {self.pruned}, relabelled {self.relabelled}; "
            f"rewrote {len(self.rewritten_shards)} shard(s), wrote {len(self.new_shards)} new"
        )
        return text + (f"; {len(self.failed)} image(s) failed" if self.failed else "")


def cache_fingerprint(codec: Codec, resolution: int, masked: bool = False) -> str:
    # with face masks the rows also hold a mask: rows made without one are encoded again (once)
    return fingerprint("cache", CACHE_VERSION, codec.id, resolution, RESIZE_POLICY, *([MASK_POLICY] if masked else []))


def read_dataset(path: Path | str) -> pd.DataFrame:
    """The curated dataset (caption stage output) with the columns the cache needs, validated."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; run the caption stage first (`dvc repro caption`)")
    frame = pd.read_parquet(path)
    missing = [c for c in DATASET_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; expected at least {', '.join(DATASET_COLUMNS)}")
    return frame


def wanted_rows(dataset: pd.DataFrame, flip: bool) -> pd.DataFrame:
    """One row per key the cache should hold: (sha256, flipped) with its path, domain and caption."""
    frame = dataset[DATASET_COLUMNS].copy()
    frame["caption"] = frame["caption"].astype(object).where(frame["caption"].notna(), None)
    dupes = frame["sha256"].duplicated()
    if dupes.any():  # ingest rejects duplicates, so this is a hand-made dataset: keep the first of each
        log.warning("dataset lists %d image(s) twice (same sha256); keeping the first row of each", int(dupes.sum()))
        frame = frame[~dupes]
    flips = [False, True] if flip else [False]
    return pd.concat([frame.assign(flipped=f) for f in flips], ignore_index=True)


@dataclass
class Plan:
    keep: pd.DataFrame  # index rows to keep, with their wanted domain/caption (may differ from stored)
    dirty: dict[str, pd.DataFrame]  # shard name -> its rows to keep (possibly none); rewrite these
    todo: pd.DataFrame  # wanted rows with no latent yet
    relabelled: int  # kept rows whose caption or domain changes


def plan_update(index: pd.DataFrame, wanted: pd.DataFrame, current_fp: str) -> Plan:
    index = index.assign(position=index.groupby("shard").cumcount()) if len(index) else index.assign(position=[])
    merged = index.merge(
        wanted[["sha256", "flipped", *METADATA]].rename(columns={c: f"{c}_wanted" for c in METADATA}),
        on=["sha256", "flipped"],
        how="left",
        indicator=True,
    )
    keep = (merged["fingerprint"] == current_fp) & (merged["_merge"] == "both")
    second_copies = merged[keep].duplicated(["sha256", "flipped"])  # none unless a shard was copied in by hand
    keep[second_copies[second_copies].index] = False
    changed = pd.Series(False, index=merged.index)
    for col in METADATA:
        stored, new = merged[col].astype(object), merged[f"{col}_wanted"].astype(object)
        changed |= ~((stored == new) | (stored.isna() & new.isna()))
    changed &= keep
    dirty_names = set(merged.loc[~keep | changed, "shard"])
    kept = merged[keep]
    dirty = {name: kept[kept["shard"] == name] for name in sorted(dirty_names)}
    have = set(zip(kept["sha256"], kept["flipped"]))
    todo_mask = [key not in have for key in zip(wanted["sha256"], wanted["flipped"])]
    return Plan(keep=kept, dirty=dirty, todo=wanted[todo_mask].reset_index(drop=True), relabelled=int(changed.sum()))


def _kept_rows(root: Path, shard: str, rows: pd.DataFrame) -> list[dict]:
    """The full rows (latent bytes included) at ``rows.position`` of ``shard``, with wanted metadata."""
    table = pq.read_table(root / shard).take(pa.array(rows["position"].to_numpy(), type=pa.int64()))
    out = table.to_pylist()
    for row, (domain, caption) in zip(out, zip(rows["domain_wanted"], rows["caption_wanted"])):
        row["domain"], row["caption"] = domain, caption
    return out


@dataclass(frozen=True)
class Unit:
    """One image to decode and the flips of it to encode."""

    path: str
    sha256: str
    domain: str
    caption: str | None
    flips: tuple[bool, ...]


def load_unit(unit: Unit, resolution: int) -> list[np.ndarray] | str:
    """The unit's crops as uint8 HWC arrays (one per flip), or the reason it could not be loaded."""
    try:
        data = read_file(unit.path)
        digest = hashlib.sha256(data).hexdigest()
        if digest != unit.sha256:
            return f"changed since ingest: sha256 {digest[:12]} != {unit.sha256[:12]} (rerun ingest)"
        img, _ = decode(data, MAX_PIXELS)
    except ImageError as exc:
        return str(exc)
    pixels = np.asarray(center_square(img, resolution))
    return [np.ascontiguousarray(pixels[:, ::-1]) if flipped else pixels for flipped in unit.flips]


def latent_masks(unit: Unit, masks_dir: Path, resolution: int, latent_px: int) -> list[bytes | None]:
    """The unit's face and eyes/mouth masks (the align stage's ``<sha>.png``: red, green) at latent size, as
    uint8 (2, h, w) bytes per flip, cropped like the image (an area average: a soft edge at latent size);
    None per flip when the crop has no mask (whole images)."""
    path = masks_dir / f"{unit.sha256}.png"
    if not path.exists():
        return [None for _ in unit.flips]
    with Image.open(path) as img:
        img = center_square(img.convert("RGB"), resolution)
    small = np.asarray(img.resize((latent_px, latent_px), Image.BOX))[..., :2]
    out = []
    for flipped in unit.flips:
        chw = np.ascontiguousarray((small[:, ::-1] if flipped else small).transpose(2, 0, 1))
        out.append(chw.tobytes())
    return out


def make_units(todo: pd.DataFrame) -> list[Unit]:
    units = []
    for sha, group in todo.groupby("sha256", sort=False):
        first = group.iloc[0]
        units.append(Unit(first["path"], sha, first["domain"], first["caption"], tuple(sorted(group["flipped"]))))
    return units


def batched_units(units: list[Unit], rows_per_batch: int) -> Iterator[list[Unit]]:
    batch, rows = [], 0
    for unit in units:
        batch.append(unit)
        rows += len(unit.flips)
        if rows >= rows_per_batch:
            yield batch
            batch, rows = [], 0
    if batch:
        yield batch


def encode_batch(codec: Codec, arrays: list[np.ndarray], device: torch.device, batch_size: int) -> list[torch.Tensor]:
    """uint8 HWC crops -> raw latents on the CPU, ``batch_size`` per forward pass."""
    out = []
    for start in range(0, len(arrays), batch_size):
        stacked = torch.from_numpy(np.stack(arrays[start : start + batch_size]))  # N, H, W, 3
        rgb = stacked.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)  # NCHW view, channels-last strides
        with torch.inference_mode():
            latents = codec.encode(rgb.contiguous(memory_format=torch.channels_last))
        out.extend(latents.float().cpu())
    return out


def update_cache(
    dataset: pd.DataFrame,
    root: Path | str,
    resolution: int,
    codec: Codec,
    cfg: CacheConfig,
    device: torch.device | str = "cpu",
    masks_dir: Path | None = None,
) -> CacheResult:
    """Bring ``root`` in line with ``dataset`` at ``resolution``; see the module docstring. With ``masks_dir``
    (the align stage's masks, by crop sha256) holding masks, every row also stores its masks at latent size."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    codec.latent_px(resolution)  # fails early, naming the codec factor, for a size it cannot encode
    if removed := remove_partial_writes(root, "shard-*.parquet"):
        log.info("removed %d temp file(s) of an interrupted run", removed)
    masked = masks_dir is not None and Path(masks_dir).is_dir() and any(Path(masks_dir).glob("*.png"))
    current_fp = cache_fingerprint(codec, resolution, masked)
    wanted = wanted_rows(dataset, cfg.flip)
    index = read_index(root)
    plan = plan_update(index, wanted, current_fp)
    for shard in sorted(root.glob(SHARD_GLOB)):  # written by older code: rewritten for streaming, never re-encoded
        if shard.name not in plan.dirty and needs_relayout(shard):
            plan.dirty[shard.name] = plan.keep[plan.keep["shard"] == shard.name]
    result = CacheResult(reused=len(plan.keep), pruned=len(index) - len(plan.keep), relabelled=plan.relabelled)
    shard_bytes = int(cfg.shard_mb * 2**20)
    writer = ShardWriter(root, shard_bytes)

    # The newest shard, when partly full and there is work, is topped up by the writer instead of
    # being rewritten on its own: incremental runs then do not leave a trail of tiny shards.
    reopen = None
    shards = sorted(root.glob(SHARD_GLOB), key=shard_number)
    if len(plan.todo) and shards:
        newest = shards[-1].name
        rows = plan.dirty.get(newest, plan.keep[plan.keep["shard"] == newest])
        if len(rows) and shards[-1].stat().st_size < shard_bytes:  # file size ~ latent bytes: float16 barely compresses
            reopen = newest
            writer.reopen(root / newest, _kept_rows(root, newest, rows))
            result.rewritten_shards.append(newest)

    for name, rows in plan.dirty.items():
        if name == reopen:
            continue
        if len(rows):
            write_shard(root / name, _kept_rows(root, name, rows))
        else:
            (root / name).unlink()
        result.rewritten_shards.append(name)

    if len(plan.todo):
        _encode_missing(plan.todo, root, resolution, codec, cfg, device, current_fp, writer, result, Path(masks_dir) if masked else None)
    result.new_shards = [p.name for p in writer.written if p.name != reopen]
    return result


def _encode_missing(
    todo: pd.DataFrame,
    root: Path,
    resolution: int,
    codec: Codec,
    cfg: CacheConfig,
    device: torch.device,
    current_fp: str,
    writer: ShardWriter,
    result: CacheResult,
    masks_dir: Path | None = None,
) -> None:
    units = make_units(todo)
    latent_px = codec.latent_px(resolution)
    progress = tqdm(total=len(todo), desc=f"cache@{resolution}", unit="row", mininterval=1.0)
    batches = batched_units(units, cfg.batch_size)
    job = _EncodeJob(codec, resolution, cfg.batch_size, cfg.workers, cfg.device, torch.get_num_threads())
    with progress:
        for batch, encoded in _encoded_batches(job, batches, device):
            for unit, latents in zip(batch, encoded):
                if isinstance(latents, str):
                    result.failed[unit.path] = latents
                    log.warning("%s: skipped: %s", unit.path, latents)
                    progress.update(len(unit.flips))
                    continue
                # the face masks are read here, by the writing process (small PNGs), wherever the encoding ran
                unit_masks = latent_masks(unit, masks_dir, resolution, latent_px) if masks_dir is not None else [None] * len(unit.flips)
                for flipped, latent, mask in zip(unit.flips, latents, unit_masks):
                    writer.add(
                        sha256=unit.sha256,
                        domain=unit.domain,
                        resolution=resolution,
                        codec_id=codec.id,
                        shape=list(latent.shape),
                        latent=to_bytes(latent),
                        flipped=flipped,
                        caption=unit.caption,
                        fingerprint=current_fp,
                        mask=mask,
                    )
                result.images_encoded += 1
                result.encoded += len(unit.flips)
                progress.update(len(unit.flips))
        writer.flush()


@dataclass(frozen=True)
class _EncodeJob:
    """What encoding needs, here or on a cluster worker (the codec travels to each worker once)."""

    codec: Codec
    resolution: int
    batch_size: int
    workers: int
    device: str
    # torch's intra-op threads of the stage process: a convolution's float rounding depends on it (TAEF2
    # latents at 1 and 2 threads differ in float16 bits), so the workers encode with the same count.
    torch_threads: int


def _encoded_batches(job: _EncodeJob, batches: Iterator[list[Unit]], device: torch.device) -> Iterator[tuple[list[Unit], list]]:
    """(batch, per unit: its latents, one per flip, or why it failed), in order. On a cluster
    (``stagewise.cluster.current()``) whole batches go to the workers in shards of about ``shard_images``
    units: the same batches as a local run, so the same latents; the shards stream back in order and
    this process writes them, so the shards on disk are the same files."""
    from stagewise.cluster import current

    cluster = current()
    if cluster is None:
        for batch, loaded in prefetched(batches, lambda u: load_unit(u, job.resolution), job.workers):
            yield batch, _encode_loaded(job, loaded, device)
        return
    from stagewise.cluster import absolute

    mine: list[list[list[Unit]]] = [[]]  # as given, for the results; the workers get absolute paths
    for batch in batches:
        if sum(map(len, mine[-1])) >= cluster.cfg.shard_images:
            mine.append([])
        mine[-1].append(batch)
    shards = [[[absolute(unit) for unit in batch] for batch in shard] for shard in mine]
    describe = lambda shard: f"{sum(map(len, shard))} images, {shard[0][0].path} .. {shard[-1][-1].path}"  # noqa: E731
    for shard, encoded in zip(mine, cluster.map_shards(_encode_shard, job, shards, desc=f"cache@{job.resolution}", describe=describe)):
        yield from zip(shard, encoded)


def _encode_loaded(job: _EncodeJob, loaded: list, device: torch.device) -> list:
    arrays = [a for group in loaded if not isinstance(group, str) for a in group]
    latents = iter(encode_batch(job.codec, arrays, device, job.batch_size) if arrays else [])
    return [group if isinstance(group, str) else [next(latents) for _ in group] for group in loaded]


def _encode_shard(job: _EncodeJob, shard: list[list[Unit]]) -> list[list]:
    """On a worker: decode and encode a shard's batches; latents come back as float16 (what is stored)."""
    from stagewise.device import pick_device

    device = pick_device(job.device)
    torch.set_num_threads(job.torch_threads)
    codec = job.codec.to(device)
    job = _EncodeJob(codec, job.resolution, job.batch_size, job.workers, job.device, job.torch_threads)
    out = []
    for _, loaded in prefetched(iter(shard), lambda u: load_unit(u, job.resolution), job.workers, pool=worker_pool(job.workers)):
        out.append([x if isinstance(x, str) else [latent.half() for latent in x] for x in _encode_loaded(job, loaded, device)])
    return out
