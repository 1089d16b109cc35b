"""Content hashes of the code that defines a stage's result, for resume keys.

A training stage resumes from a backup only when the code that produced it is the code that runs now:
after a fix to the loss, the warp or the model, ``dvc repro`` reruns the stage (its code deps changed)
and the stage must then train from its parent again, not reload its old ``end`` backup and republish the
old weights. A killed run with unchanged code has the same hash and resumes.

``TRAIN_CODE`` / ``DIFFUSE_CODE`` are the code deps of dvc.yaml's ``train`` / ``diffuse`` stages (tests/test_code.py checks that
the two agree), as paths relative to the folder holding the ``stagewise`` package that runs: the
project root of a checkout or of a copy of it, or site-packages for an installed wheel.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import stagewise

# The code deps of dvc.yaml's `train` stage, in its order. Data deps (parent weights, cache) are hashed
# separately by the trainer (parent sha256, the cache's row fingerprint).
TRAIN_CODE = ("stages/train.py", "stagewise/train", "stagewise/models", "stagewise/codecs", "stagewise/latents.py")
# The code deps of dvc.yaml's `diffuse` stage, in its order (same check, same reason).
DIFFUSE_CODE = ("stages/diffuse.py", "stagewise/diffusion", "stagewise/train", "stagewise/codecs", "stagewise/latents.py")
CODE_ROOT = Path(stagewise.__file__).resolve().parents[1]
IGNORED = ("__pycache__",)  # as .dvcignore: bytecode written on import changes no result
IGNORED_SUFFIXES = (".pyc",)


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and not any(part in IGNORED for part in p.parts) and p.suffix not in IGNORED_SUFFIXES)


def code_fingerprint(deps: tuple[str, ...] = TRAIN_CODE, root: Path = CODE_ROOT) -> str:
    """sha256 over every file of ``deps`` under ``root``: each one's relative path and bytes (a missing
    dep hashes as missing, so removing a file changes the result too)."""
    digest = hashlib.sha256()
    for dep in deps:
        path = root / dep
        files = _files(path) if path.exists() else []
        digest.update(f"{dep}\0{len(files)}\0".encode())
        for file in files:
            digest.update(f"{file.relative_to(root).as_posix()}\0".encode())
            digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()
