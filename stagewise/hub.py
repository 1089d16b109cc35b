"""Models named in params by hub id or local folder: resolve them, fail fast and clearly when absent.

Every model-backed stage (vlm_filter, the transformers captioner, CLIP scoring) takes a ``model`` key that
is either a Hugging Face hub id (``Salesforce/blip-vqa-base``) or a folder made with ``save_pretrained``.
``resolve`` turns it into a local folder *before* any ``from_pretrained`` call, so the loaders only ever
read local files:

- a folder: used as it is;
- a hub id: the cached snapshot, downloaded first when the machine may go online. ``HF_HUB_OFFLINE=1`` is
  read at call time (huggingface_hub reads it only at import) and means "cache only".

A missing model raises ``StageError`` naming the params key, the id tried, why (offline / unreachable / no
such repo) and how to point params at a local copy, within a second: ``from_pretrained`` on an unknown id
retries for 25-50 s before it gives up. ``identity`` is a content hash of the files that change a model's
output, for the per-image memo: moving or copying the folder keeps the memo, new weights invalidate it.

    path = resolve(cfg.model, section="vlm_filter", revision=cfg.revision)
    model = load_pretrained(BlipForQuestionAnswering, path, section="vlm_filter")
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Literal

from stagewise.cli import StageError

log = logging.getLogger(__name__)

# What a transformers / diffusers / open_clip model folder needs to load; READMEs, images and other
# frameworks' weights (TF, Flax, ONNX) are neither downloaded nor hashed.
MODEL_FILE_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken")
# Pickled weights only when a repository has no safetensors; transformers then loads them with
# torch.load(weights_only=True), which refuses anything but tensors.
PICKLED_WEIGHT_PATTERNS = ("*.bin",)
DType = Literal["auto", "float32", "bfloat16", "float16"]


def offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub's own constant is frozen at its import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "on", "yes", "true"}


def looks_like_path(ref: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; anything else with a separator or a leading . / ~ is a path."""
    return ref.startswith(("/", ".", "~")) or ref.endswith(("/", os.sep)) or ref.count("/") > 1 or (os.sep != "/" and os.sep in ref)


def how_to_fix(section: str, key: str, ref: str) -> str:
    return (
        f"To use a local copy: on a machine with access run `from_pretrained({ref!r})` and `save_pretrained('/path/to/folder')` "
        f"for the model and its processor (or `hf download {ref} --local-dir /path/to/folder`), copy the folder here and set "
        f"`{section}.{key}: /path/to/folder` in params.yaml."
    )


def resolve(
    ref: str, *, section: str, key: str = "model", revision: str | None = None, allow_patterns: tuple[str, ...] | None = None
) -> Path:
    """A local folder holding model ``ref`` (hub id or path); StageError when there is none.

    ``allow_patterns`` limits what is downloaded for a hub id (default: configs, tokenizers and
    safetensors weights, then ``*.bin`` only if the repository has no safetensors).
    """
    where = f"{section}.{key}"
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise StageError(f"{where}: {ref} is a file; expected a model folder made with save_pretrained (config.json and weights)")
    if looks_like_path(ref):
        raise StageError(f"{where}: no folder at {ref} (a local model folder made with save_pretrained, or a hub id such as owner/name)")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    patterns = list(allow_patterns or MODEL_FILE_PATTERNS)
    cache_only = offline()
    at = f"{ref}@{revision}" if revision else ref
    try:
        folder = Path(snapshot_download(ref, revision=revision, allow_patterns=patterns, local_files_only=cache_only))
        if allow_patterns is None and not any(folder.rglob("*.safetensors")):
            folder = Path(snapshot_download(ref, revision=revision, allow_patterns=patterns + list(PICKLED_WEIGHT_PATTERNS), local_files_only=cache_only))
    except LocalEntryNotFoundError:
        why = (
            "this machine is offline (HF_HUB_OFFLINE=1) and has no copy of it in the Hugging Face cache"
            if cache_only else "the hub cannot be reached from this machine and it has no copy in the Hugging Face cache"
        )
        raise StageError(f"{where}: cannot load model {at!r}: {why}. {how_to_fix(section, key, ref)}") from None
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise StageError(f"{where}: model {ref!r} is not on the hub or needs a login ({type(exc).__name__}); check the id, or use a local folder. {how_to_fix(section, key, ref)}") from None
    except RevisionNotFoundError:
        raise StageError(f"{where}: model {ref!r} has no revision {revision!r} (check {section}.revision)") from None
    except (HfHubHTTPError, OSError) as exc:
        raise StageError(f"{where}: cannot download model {at!r}: {exc}. {how_to_fix(section, key, ref)}") from None
    log.info("%s: %s resolved to %s", where, at, folder)
    return folder


def load_pretrained(loader: Any, path: Path, *, section: str, key: str = "model", **kwargs: Any) -> Any:
    """``loader.from_pretrained(path, **kwargs)`` with a folder that cannot be loaded turned into a StageError."""
    try:
        return loader.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        name = getattr(loader, "__name__", type(loader).__name__)
        raise StageError(f"{section}.{key}: {path} cannot be loaded as {name}: {str(exc).splitlines()[0]}") from None


def identity(folder: Path) -> str:
    """Content hash of the files in ``folder`` that change a model's output (configs, tokenizer, weights)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and _is_model_file(p.relative_to(folder)))
    if not files:
        raise StageError(f"{folder}: no model files (config.json, *.safetensors, ...) in this folder")
    stamp = tuple((str(p.relative_to(folder)), st.st_size, st.st_mtime_ns) for p in files for st in [p.stat()])
    return _hash_files(str(folder.resolve()), stamp)


def _is_model_file(rel: Path) -> bool:
    if any(part.startswith(".") for part in rel.parts):
        return False  # .cache/, .gitattributes: download bookkeeping, not the model
    return any(fnmatch.fnmatch(rel.name, pattern) for pattern in MODEL_FILE_PATTERNS + PICKLED_WEIGHT_PATTERNS)


@functools.lru_cache(maxsize=16)
def _hash_files(folder: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    """sha256 over (relative name, content) of each file; cached per process while sizes and mtimes hold
    (a multi-GB VLM costs a few seconds to hash, once)."""
    digest = hashlib.sha256()
    for rel, _size, _mtime in stamp:
        digest.update(rel.encode() + b"\0")
        with open(Path(folder) / rel, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()[:16]


def torch_dtype(name: DType, device: Any) -> Any:
    """The dtype a model runs in: ``auto`` is bfloat16 on a CUDA device that has it, else float16 on CUDA,
    else float32 (CPUs gain little from half precision and some ops lack it)."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if getattr(device, "type", str(device)) == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32
