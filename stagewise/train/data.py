"""Training data: one resolution of the latent cache, held on the device, in a reproducible order.

The cache stores raw codec latents as float16 (``stagewise.latents``); they stay float16 on the device
and are normalised per batch (``codec.normalize``), so changing the codec scale never re-encodes.

Held-out images (``holdout_per_domain``) are chosen by sha256, so every stage and every resolution
holds out the same images, and they are never trained on (neither flip).

The order is a pure function of the position: domain d's stream is the concatenation of permutations
``randperm(N_d, seed=(seed, d, epoch))``, and a batch is a slice of that stream. A resumed run therefore
draws exactly the batches an uninterrupted one would, with no data-loader state to save.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from stagewise.cli import StageError
from stagewise.codecs import Codec
from stagewise.config import fingerprint
from stagewise.latents import from_rows, read_latents
from stagewise.models.autoencoder import DOMAINS

log = logging.getLogger(__name__)
FIXED_ROWS = 8  # training rows kept aside for previews (preview_rows is at most this)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (splitmix-style), so nearby inputs give unrelated streams."""
    x = 0x9E3779B97F4A7C15
    for part in parts:
        x = (x ^ (part + 0x9E3779B97F4A7C15 + (x << 6) + (x >> 2))) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


class StageData:
    def __init__(self, cache_dir: Path, codec: Codec, resolution_px: int, holdout_per_domain: int, use_flipped: bool, seed: int, device: torch.device):
        self.codec, self.seed, self.device = codec, seed, device
        try:
            frame = read_latents(cache_dir)
        except FileNotFoundError as exc:
            raise StageError(str(exc)) from None
        codec_ids = sorted(set(frame["codec_id"]))
        if codec_ids != [codec.id]:
            raise StageError(f"{cache_dir}: latents were made by codec {', '.join(codec_ids)} but this run uses {codec.id}; rerun the cache stage (`dvc repro cache`)")
        resolutions = sorted(set(frame["resolution"]))
        if resolutions != [resolution_px]:
            raise StageError(f"{cache_dir}: holds resolution(s) {resolutions}, the stage trains at {resolution_px} px")
        self.train: dict[str, torch.Tensor] = {}
        self.heldout: dict[str, torch.Tensor] = {}
        self.fixed: dict[str, torch.Tensor] = {}  # a few unflipped training rows, for previews
        self.has_flipped = bool(frame["flipped"].any())
        self.use_flipped = use_flipped and self.has_flipped
        ids = []
        for domain in DOMAINS:
            rows = frame[frame["domain"] == domain]
            shas = sorted(set(rows["sha256"]))
            if len(shas) <= holdout_per_domain:
                raise StageError(f"{cache_dir}: domain {domain!r} has {len(shas)} image(s); holdout_per_domain {holdout_per_domain} would leave none to train on")
            held = set(shas[:holdout_per_domain])
            train_rows = rows[~rows["sha256"].isin(held) & (self.use_flipped | ~rows["flipped"])]
            held_rows = rows[rows["sha256"].isin(held) & ~rows["flipped"]]
            self.train[domain] = from_rows(train_rows).to(device)
            self.fixed[domain] = from_rows(train_rows[~train_rows["flipped"]].head(FIXED_ROWS)).to(device)
            if len(held_rows):
                self.heldout[domain] = from_rows(held_rows).to(device)
            ids += [f"{domain}:{s}:{int(f)}" for s, f in zip(train_rows["sha256"], train_rows["flipped"])]
        self.fingerprint = fingerprint(codec.id, resolution_px, ids)  # which rows, in which order
        self._perm: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.train[DOMAINS[0]].shape[1:])

    def count(self, domain: str) -> int:
        return len(self.train[domain])

    def _permutation(self, domain_index: int, epoch: int) -> torch.Tensor:
        key = (domain_index, epoch)
        if key not in self._perm:
            n = len(self.train[DOMAINS[domain_index]])
            gen = torch.Generator().manual_seed(mix_seed(self.seed, domain_index, epoch))
            self._perm = {k: v for k, v in self._perm.items() if k[1] >= epoch - 1}  # keep memory flat
            self._perm[key] = torch.randperm(n, generator=gen).to(self.device)
        return self._perm[key]

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

    def batch(self, domain: str, position: int, count: int) -> torch.Tensor:
        """Normalised float32 latents (count, C, H, W) on the device."""
        raw = self.train[domain].index_select(0, self.indices(domain, position, count))
        return self.codec.normalize(raw.float())

    def first(self, domain: str, count: int, heldout: bool = False) -> torch.Tensor:
        """The first ``count`` images (unflipped) in sha256 order: fixed rows for previews and metrics."""
        source = self.heldout.get(domain) if heldout else self.fixed[domain]
        if source is None:
            return torch.empty(0, device=self.device)
        return self.codec.normalize(source[:count].float())
