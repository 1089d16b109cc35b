"""Caption: the curated dataset = images kept by ingest AND by every filter, each with one caption.

Where a caption comes from, first match wins:
1. a sidecar next to the image, ``<stem>.txt`` then ``<stem>.caption`` (whitespace stripped; an empty
   sidecar falls through) — always re-read, so an edited sidecar changes the output;
2. the configured captioner (``caption.captioner`` in params, looked up in ``CAPTIONERS``): ``template``
   fills ``caption.template``; ``transformers`` runs the image-to-text model ``caption.model``
   (captioners.py). ``overwrite: true`` skips step 1.

Prefix / suffix, tag shuffling and the ``caption_filter`` that selects a subset are applied afterwards to
every caption, whatever its source (captioners.py ``finish_captions``).

Captioner results are memoised by content hash + the captioner's fingerprint, so adding images captions
only the new ones and switching the model back and forth reuses earlier captions. A captioner that also
uses something besides the pixels (the template uses the domain and file stem) says so in ``context``,
and a memoised caption is reused only when that context is unchanged.
"""

from __future__ import annotations

import logging
import re
import string
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
from PIL import Image
from pydantic import Field, field_validator, model_validator

from stagewise.config import Section, fingerprint
from stagewise.hub import DType
from stagewise.images import load_verified
from stagewise.store import ResultStore, memo_map

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

    def prepare(self, image: Image.Image) -> Any:
        """Per-image work run in the decoding threads, overlapping ``caption`` on the previous batch (a
        model's resize and normalise); ``caption`` then gets what this returns. Must be thread-safe."""
        return image

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


class CaptionFilter(Section):
    """Keep only images whose caption (before prefix, suffix and shuffling) matches; exactly one of the two."""

    regex: str | None = Field(None, description="searched in the caption, e.g. '^a woman'")
    contains: list[str] | None = Field(None, min_length=1, description="keep when any of these appears in the caption")
    ignore_case: bool = True

    @model_validator(mode="after")
    def _one_rule(self) -> "CaptionFilter":
        if (self.regex is None) == (self.contains is None):
            raise ValueError("give exactly one of regex or contains")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"regex {self.regex!r} does not compile: {exc}") from None
        return self


class CaptionConfig(Section):
    # A name in CAPTIONERS: `template` (no model), `transformers` (the image-to-text model `model`).
    captioner: str = "template"
    template: str = "a photo of {domain}"  # placeholders {domain} and {stem}; the domain name is the subject's token
    batch_size: int = Field(16, ge=1, description="images per captioner call (model captioners batch on the accelerator)")
    max_pixels: int = Field(8192 * 8192, ge=1, description="decompression-bomb guard when decoding for a model; keep equal to ingest.max_pixels")
    workers: int = Field(2, ge=1, description="threads decoding the next batches while the model captions this one")
    overwrite: bool = False  # true: the captioner also replaces sidecar captions (sidecars are hand-written, so they win by default)
    # captioner: transformers. BLIP (Salesforce/blip-image-captioning-*), vision-encoder-decoder
    # (nlpconnect/vit-gpt2-image-captioning) or an image-text-to-text chat model (SmolVLM, Florence-2).
    model: str | None = Field(None, description="hub id or a local folder made with save_pretrained")
    revision: str | None = Field(None, description="hub branch, tag or commit; pin a commit for reproducible captions")
    prompt: str = ""  # BLIP continues it ("a photography of"); chat models get it as the user's turn ("Describe this image.")
    max_new_tokens: int = Field(40, ge=1, description="a BLIP caption is a short phrase; 40 leaves room for a chat model's sentence")
    num_beams: int = Field(1, ge=1, description="1 = greedy, the fastest; beam search costs about num_beams x the decoder work")
    device: str = "auto"  # cuda, then mps, then cpu
    dtype: DType = "auto"  # bf16 (else fp16) on CUDA, fp32 on CPU
    # Applied to every caption (sidecar too), after the caption_filter: a trigger word for the subject.
    prefix: str = ""  # placeholders {domain} and {stem}, e.g. "photo of {domain}, "
    suffix: str = ""
    # Comma-separated tags in a deterministic per-image order (seeded by the image's sha256), so a tag's
    # position carries no signal; the first keep_tags (e.g. the prefix's trigger word) stay in place.
    shuffle_tags: bool = False
    keep_tags: int = Field(0, ge=0)
    caption_filter: CaptionFilter | None = None  # null keeps every image; else the dataset is the matching subset

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

    @field_validator("prefix", "suffix")
    @classmethod
    def _valid_affix(cls, text: str) -> str:
        if text.strip():
            check_template(text)
        return text

    @model_validator(mode="after")
    def _model_named(self) -> "CaptionConfig":
        if self.captioner == "transformers" and not self.model:
            raise ValueError("captioner transformers needs caption.model: a hub id or a local folder made with save_pretrained")
        return self


def _transformers_captioner(cfg: CaptionConfig) -> Captioner:
    from stagewise.curation.captioners import ModelCaptioner  # imports this module: load on first use

    return ModelCaptioner(cfg)


# The factory point: a name in params -> a function building the captioner from the config.
CAPTIONERS: dict[str, Callable[[CaptionConfig], Captioner]] = {
    "template": lambda cfg: TemplateCaptioner(cfg.template),
    "transformers": _transformers_captioner,
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
    manifest: pd.DataFrame, filters: dict[str, pd.DataFrame], captioner: Captioner, store_dir: Path, batch_size: int = 16, max_pixels: int = 8192 * 8192,
    workers: int = 2, overwrite: bool = False,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """The dataset frame and counts: ``captioned`` (images the captioner ran on), ``sidecar``,
    ``memoised``, ``unreadable`` (dropped: could not be decoded for the captioner), ``dropped_by:<filter>``.
    ``workers`` threads decode the next batches while the captioner works; ``overwrite`` ignores sidecars."""
    kept, dropped = select_kept(manifest, filters)
    refs = [ImageRef(r.path, r.domain, r.sha256) for r in kept.itertuples(index=False)]
    captions: dict[str, tuple[str, str]] = {}  # path -> (caption, source)
    for ref in refs if not overwrite else ():
        text = read_sidecar(ref.path)
        if text is not None:
            captions[ref.path] = (text, "sidecar")
    sidecars = len(captions)

    def load(ref: ImageRef) -> Any:  # in a decoding thread
        return captioner.prepare(load_verified(ref.path, ref.sha256, max_pixels)) if captioner.needs_pixels else None

    def run(batch: list[ImageRef], images: list[Any]) -> list[dict[str, str]]:
        return [{"caption": text.strip(), "context": captioner.context(ref)} for ref, text in zip(batch, captioner.caption(images, batch))]

    todo = [ref for ref in refs if ref.path not in captions]
    result = memo_map(todo, ResultStore(store_dir, captioner.fingerprint), load, run, batch_size=batch_size, workers=workers, desc="caption",
                      reuse=lambda ref, stored: stored["context"] == captioner.context(ref))
    unreadable = {ref.path for ref in todo if ref.sha256 in result.errors}
    for ref in todo:
        if ref.path in unreadable:
            log.warning("%s: dropped from the dataset, cannot be decoded for captioning: %s", ref.path, result.errors[ref.sha256])
        else:
            captions[ref.path] = (result.values[ref.sha256]["caption"], captioner.source)

    out = kept[~kept["path"].isin(unreadable)][["path", "domain", "sha256", "width", "height"]].copy()
    out["caption"] = [captions[p][0] for p in out["path"]]
    out["caption_source"] = [captions[p][1] for p in out["path"]]
    counts = {
        "captioned": result.computed,
        "sidecar": sidecars,
        "memoised": len(result.values) - result.computed,
        "unreadable": len(unreadable),
        **{f"dropped_by:{name}": n for name, n in dropped.items()},
    }
    return out.reset_index(drop=True)[DATASET_COLUMNS], counts
