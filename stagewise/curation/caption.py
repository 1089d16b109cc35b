"""Caption: the curated dataset = images kept by ingest AND by every filter, each with one caption.

Where a caption comes from, first match wins:
1. a sidecar next to the image, ``<stem>.txt`` then ``<stem>.caption`` (whitespace stripped; an empty
   sidecar falls through) — always re-read, so an edited sidecar changes the output;
2. the configured captioner (``caption.captioner``: a name registered in captioners.py ``CAPTIONERS``):
   ``template`` fills ``caption.template``; ``transformers`` runs the image-to-text model
   ``caption.model``. ``overwrite: true`` skips step 1.

Captioner results are memoised by content hash + the captioner's fingerprint, so adding images captions
only the new ones and switching the model back and forth reuses earlier captions. A captioner that also
uses something besides the pixels (the template uses the domain and file stem) says so in ``context``,
and a memoised caption is reused only when that context is unchanged.

Then ``finish_captions``, for every caption whatever its source (sidecar, template, model):

1. ``caption_filter`` (regex or substrings) on the caption as read or generated: the dataset is the
   matching subset, and the full list with a reason for each dropped image is written beside it;
2. ``prefix`` + caption + ``suffix`` (``{domain}`` / ``{stem}`` filled in);
3. ``shuffle_tags``: comma-separated tags in a per-image order seeded by its sha256 (deterministic: the
   same image always gets the same caption, so DVC sees no change on a rerun), first ``keep_tags`` fixed.

All three run on the memoised captions: changing them never reruns the model.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field, field_validator, model_validator

from stagewise.config import Section
from stagewise.curation.captioners import CAPTIONERS, Captioner, CaptionerName, ImageRef, check_template
from stagewise.curation.captioners import TemplateCaptioner  # noqa: F401  (re-exported with the stage's names)
from stagewise.hub import DType
from stagewise.images import load_verified
from stagewise.store import ResultStore, memo_map

log = logging.getLogger(__name__)

SIDECAR_SUFFIXES = (".txt", ".caption")  # in order of precedence
DATASET_COLUMNS = ["path", "domain", "sha256", "width", "height", "caption", "caption_source"]
CAPTIONS_COLUMNS = [*DATASET_COLUMNS, "status", "reason"]
FILTER_COLUMNS = {"path", "sha256", "status"}


class FilterError(ValueError):
    """A filter's output does not fit the manifest (missing columns or decisions)."""


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
    captioner: CaptionerName = "template"
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

    @field_validator("captioner", mode="before")
    @classmethod
    def _known_captioner(cls, name: Any) -> Any:  # before the Literal's check, for a message naming the known ones
        if not isinstance(name, str) or name not in CAPTIONERS:
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
    # A face crop (align stage) takes the sidecar of the photo or video it was cut from.
    sidecar_of = dict(zip(kept["path"], kept["source_path"].fillna(kept["path"]))) if "source_path" in kept else {}
    for ref in refs if not overwrite else ():
        text = read_sidecar(sidecar_of.get(ref.path, ref.path))
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


# -------------------------------------------------------------------------------------- after captioning


def shuffle_tags(caption: str, sha256: str, keep: int = 0) -> str:
    """The comma-separated tags of ``caption`` in an order fixed by ``sha256``; the first ``keep`` stay first."""
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    head, tail = tags[:keep], tags[keep:]
    order = np.random.default_rng(int(sha256[:16], 16)).permutation(len(tail))
    return ", ".join(head + [tail[i] for i in order])


def filter_verdict(caption: str, rule: CaptionFilter) -> str:
    """'' when ``caption`` passes ``rule``, else the reason it does not."""
    flags = re.IGNORECASE if rule.ignore_case else 0
    if rule.regex is not None:
        return "" if re.search(rule.regex, caption, flags) else f"caption_filter: caption {caption!r} does not match regex {rule.regex!r}"
    wanted = [w.lower() for w in rule.contains] if rule.ignore_case else rule.contains
    text = caption.lower() if rule.ignore_case else caption
    return "" if any(w in text for w in wanted) else f"caption_filter: caption {caption!r} contains none of {rule.contains!r}"


def finish_captions(dataset: pd.DataFrame, cfg: CaptionConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the dataset: rows the caption_filter keeps, final captions; every row with status and reason)."""
    finished, statuses, reasons = [], [], []
    for row in dataset.itertuples(index=False):
        reason = filter_verdict(row.caption, cfg.caption_filter) if cfg.caption_filter is not None else ""
        stem = Path(row.path).stem
        text = cfg.prefix.format(domain=row.domain, stem=stem) + row.caption + cfg.suffix.format(domain=row.domain, stem=stem)
        if cfg.shuffle_tags:
            text = shuffle_tags(text, row.sha256, cfg.keep_tags)
        finished.append(text)
        statuses.append("rejected" if reason else "kept")
        reasons.append(reason)
    captions = dataset.assign(caption=finished, status=statuses, reason=reasons)[CAPTIONS_COLUMNS]
    subset = captions.loc[captions["status"] == "kept", DATASET_COLUMNS].reset_index(drop=True)
    return subset, captions.reset_index(drop=True)
