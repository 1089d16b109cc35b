"""Checkpoints: safetensors for tensors, JSON for everything else. Nothing is ever unpickled.

Two kinds of file:

* a stage's **model** (``runs/<stage>/model.safetensors`` + ``meta.json``): the weights and what is needed
  to rebuild the architecture (``meta["architecture"]``), plus the resolved config, parent and codec;
* **backups** of the whole training state in ``runs/<stage>/backups/<fingerprint>/`` (a DVC ``persist``
  folder): ``<kind>-<images_seen>.safetensors`` with every tensor (model, EMA, optimizer moments,
  discriminator and its optimizer) and a ``.json`` beside it with the rest (images seen, step, LR scale,
  epsilon, scaler, history, events). The JSON is written last, so a backup without it is incomplete and
  ignored. ``rolling`` backups are pruned to the newest K; ``start`` and ``end`` backups are kept.

The fingerprint folder is keyed by the stage's resolved config, the codec, the parent model's hash, the
cache rows and the content hash of the stage's code (``stagewise.code``), so a changed config, parent,
dataset or code starts fresh from the parent instead of resuming stale state.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from stagewise.io import atomic_path, partial_write_pattern, remove_partial_writes, write_json
from stagewise.models.autoencoder import Autoencoder, build

MODEL_FILE, META_FILE = "model.safetensors", "meta.json"
CARRY_FILE = "state.safetensors"  # a stage's optimizer / EMA / discriminator state for its children (TrainState.carry_tensors)
KEPT_KINDS = ("start", "end")  # never pruned: the stage boundaries (and so every freeze change)
BACKUP_NAME = re.compile(r"^(rolling|start|end)-(\d{12})\.json$")  # a backup's JSON, the tensors beside it
# The ``.tmpXXXXXX`` that safetensors' save_file writes before renaming it to the name it was given.
SAFETENSORS_TMP = re.compile(r"^\.tmp[A-Za-z0-9_]{6}$")


def partial_write(name: str) -> bool:
    """A temp file of a save in progress or interrupted: safetensors' own, or stagewise.io's around it."""
    return bool(SAFETENSORS_TMP.match(name) or partial_write_pattern().match(name))


class NonFiniteError(RuntimeError):
    """Refused to save tensors that hold NaN or inf."""


class SaveError(OSError):
    """A write failed (a full disk, a file-size or quota limit): the file it was replacing is untouched.
    Carries the errno when there is one, so `stagewise.cli` can tell a full disk from a bug."""

    def __str__(self) -> str:  # the message alone, not OSError's "[Errno 28] message"
        return self.strerror if self.errno is not None else super().__str__()


def nonfinite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating tensors holding NaN/inf (one host sync for the whole dict)."""
    names = [n for n, t in tensors.items() if t.is_floating_point()]
    if not names:
        return []
    flags = torch.stack([torch.isfinite(tensors[n]).all() for n in names]).cpu()
    return [n for n, ok in zip(names, flags.tolist()) if not ok]


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    bad = nonfinite(tensors)
    if bad:
        raise NonFiniteError(f"not saving {path.name}: non-finite values in {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
    cpu = {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}
    try:
        with atomic_path(path) as tmp:
            save_file(cpu, str(tmp), metadata=metadata)
    except (OSError, SafetensorError) as exc:  # safetensors reports I/O errors as its own type: "... (os error 28)"
        code = exc.errno if isinstance(exc, OSError) else int(m[1]) if (m := re.search(r"os error (\d+)", str(exc))) else None
        raise SaveError(*([code] if code is not None else []), f"could not write {path}: {exc}") from exc


def save_model(folder: Path, model: Autoencoder, meta: dict[str, Any], state: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``model.safetensors`` (``state``, default the model's own) then ``meta.json``."""
    folder = Path(folder)
    save_tensors(folder / MODEL_FILE, state if state is not None else model.state_dict())
    write_json(folder / META_FILE, {**meta, "architecture": model.describe()})


def load_carry(folder: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor] | None:
    """The parent stage's carried state, or None (the init model has none)."""
    path = Path(folder) / CARRY_FILE
    return load_file(str(path), device=str(device)) if path.exists() else None


def load_model(folder: Path, device: torch.device | str = "cpu") -> tuple[Autoencoder, dict[str, Any]]:
    folder = Path(folder)
    meta_path, weights_path = folder / META_FILE, folder / MODEL_FILE
    if not meta_path.exists() or not weights_path.exists():
        raise FileNotFoundError(f"{folder}: no {MODEL_FILE} + {META_FILE}; run the stage that writes it first")
    meta = json.loads(meta_path.read_text())
    model = build(meta["architecture"], device)
    model.load_state_dict(load_file(str(weights_path), device=str(device)))
    return model, meta


# ----------------------------------------------------------------------------------------- optimizers


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str], prefix: str) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state keyed by parameter name (``<prefix>.<param>.<key>``)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if len(params) != len(names):
        raise ValueError(f"{prefix}: {len(names)} names for {len(params)} parameters")
    out = {}
    for name, param in zip(names, params):
        for key, value in optimizer.state.get(param, {}).items():
            if not torch.is_tensor(value):  # Adam's state is all tensors; anything else would be lost
                raise TypeError(f"{prefix}: state {key!r} of {name} is not a tensor")
            out[f"{prefix}.{name}.{key}"] = value
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str], prefix: str, tensors: dict[str, torch.Tensor]) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for index, name in enumerate(names):
        head = f"{prefix}.{name}."
        entry = {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}
        if entry:
            state[index] = entry
    if len(names) != len(params):
        raise ValueError(f"{prefix}: {len(names)} names for {len(params)} parameters")
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


# --------------------------------------------------------------------------------------------- backups


@dataclass
class Backup:
    kind: str
    images_seen: int
    json_path: Path

    @property
    def tensors_path(self) -> Path:
        return self.json_path.with_suffix(".safetensors")

    def load(self, device: torch.device | str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return load_file(str(self.tensors_path), device=str(device)), json.loads(self.json_path.read_text())


class Backups:
    """Backups of one stage run, in ``root/<fingerprint>/``."""

    def __init__(self, root: Path, fingerprint: str, keep: int):
        self.root, self.fingerprint, self.keep = Path(root), fingerprint, keep
        self.folder = self.root / fingerprint

    def list(self) -> list[Backup]:
        found = []
        if self.folder.exists():
            for path in self.folder.glob("*.json"):
                match = BACKUP_NAME.match(path.name)
                if match and path.with_suffix(".safetensors").exists():
                    found.append(Backup(match[1], int(match[2]), path))
        return sorted(found, key=lambda b: (b.images_seen, b.kind != "rolling"))

    def remove_partial_writes(self) -> int:
        """Delete temp files of saves a kill interrupted: never valid backups, each up to a backup's size, and
        named by a dead process, so nothing else would ever remove them. A stage's backups folder has one
        writer at a time (DVC's lock, or one `python -m stages.train` per stage)."""
        leftovers = [p for p in self.folder.glob(".tmp*") if SAFETENSORS_TMP.match(p.name)] if self.folder.is_dir() else []
        for path in leftovers:
            path.unlink(missing_ok=True)
        return len(leftovers) + remove_partial_writes(self.folder)

    def latest(self, max_images: int | None = None) -> Backup | None:
        """The newest complete backup (with at most ``max_images`` seen, when given)."""
        usable = [b for b in self.list() if max_images is None or b.images_seen <= max_images]
        return usable[-1] if usable else None

    def save(self, kind: str, images_seen: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Backup:
        """Write a backup (tensors first, JSON last) and prune rolling ones beyond ``keep``."""
        stem = f"{kind}-{images_seen:012d}"
        json_path = self.folder / f"{stem}.json"
        json_path.unlink(missing_ok=True)  # an older backup of the same name is incomplete from here on
        try:
            save_tensors(self.folder / f"{stem}.safetensors", tensors)
            write_json(json_path, {**meta, "kind": kind, "images_seen": images_seen, "fingerprint": self.fingerprint})
        except OSError as exc:  # a full disk: leave no tensors file without its JSON behind (it could never be used)
            json_path.with_suffix(".safetensors").unlink(missing_ok=True)
            if isinstance(exc, SaveError):
                raise
            raise SaveError(*([exc.errno] if exc.errno is not None else []), f"could not write {json_path}: {exc}") from exc
        rolling = [b for b in self.list() if b.kind == "rolling"]
        for old in rolling[: max(0, len(rolling) - self.keep)]:
            old.json_path.unlink(missing_ok=True)  # JSON first: a half-pruned backup is never taken as valid
            old.tensors_path.unlink(missing_ok=True)
        return Backup(kind, images_seen, json_path)

    def prune_other_fingerprints(self) -> list[Path]:
        """Remove state left by configs that no longer exist (called when this run has finished)."""
        removed = []
        for folder in self.root.glob("*"):
            if folder.is_dir() and folder.name != self.fingerprint:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
        return removed
