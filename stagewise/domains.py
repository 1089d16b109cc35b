"""The user's input folders: params.yaml ``data.domains``, one image folder per domain of the model.

``dvc.yaml`` reads ``data.domains`` through DVC's templating (``${data.domains.a}``), so the folders are
real dependencies of ``ingest`` and ``caption``: adding, changing or deleting a file in one makes them
stale. Folders may sit outside the repository, be read-only and hold nested subfolders; they are only
ever read. A relative path is relative to the project root (where dvc.yaml is).

``check_folders`` runs before any work (the ``domains`` stage, first in the DAG, and ``ingest`` itself):
DVC's own message for a missing dependency names only the path, so a typo in params would otherwise
surface as ``[Errno 2] No such file or directory`` with no hint of which key to fix.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, field_validator

from stagewise.config import ParamsError, Section
from stagewise.images import IMAGE_SUFFIXES

DOMAINS = ("a", "b")  # the two domains of the swap; names match the manifest's and the cache's `domain` column
SAMPLE_HINT = "the embedded sample is built by `make demo` or `python -m stages.sample --out data/sample`"


class DataConfig(Section):
    # Default: the embedded sample, which `make demo` builds into data/sample (it is not a DVC stage, so
    # that nothing in the DAG depends on or rebuilds it once these point at your own folders).
    domains: dict[str, str] = Field(default_factory=lambda: {"a": "data/sample/a", "b": "data/sample/b"})

    @field_validator("domains")
    @classmethod
    def _two_named_folders(cls, value: dict[str, str]) -> dict[str, str]:
        if set(value) != set(DOMAINS):
            raise ValueError(f"needs exactly the domains {', '.join(DOMAINS)} (the model swaps between two), got {', '.join(map(str, value)) or 'none'}")
        for name, folder in value.items():
            if not str(folder).strip():
                raise ValueError(f"{name}: empty folder path")
            if str(folder).startswith("~"):  # DVC would take it as a folder named "~" inside the project
                raise ValueError(f"{name}: {folder}: write the full path (DVC does not expand ~)")
        return value


def check_folders(domains: dict[str, str | Path], root: Path | str = ".", source: str = "params.yaml") -> dict[str, Path]:
    """Each domain's folder exists, is a folder and holds at least one image file; else a ParamsError
    naming ``data.domains.<name>``. Returns the folders as given (relative ones resolved against ``root``
    only for the checks). Stops at the first image found, so a huge folder costs one directory read."""
    problems = []
    for name, folder in domains.items():
        path = Path(root) / folder
        key = f"{source}: data.domains.{name}: {folder}"
        hint = f" ({SAMPLE_HINT})" if Path(folder).as_posix().startswith("data/sample") else ""
        if path.is_file():
            problems.append(f"{key}: is a file, not a folder of images")
        elif not path.is_dir():
            problems.append(f"{key}: folder does not exist{hint}")
        elif not _has_image(path):
            problems.append(f"{key}: holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}), subfolders included")
    if problems:
        raise ParamsError("\n".join(problems))
    return {name: Path(folder) for name, folder in domains.items()}


def _has_image(root: Path) -> bool:
    for _folder, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        if any(Path(name).suffix.lower() in IMAGE_SUFFIXES for name in filenames):
            return True
    return False
