"""A phase's data: one ``cache@<px>`` folder's rows, their captions as frozen text embeddings, subsets,
held-out validation rows, and a reproducible endless order.

The order is a pure function of (seed, position): epoch e lists every training row ``repeats`` times (a
fractional part is one more appearance with that chance, drawn from (seed, e)), shuffled by
``randperm(seed, e)``; a batch is a slice of the concatenated epochs. A resumed phase draws exactly the
rows an uninterrupted one would, and knows its epoch, with no loader state to save.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import torch

from stagewise.cli import StageError
from stagewise.codecs import Codec
from stagewise.config import fingerprint
from stagewise.diffusion.config import PhaseConfig, phase_error
from stagewise.latents import from_rows, read_latents
from stagewise.train.data import mix_seed

ALL = "all"  # the one subset name when a phase has none


def read_rows(cache_dir: Path) -> pd.DataFrame:
    """Every latent row of the cache folder (the one place that reads it: swap in a streamed reader here)."""
    try:
        return read_latents(cache_dir)
    except FileNotFoundError as exc:
        raise StageError(str(exc)) from None


def subset_of(frame: pd.DataFrame, cfg: PhaseConfig, phase: str, check: bool) -> pd.Series:
    """Index into ``cfg.subsets`` of each row's first matching subset (-1: none); 0 for all when there are none."""
    if not cfg.subsets:
        return pd.Series(0, index=frame.index)
    which = pd.Series(-1, index=frame.index)
    for i, (name, sub) in enumerate(cfg.subsets.items()):
        mask = pd.Series(True, index=frame.index)
        if sub.caption_regex is not None:
            pattern = re.compile(sub.caption_regex)
            mask &= frame["caption"].fillna("").map(lambda c: bool(pattern.search(c)))
        if sub.domain is not None:
            mask &= frame["domain"] == sub.domain
        if check and not mask.any():
            key = "caption_regex" if sub.caption_regex is not None else "domain"
            examples = ", ".join(repr(c) for c in sorted(set(frame["caption"].fillna("")))[:3])
            domains = ", ".join(sorted(set(frame["domain"])))
            raise phase_error(phase, f"subsets.{name}.{key}", f"matches none of the {len(frame)} training rows (domains {domains}; captions e.g. {examples})")
        which[(which < 0) & mask] = i
    return which


class PhaseData:
    def __init__(self, cache_dir: Path, codec: Codec, cfg: PhaseConfig, phase: str, device: torch.device):
        self.cfg, self.codec, self.device = cfg, codec, device
        frame = read_rows(cache_dir)
        codec_ids = sorted(set(frame["codec_id"]))
        if codec_ids != [codec.id]:
            raise StageError(f"{cache_dir}: latents were made by codec {', '.join(codec_ids)} but the codec section gives {codec.id}; rerun the cache stage (`dvc repro cache`) or fix codec.name / codec.weights")
        if sorted(set(frame["resolution"])) != [cfg.resolution_px]:
            raise phase_error(phase, "resolution_px", f"{cfg.resolution_px}, but {cache_dir} holds {sorted(set(frame['resolution']))} px latents")
        held = set()
        for _, rows in frame.groupby("domain"):
            held |= set(sorted(set(rows["sha256"]))[: cfg.holdout_per_domain])
        is_held = frame["sha256"].isin(held)
        train = frame[~is_held & (cfg.flip | ~frame["flipped"])].reset_index(drop=True)
        if train.empty:
            raise phase_error(phase, "holdout_per_domain", f"{cfg.holdout_per_domain} leaves no rows of {cache_dir} to train on")
        train["subset"] = subset_of(train, cfg, phase, check=True)
        train = train[train["subset"] >= 0].reset_index(drop=True)
        val = frame[is_held & ~frame["flipped"]] if is_held.any() else train[~train["flipped"]]
        val = val.head(cfg.validation.rows).reset_index(drop=True)
        val["subset"] = subset_of(val, cfg, phase, check=False)
        self.subset_names = list(cfg.subsets) or [ALL]
        self.val_subset_names = [self.subset_names[i] if i >= 0 else "other" for i in val["subset"]]
        self.heldout = bool(is_held.any())

        self.captions = sorted(set(train["caption"].fillna("")) | set(val["caption"].fillna("")) | set(cfg.samples.prompts) | {""})
        index = {c: i for i, c in enumerate(self.captions)}
        self.latents = from_rows(train).to(device)  # raw float16, normalised per batch
        self.caption_index = torch.tensor([index[c] for c in train["caption"].fillna("")], device=device)
        subs = list(cfg.subsets.values())
        self.subset = torch.tensor(train["subset"].to_numpy(), device=device)
        self.dropout = torch.tensor([(subs[i].caption_dropout if subs and subs[i].caption_dropout is not None else cfg.caption_dropout) for i in train["subset"]], device=device)
        self.loss_weight = torch.tensor([subs[i].loss_weight if subs else 1.0 for i in train["subset"]], device=device)
        self.repeats = torch.tensor([subs[i].repeats if subs else 1.0 for i in train["subset"]], dtype=torch.float64)
        self.val_latents = from_rows(val).to(device)
        self.val_caption_index = torch.tensor([index[c] for c in val["caption"].fillna("")], device=device)
        self.train_captions = list(train["caption"].fillna(""))
        self.counts = {name: int((train["subset"] == i).sum()) for i, name in enumerate(self.subset_names)}
        self.fingerprint = fingerprint(codec.id, cfg.resolution_px, [f"{d}:{s}:{int(f)}" for d, s, f in zip(train["domain"], train["sha256"], train["flipped"])])
        self._epochs: dict[int, torch.Tensor] = {}  # row indices of recent epochs
        self._starts: list[int] = [0]  # stream position where each epoch starts (one int per epoch so far)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.latents.shape[1:])

    def _make_epoch(self, e: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(mix_seed(self.cfg.seed, 11, e))
        whole = self.repeats.floor()
        extra = (torch.rand(len(self.repeats), generator=gen, dtype=torch.float64) < self.repeats - whole).double()
        rows = torch.repeat_interleave(torch.arange(len(self.repeats)), (whole + extra).long())
        if rows.numel() == 0:  # every repeat below 1 and no draw hit: one pass, so the stream never stalls
            rows = torch.arange(len(self.repeats))
        return rows[torch.randperm(len(rows), generator=gen)]

    def _epoch(self, e: int) -> torch.Tensor:
        while len(self._starts) <= e + 1:  # lengths of the epochs before e (their rows are not kept)
            n = len(self._starts) - 1
            self._epochs[n] = self._make_epoch(n)
            self._starts.append(self._starts[-1] + len(self._epochs[n]))
            self._epochs = {k: v for k, v in self._epochs.items() if k >= n - 1}  # memory stays flat
        if e not in self._epochs:
            self._epochs[e] = self._make_epoch(e)
        return self._epochs[e]

    def indices(self, position: int, count: int) -> tuple[torch.Tensor, int]:
        """Rows ``position .. position + count`` of the endless stream, and the epoch of the first one."""
        parts, pos, e = [], position, 0
        while True:
            self._epoch(e)
            if self._starts[e + 1] > pos:
                break
            e += 1
        first_epoch = e
        while pos < position + count:
            rows = self._epoch(e)
            offset = pos - self._starts[e]
            take = min(len(rows) - offset, position + count - pos)
            parts.append(rows[offset : offset + take])
            pos += take
            e += 1
        return torch.cat(parts).to(self.device), first_epoch

    def batch(self, rows: torch.Tensor) -> torch.Tensor:
        return self.codec.normalize(self.latents.index_select(0, rows).float())
