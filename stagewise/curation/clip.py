"""CLIP through open_clip: image embeddings memoised per image, and zero-shot probabilities from prompt pairs.

The model is named in params the way open_clip names it and loaded by its own
``open_clip.create_model_and_transforms(model, pretrained=...)``:

- ``model: ViT-B-32`` + ``pretrained: laion2b_s34b_b79k``: a built-in architecture and a weight tag;
- ``model: ViT-B-32`` + ``pretrained: /path/open_clip_model.safetensors``: the same with a local checkpoint;
- ``model: local-dir:/path`` (a folder with ``open_clip_config.json`` and weights) or ``model: hf-hub:org/repo``;
- ``config_file: /path/my-clip.json`` registers a custom architecture (``embed_dim``, ``vision_cfg``,
  ``text_cfg``) under the file's stem, which ``model`` then names: how tests build a tiny random CLIP.

Offline, before anything is loaded, a tag or hub repository is looked up in the local Hugging Face cache
only; when it is not there and ``HF_HUB_OFFLINE=1`` the load fails at once with a message saying how to
point params at a local file (``stagewise.hub`` does the same for transformers models).

Embeddings (L2-normalised, stored float16) are memoised in a ResultStore keyed by content hash + the
fingerprint of the model (architecture, weights, preprocessing). Several stages share one store folder,
so the watermark cascade and the near-duplicate stage never embed the same image twice. Text prompts are
memoised the same way, so re-deciding from memoised embeddings never loads the model.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from pydantic import Field, field_validator

from stagewise.cli import StageError
from stagewise.config import Section, fingerprint
from stagewise.hub import identity as folder_identity
from stagewise.hub import looks_like_path, offline, resolve
from stagewise.images import load_verified
from stagewise.io import sha256_file
from stagewise.store import Lazy, ResultStore, memo_map

log = logging.getLogger(__name__)

CLIP_VERSION = 1  # bump when how an image becomes an embedding changes (decode, preprocessing, normalisation)
LOCAL_DIR, HF_HUB = "local-dir:", "hf-hub:"
# open_clip's weight file names inside a hub repository, safetensors first (never unpickled).
HUB_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class ClipConfig(Section):
    model: str = Field(min_length=1, description="open_clip architecture (ViT-B-32), local-dir:/folder or hf-hub:org/repo")
    # A weight tag of that architecture (open_clip.list_pretrained()) or a checkpoint file. Required with a
    # built-in architecture: a randomly initialised CLIP scores nothing.
    pretrained: str | None = None
    config_file: str | None = Field(None, description="JSON file of a custom architecture, registered under its file stem (= model)")
    batch_size: int = Field(32, ge=1, description="images per forward pass; 32 ViT-B-32 crops use ~1 GB of activations")
    workers: int = Field(2, ge=1, description="threads decoding and preprocessing the next batches while the model runs")
    device: str = "auto"  # cuda, then mps, then cpu
    max_pixels: int = Field(8192 * 8192, ge=1, description="decompression-bomb guard; keep equal to ingest.max_pixels")

    @field_validator("model")
    @classmethod
    def _schema_has_target(cls, model: str) -> str:
        for prefix in (LOCAL_DIR, HF_HUB):
            if model.startswith(prefix) and not model[len(prefix):].strip():
                raise ValueError(f"{prefix} needs a target, e.g. {prefix}{'/path/to/folder' if prefix == LOCAL_DIR else 'org/repo'}")
        return model


# ----------------------------------------------------------------------------------------------- locate


@dataclass(frozen=True)
class ClipRef:
    """A CLIP located on disk (or resolvable by open_clip from its cache), not loaded: enough to fingerprint."""

    model_name: str  # what create_model_and_transforms gets as model_name
    pretrained: str | None  # what it gets as pretrained (a tag, a file, or None with local-dir:)
    identity: str  # weights: content hash of a file or folder, or "<arch>/<tag>" for an immutable tag
    architecture: dict  # the model config dict, part of the fingerprint

    @property
    def fingerprint(self) -> str:
        return fingerprint("clip-embeddings", CLIP_VERSION, self.identity, self.architecture)


def locate(cfg: ClipConfig, section: str) -> ClipRef:
    """Resolve ``cfg`` to local files without loading a weight; StageError naming the key when impossible."""
    import open_clip

    key = f"{section}.model"
    if cfg.model.startswith(HF_HUB):
        if cfg.pretrained:
            raise StageError(f"{section}.pretrained: must be empty with {HF_HUB} (the repository holds the weights)")
        folder = resolve(cfg.model[len(HF_HUB):], section=section, key="model")
        return _local_dir(folder, section)
    if cfg.model.startswith(LOCAL_DIR):
        if cfg.pretrained:
            raise StageError(f"{section}.pretrained: must be empty with {LOCAL_DIR} (the folder holds the weights)")
        return _local_dir(Path(cfg.model[len(LOCAL_DIR):]).expanduser(), section)

    if cfg.config_file:
        config_path = Path(cfg.config_file).expanduser()
        if not config_path.is_file():
            raise StageError(f"{section}.config_file: no file at {config_path}")
        if config_path.stem != cfg.model:
            raise StageError(f"{section}.model: must be {config_path.stem!r}, the stem of config_file {config_path.name} (open_clip registers it under that name)")
        architecture = _read_json(config_path, f"{section}.config_file")
        if not all(k in architecture for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise StageError(f"{section}.config_file: {config_path} needs embed_dim, vision_cfg and text_cfg")
        open_clip.add_model_config(config_path)
    architecture = open_clip.get_model_config(cfg.model)
    if architecture is None:
        raise StageError(f"{key}: unknown open_clip architecture {cfg.model!r}; known: {', '.join(open_clip.list_models()[:12])}, ... "
                         "(or local-dir:/folder, hf-hub:org/repo, or a custom one with config_file)")
    if not cfg.pretrained:
        raise StageError(f"{section}.pretrained: required with architecture {cfg.model!r}: a weight tag "
                         f"({', '.join(open_clip.list_pretrained_tags_by_model(cfg.model)[:4]) or 'none built in'}) or a checkpoint file")
    weights = Path(cfg.pretrained).expanduser()
    if weights.is_file():
        return ClipRef(cfg.model, str(weights), _file_identity(str(weights.resolve()), *_stat(weights)), architecture)
    if looks_like_path(cfg.pretrained) or weights.suffix in {".safetensors", ".bin", ".pt", ".pth"}:
        raise StageError(f"{section}.pretrained: no checkpoint file at {cfg.pretrained}")
    tag_cfg = open_clip.get_pretrained_cfg(cfg.model, cfg.pretrained)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(cfg.model)
        raise StageError(f"{section}.pretrained: {cfg.pretrained!r} is neither a file nor a weight tag of {cfg.model} (tags: {', '.join(tags) or 'none'})")
    _check_tag_available(cfg, tag_cfg, section)
    return ClipRef(cfg.model, cfg.pretrained, f"{cfg.model}/{cfg.pretrained}", architecture)


def _local_dir(folder: Path, section: str) -> ClipRef:
    config = folder / "open_clip_config.json"
    if not config.is_file():
        raise StageError(f"{section}.model: {folder} has no open_clip_config.json (a folder saved for open_clip, as on the hub)")
    architecture = _read_json(config, f"{section}.model").get("model_cfg")
    if not architecture:
        raise StageError(f"{section}.model: {config} has no model_cfg")
    return ClipRef(f"{LOCAL_DIR}{folder}", None, folder_identity(folder), architecture)


def _check_tag_available(cfg: ClipConfig, tag_cfg: dict, section: str) -> None:
    """Fail now, clearly, when the tag's weights are not cached and the machine must stay offline."""
    if not offline():
        return  # open_clip downloads them (once) into the usual cache
    fix = (f"On a machine with access run `open_clip.create_model_and_transforms({cfg.model!r}, pretrained={cfg.pretrained!r})` "
           f"(or download the repository's open_clip_model.safetensors), copy the file here and set `{section}.pretrained: "
           f"/path/to/open_clip_model.safetensors`; or set `{section}.model: local-dir:/path/to/folder` for a folder with open_clip_config.json.")
    if tag_cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        # open_clip's convention: "org/repo/" means the default file names, "org/repo/file" that file.
        repo, filename = os.path.split(tag_cfg["hf_hub"])
        names = {*HUB_WEIGHT_FILES, filename, Path(filename).with_suffix(".safetensors").name} if filename else set(HUB_WEIGHT_FILES)
        if any(isinstance(try_to_load_from_cache(repo, name), str) for name in names):
            return
        where = f"the Hugging Face cache has no {repo}"
    else:
        url = tag_cfg.get("url", "")
        if (Path("~/.cache/clip").expanduser() / os.path.basename(url)).is_file():
            return
        where = f"~/.cache/clip has no {os.path.basename(url)}"
    raise StageError(f"{section}.pretrained: cannot load CLIP weights {cfg.model}/{cfg.pretrained}: this machine is offline "
                     f"(HF_HUB_OFFLINE=1) and {where}. {fix}")


def _read_json(path: Path, key: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StageError(f"{key}: {path} is not readable JSON: {exc}") from None


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=8)
def _file_identity(path: str, size: int, mtime_ns: int) -> str:
    """Content hash of a checkpoint, once per process while its size and mtime hold."""
    return sha256_file(path)[:16]


# ------------------------------------------------------------------------------------------------- load


class ClipModel:
    """A loaded CLIP: ``embed_images`` / ``embed_texts`` return L2-normalised float32 rows."""

    def __init__(self, ref: ClipRef, model: Any, preprocess: Any, tokenizer: Any, device: Any):
        self.ref, self.model, self.preprocess, self.tokenizer, self.device = ref, model, preprocess, tokenizer, device

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())

    def embed_tensors(self, pixels: Any) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model.encode_image(pixels.to(self.device), normalize=True)
        return out.float().cpu().numpy()

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        import torch

        return self.embed_tensors(torch.stack([self.preprocess(img) for img in images]))

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model.encode_text(self.tokenizer(texts).to(self.device), normalize=True)
        return out.float().cpu().numpy()


def load_clip(ref: ClipRef, cfg: ClipConfig, section: str) -> ClipModel:
    import open_clip

    from stagewise.device import pick_device

    device = pick_device(cfg.device)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(ref.model_name, pretrained=ref.pretrained, device=device)
        tokenizer = open_clip.get_tokenizer(ref.model_name)
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        raise StageError(f"{section}.model: cannot load CLIP {ref.model_name} (pretrained {ref.pretrained}): {str(exc).splitlines()[0]}") from None
    model.eval()
    log.info("%s: loaded CLIP %s (%s) on %s", section, ref.model_name, ref.pretrained or "folder weights", device)
    return ClipModel(ref, model, preprocess, tokenizer, device)


# ------------------------------------------------------------------------------------------- embeddings


@dataclass
class EmbedResult:
    embeddings: dict[str, np.ndarray]  # sha256 -> float16 unit vector
    errors: dict[str, str]  # sha256 -> why it could not be read (not memoised: the file may be fixed)
    embedded: int  # images the model ran on this call (the rest were memoised)


class Embedder:
    """Memoised CLIP embeddings for one configured model; the model is loaded on first need only."""

    def __init__(self, cfg: ClipConfig, store_dir: Path, section: str):
        self.cfg, self.section, self.store_dir = cfg, section, Path(store_dir)
        self.ref = locate(cfg, section)
        self._lazy = Lazy(lambda: load_clip(self.ref, self.cfg, self.section))

    @property
    def model(self) -> ClipModel:
        return self._lazy.get()

    @property
    def _model(self) -> ClipModel | None:
        """The model when loaded, else None (a memoised run never loads it)."""
        return self._lazy.value

    def images(self, rows: pd.DataFrame, desc: str = "clip") -> EmbedResult:
        """Embeddings of every distinct image in ``rows`` (columns path, sha256); only new ones are computed.
        Decoding + preprocessing of the next batches (threads) overlaps the model's work on this one."""
        store = ResultStore(self.store_dir / "images", self.ref.fingerprint, flush_every=max(self.cfg.batch_size * 8, 256))
        result = memo_map(rows, store, self._pixels, self._embed, batch_size=self.cfg.batch_size, workers=self.cfg.workers, desc=desc)
        return EmbedResult({sha: _vector(values) for sha, values in result.values.items()}, result.errors, result.computed)

    def _pixels(self, row: Any) -> Any:  # in a decoding thread; an unreadable image never loads the model
        image = load_verified(row.path, row.sha256, self.cfg.max_pixels)
        return self.model.preprocess(image)

    def _embed(self, rows: list[Any], pixels: list[Any]) -> list[dict[str, Any]]:
        import torch

        vectors = self.model.embed_tensors(torch.stack(pixels)).astype(np.float16)
        return [{"embedding": vec.tobytes(), "dim": int(vec.shape[0])} for vec in vectors]

    def texts(self, texts: list[str]) -> tuple[np.ndarray, float]:
        """(unit text embeddings float32 [len(texts), dim], logit scale), memoised by prompt text."""
        store = ResultStore(self.store_dir / "texts", self.ref.fingerprint)
        keys = [sha256(t.encode()).hexdigest() for t in texts]
        memo = store.lookup()
        if not all(k in memo for k in keys):
            vectors, scale = self.model.embed_texts(texts), self.model.logit_scale
            with store:
                for key, text, vec in zip(keys, texts, vectors):
                    store.add(key, text=text, embedding=vec.astype(np.float32).tobytes(), dim=int(vec.shape[0]), logit_scale=scale)
            return vectors.astype(np.float32), scale
        return np.stack([np.frombuffer(memo[k]["embedding"], dtype=np.float32) for k in keys]), float(memo[keys[0]]["logit_scale"])


def _vector(row: dict) -> np.ndarray:
    return np.frombuffer(row["embedding"], dtype=np.float16)


def zero_shot(embeddings: np.ndarray, pairs: list[tuple[str, str]], embedder: Embedder) -> np.ndarray:
    """P(first prompt) of each (positive, negative) prompt pair, averaged over the pairs, per image row:
    CLIP's two-way softmax over logit_scale x cosine, as in its zero-shot classification."""
    texts, scale = embedder.texts([t for pair in pairs for t in pair])
    logits = scale * embeddings.astype(np.float32) @ texts.T  # [n, 2 x pairs]
    logits = logits.reshape(len(embeddings), len(pairs), 2)
    logits -= logits.max(axis=2, keepdims=True)
    probs = np.exp(logits)
    return (probs[..., 0] / probs.sum(axis=2)).mean(axis=1)


def as_matrix(embeddings: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
    """float32 [len(keys), dim] in ``keys`` order."""
    if not keys:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack([embeddings[k] for k in keys]).astype(np.float32)
