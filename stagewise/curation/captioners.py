"""Captioners: what turns an image into a caption, and the registry that names them in params.

``caption.captioner`` names one of ``CAPTIONERS``:

- ``template`` (``TemplateCaptioner``) fills ``caption.template`` with the image's domain and file stem
  and reads no pixels;
- ``transformers`` (``ModelCaptioner``) runs a transformers image-to-text model named by hub id or local
  folder in ``caption.model``: BLIP captioning (``BlipForConditionalGeneration``), a
  ``VisionEncoderDecoderModel`` (ViT + GPT-2 and kin), or any ``AutoModelForImageTextToText`` chat model;
  loading is shared with the VLM filter (vlm.py). Batched on the device; the model is loaded only when an
  image actually needs a caption, so a rerun with nothing new never loads it. Its fingerprint is the model
  folder's content hash + prompt + generation settings, so the memo survives moving the folder.

A new captioner is a ``Captioner`` subclass, a factory in ``CAPTIONERS`` and its name in
``CaptionerName``. The caption stage (caption.py: sidecars, the memo, caption_filter, prefix / suffix
and tag shuffling) imports this module; nothing here imports the stage.
"""

from __future__ import annotations

import logging
import string
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, get_args

from PIL import Image

from stagewise.cli import StageError
from stagewise.config import fingerprint
from stagewise.curation import vlm
from stagewise.curation.vlm import ImageTextModel, locate
from stagewise.hub import DType
from stagewise.store import Lazy

log = logging.getLogger(__name__)

CAPTIONER_VERSION = 1  # bump when how the model's output becomes a caption changes
SECTION = "caption"
TEMPLATE_FIELDS = frozenset({"domain", "stem"})


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


class CaptionerSettings(Protocol):
    """What the factories read from the caption section (``stagewise.curation.caption.CaptionConfig``)."""

    template: str
    model: str | None
    revision: str | None
    prompt: str
    max_new_tokens: int
    num_beams: int
    device: str
    dtype: DType


class ModelCaptioner(Captioner):
    source = "model"

    def __init__(self, cfg: CaptionerSettings):
        if not cfg.model:
            raise StageError("caption.model: no model configured for captioner transformers")
        self.cfg = cfg
        self.located = locate(cfg.model, section=SECTION, revision=cfg.revision)  # fails fast, before any image is read
        self._lazy = Lazy(self._load)  # the decoding threads call prepare(), which needs the model

    @property
    def fingerprint(self) -> str:
        c = self.cfg
        return fingerprint("transformers-captioner", CAPTIONER_VERSION, self.located.identity, c.prompt, c.max_new_tokens, c.num_beams, c.dtype)

    @property
    def model(self) -> ImageTextModel:
        return self._lazy.get()

    def _load(self) -> ImageTextModel:
        model = vlm.load_image_text_model(self.located, section=SECTION, device=self.cfg.device, dtype=self.cfg.dtype)
        if model.kind == "blip-vqa":
            raise StageError(f"caption.model: {self.cfg.model} is a question-answering model; use it as vlm_filter.model, and a captioning model here")
        if model.kind == "vision-encoder-decoder" and self.cfg.prompt:
            raise StageError(f"caption.prompt: {self.cfg.model} is a vision-encoder-decoder model, which takes no prompt; set caption.prompt to ''")
        return model

    def prepare(self, image: Image.Image) -> Any:
        return self.model.prepare(image)

    def caption(self, images: Sequence[Any], refs: Sequence[ImageRef]) -> list[str]:
        prompts = [self.cfg.prompt] * len(images) if self.cfg.prompt else None
        # keep_prompt: BLIP's "a photography of" is the start of the caption it was asked to finish.
        return self.model.generate_prepared(list(images), prompts, self.cfg.max_new_tokens, self.cfg.num_beams, keep_prompt=True)


# The factory point: a name in params -> a function building the captioner from the caption section.
CaptionerName = Literal["template", "transformers"]
CAPTIONERS: dict[str, Callable[[CaptionerSettings], Captioner]] = {
    "template": lambda cfg: TemplateCaptioner(cfg.template),
    "transformers": ModelCaptioner,
}
assert set(CAPTIONERS) == set(get_args(CaptionerName)), "CaptionerName must list exactly the registered captioners"
