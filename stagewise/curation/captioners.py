"""Model captions and what the caption stage does with every caption afterwards.

``ModelCaptioner`` (``caption.captioner: transformers``) runs a transformers image-to-text model named by
hub id or local folder in ``caption.model``: BLIP captioning (``BlipForConditionalGeneration``), a
``VisionEncoderDecoderModel`` (ViT + GPT-2 and kin), or any ``AutoModelForImageTextToText`` chat model;
loading is shared with the VLM filter (vlm.py). Batched on the device; the model is loaded only when an
image actually needs a caption, so a rerun with nothing new never loads it. Its fingerprint is the model
folder's content hash + prompt + generation settings, so the memo survives moving the folder.

``finish_captions`` then, for every caption whatever its source (sidecar, template, model):

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
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from stagewise.cli import StageError
from stagewise.config import fingerprint
from stagewise.curation.caption import DATASET_COLUMNS, CaptionConfig, CaptionFilter, Captioner, ImageRef
from stagewise.curation.vlm import ImageTextModel, load_image_text_model, locate

log = logging.getLogger(__name__)

CAPTIONER_VERSION = 1  # bump when how the model's output becomes a caption changes
SECTION = "caption"
CAPTIONS_COLUMNS = [*DATASET_COLUMNS, "status", "reason"]


class ModelCaptioner(Captioner):
    source = "model"

    def __init__(self, cfg: CaptionConfig):
        if not cfg.model:
            raise StageError("caption.model: no model configured for captioner transformers")
        self.cfg = cfg
        self.located = locate(cfg.model, section=SECTION, revision=cfg.revision)  # fails fast, before any image is read
        self._model: ImageTextModel | None = None
        self._loading = threading.Lock()  # the decoding threads call prepare(), which needs the model

    @property
    def fingerprint(self) -> str:
        c = self.cfg
        return fingerprint("transformers-captioner", CAPTIONER_VERSION, self.located.identity, c.prompt, c.max_new_tokens, c.num_beams, c.dtype)

    @property
    def model(self) -> ImageTextModel:
        with self._loading:
            if self._model is None:
                model = load_image_text_model(self.located, section=SECTION, device=self.cfg.device, dtype=self.cfg.dtype)
                if model.kind == "blip-vqa":
                    raise StageError(f"caption.model: {self.cfg.model} is a question-answering model; use it as vlm_filter.model, and a captioning model here")
                if model.kind == "vision-encoder-decoder" and self.cfg.prompt:
                    raise StageError(f"caption.prompt: {self.cfg.model} is a vision-encoder-decoder model, which takes no prompt; set caption.prompt to ''")
                self._model = model
            return self._model

    def prepare(self, image: Image.Image) -> Any:
        return self.model.prepare(image)

    def caption(self, images: Sequence[Any], refs: Sequence[ImageRef]) -> list[str]:
        prompts = [self.cfg.prompt] * len(images) if self.cfg.prompt else None
        # keep_prompt: BLIP's "a photography of" is the start of the caption it was asked to finish.
        return self.model.generate_prepared(list(images), prompts, self.cfg.max_new_tokens, self.cfg.num_beams, keep_prompt=True)


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
