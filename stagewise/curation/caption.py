"""Caption: the curated dataset = images kept by ingest AND by every filter, each with one caption.

Where a caption comes from, first match wins:
1. a sidecar next to the image, ``<stem>.txt`` then ``<stem>.caption`` (whitespace stripped; an empty
   sidecar falls through) — always re-read, so an edited sidecar changes the output;
2. the configured captioner (``caption.captioner`` in params, looked up in ``CAPTIONERS``).

Captioner results are memoised by content hash + the captioner's fingerprint, so adding images captions
only the new ones and switching the model back and forth reuses earlier captions. A captioner that also
uses something besides the pixels (the template uses the domain and file stem) says so in ``context``,
and a memoised caption is reused only when that context is unchanged.
"""

from __future__ import annotations

import logging
import string
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pandas as pd
from PIL import Image
from pydantic import Field, field_validator
from tqdm import tqdm

from stagewise.config import Section, fingerprint
from stagewise.images import ImageError, load_rgb
from stagewise.store import ResultStore

log = logging.getLogger(__name__)

SIDECAR_SUFFIXES = (".txt", ".caption")  # in order of precedence
TEMPLATE_FIELDS = frozenset({"domain", "stem"})
DATASET_COLUMNS = ["path", "domain", "sha256", "width", "height", "caption", "caption_source"]
FILTER_COLUMNS = {"path", "sha256", "status"}


class FilterError(ValueError):
    """A filter's output does not fit the manifest (missing columns or decisions)."""


@dataclass(frozen=True)
class ImageRef:
    """What a captioner may know about an image besides its pixels."""

    path: str
    domain: str
    sha256: str

    @property
    def stem(self) -> str:
        return Path(self.path).stem


class Captioner(ABC):
    """Turns a batch of images into captions. Implementations register a factory in ``CAPTIONERS``.

    A model captioner sets ``needs_pixels = True`` (the default) and gets decoded RGB images; one that
    needs none (the template) gets ``None`` for each, and nothing is decoded.
    """

    source: ClassVar[str] = "model"  # the dataset's caption_source for captions it makes
    needs_pixels: ClassVar[bool] = True

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """Stable id of everything that changes the captions (model id, prompt, generation settings)."""

    def context(self, ref: ImageRef) -> str:
        """What besides the pixels a caption depends on; a memoised caption is reused only when equal."""
        return ""

    @abstractmethod
    def caption(self, images: Sequence[Image.Image | None], refs: Sequence[ImageRef]) -> list[str]:
        """One caption per image, in order."""


class TemplateCaptioner(Captioner):
    source = "template"
    needs_pixels = False

    def __init__(self, template: str):
        check_template(template)
        self.template = template

    @property
    def fingerprint(self) -> str:
        return fingerprint("template-captioner", self.template)

    def context(self, ref: ImageRef) -> str:
        return f"{ref.domain}/{ref.stem}"

    def caption(self, images: Sequence[Image.Image | None], refs: Sequence[ImageRef]) -> list[str]:
        return [self.template.format(domain=ref.domain, stem=ref.stem) for ref in refs]


def check_template(template: str) -> None:
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ValueError(f"not a valid template: {exc}") from None
    unknown = names - TEMPLATE_FIELDS
    if unknown:
        raise ValueError(f"unknown placeholder(s) {', '.join('{' + n + '}' for n in sorted(unknown))}; allowed: {{domain}}, {{stem}}")
    if not template.format(domain="a", stem="x").strip():
        raise ValueError("the template makes empty captions")


class CaptionConfig(Section):
    # A name in CAPTIONERS. Only the template ships now; a model captioner registers beside it.
    captioner: str = "template"
    template: str = "a photo of {domain}"  # placeholders {domain} and {stem}; the domain name is the subject's token
    batch_size: int = Field(16, ge=1, description="images per captioner call (model captioners batch on the accelerator)")
    max_pixels: int = Field(8192 * 8192, ge=1, description="decompression-bomb guard when decoding for a model; keep equal to ingest.max_pixels")

    @field_validator("captioner")
    @classmethod
    def _known_captioner(cls, name: str) -> str:
        if name not in CAPTIONERS:
            raise ValueError(f"unknown captioner {name!r}; known: {', '.join(sorted(CAPTIONERS))}")
        return name

    @field_validator("template")
    @classmethod
    def _valid_template(cls, template: str) -> str:
        check_template(template)
        return template


# The factory point: a name in params -> a function building the captioner from the config.
CAPTIONERS: dict[str, Callable[[CaptionConfig], Captioner]] = {
    "template": lambda cfg: TemplateCaptioner(cfg.template),
}


def make_captioner(cfg: CaptionConfig) -> Captioner:
    return CAPTIONERS[cfg.captioner](cfg)


# ---------------------------------------------------------------------------------------------- dataset


def read_sidecar(image_path: str) -> str | None:
    """The first non-empty sidecar caption next to the image, else None. Unreadable ones are skipped."""
    for suffix in SIDECAR_SUFFIXES:
        sidecar = Path(image_path).with_suffix(suffix)
        try:
            text = sidecar.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("sidecar %s: unreadable, ignored (%s)", sidecar, exc)
            continue
        if text:
            return text
    return None


def select_kept(manifest: pd.DataFrame, filters: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, dict[str, int]]:
    """Rows kept by the manifest and by every filter; and how many each filter dropped.

    A filter must decide every image the manifest kept (matched on path + sha256): a missing decision
    means the filter's output is older than the manifest, which is an error, not a silent drop.
    """
    kept = manifest[manifest["status"] == "kept"]
    dropped: dict[str, int] = {}
    for name, frame in filters.items():
        missing_cols = FILTER_COLUMNS - set(frame.columns)
        if missing_cols:
            raise FilterError(f"filter {name}: missing column(s) {', '.join(sorted(missing_cols))}")
        decisions = frame[["path", "sha256", "status"]].drop_duplicates(["path", "sha256"], keep="last")
        decided = kept.merge(decisions.rename(columns={"status": "_filter"}), on=["path", "sha256"], how="left")
        undecided = decided[decided["_filter"].isna()]
        if len(undecided):
            raise FilterError(
                f"filter {name}: no decision for {len(undecided)} image(s) the manifest kept, e.g. {undecided['path'].iloc[0]} "
                "(its output is older than the manifest: rerun that stage)"
            )
        mask = (decided["_filter"] == "kept").to_numpy()
        dropped[name] = int((~mask).sum())
        kept = kept[mask]
    return kept, dropped


def caption_dataset(
    manifest: pd.DataFrame, filters: dict[str, pd.DataFrame], captioner: Captioner, store_dir: Path, batch_size: int = 16, max_pixels: int = 8192 * 8192
) -> tuple[pd.DataFrame, dict[str, int]]:
    """The dataset frame and counts: ``captioned`` (images the captioner ran on), ``sidecar``,
    ``memoised``, ``unreadable`` (dropped: could not be decoded for the captioner), ``dropped_by:<filter>``."""
    kept, dropped = select_kept(manifest, filters)
    refs = [ImageRef(r.path, r.domain, r.sha256) for r in kept.itertuples(index=False)]
    captions: dict[str, tuple[str, str]] = {}  # path -> (caption, source)
    for ref in refs:
        text = read_sidecar(ref.path)
        if text is not None:
            captions[ref.path] = (text, "sidecar")

    store = ResultStore(store_dir, captioner.fingerprint)
    memo = store.lookup()
    todo = []
    for ref in refs:
        if ref.path in captions:
            continue
        hit = memo.get(ref.sha256)
        if hit is not None and hit["context"] == captioner.context(ref):
            captions[ref.path] = (hit["caption"], captioner.source)
        else:
            todo.append(ref)
    memoised = len(refs) - len(todo) - sum(source == "sidecar" for _, source in captions.values())

    unreadable: set[str] = set()
    with store, tqdm(total=len(todo), desc="caption", unit="img", mininterval=1.0, disable=not todo) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            batch: list[ImageRef] = chunk
            images: list[Image.Image | None] = [None] * len(chunk)
            if captioner.needs_pixels:
                batch, images = [], []
                for ref in chunk:
                    try:
                        images.append(load_rgb(ref.path, max_pixels))
                        batch.append(ref)
                    except ImageError as exc:
                        log.warning("%s: dropped from the dataset, cannot be decoded for captioning: %s", ref.path, exc)
                        unreadable.add(ref.path)
            texts = captioner.caption(images, batch) if batch else []
            if len(texts) != len(batch):
                raise RuntimeError(f"captioner {type(captioner).__name__} returned {len(texts)} captions for {len(batch)} images")
            for ref, text in zip(batch, texts):
                text = text.strip()
                store.add(ref.sha256, caption=text, context=captioner.context(ref))
                captions[ref.path] = (text, captioner.source)
            bar.update(len(chunk))

    out = kept[~kept["path"].isin(unreadable)][["path", "domain", "sha256", "width", "height"]].copy()
    out["caption"] = [captions[p][0] for p in out["path"]]
    out["caption_source"] = [captions[p][1] for p in out["path"]]
    counts = {
        "captioned": len(todo) - len(unreadable),
        "sidecar": sum(source == "sidecar" for _, source in captions.values()),
        "memoised": memoised,
        "unreadable": len(unreadable),
        **{f"dropped_by:{name}": n for name, n in dropped.items()},
    }
    return out.reset_index(drop=True)[DATASET_COLUMNS], counts
