"""Vision-language models from transformers: yes/no questions about each image, and the vlm_filter stage.

A model is named in params by hub id or local folder (see ``stagewise.hub``) and loaded through its
standard ``from_pretrained`` classes, picked from its config:

- ``blip`` with ``BlipForQuestionAnswering`` (Salesforce/blip-vqa-*): the question is the text input;
- ``blip`` captioning and ``vision-encoder-decoder`` models (captioners, see captioners.py);
- any other ``AutoModelForImageTextToText`` type (SmolVLM, Florence-2, LLaVA, GIT, ...): the prompt goes
  through the processor's chat template when it has one. Models that need ``trust_remote_code`` are
  refused: that would run code downloaded with the weights.

Answers are memoised per image by content hash + the fingerprint of what changes them (model content,
questions, prompt format, generation length, dtype) in a ResultStore that flushes every few batches, so
a killed run resumes where it stopped and a rerun after adding images asks only about the new ones.
Which answers reject an image is *not* part of the fingerprint: changing ``reject`` re-decides every
image from the memo without running the model.

For other stages (the watermark cascade asks only about uncertain images)::

    from stagewise.curation.vlm import VlmConfig, answers_for, ask, decide, load_for

    answers = ask([img_or_path, ...], cfg)              # [{question: answer}, ...]; loads the model; no memo
    result = answers_for(rows, cfg, store_dir, section="watermark.vlm")  # rows: DataFrame with path + sha256
    result.answers[sha256]                              # {question: answer}; result.errors[sha256]: unreadable
    result.asked                                        # images the model ran on (the rest were memoised)
    decide(result.answers[sha256], cfg)                 # {"status", "reason", "decided_by"}
    model = load_for(cfg)                               # load once, pass as model= to both to avoid reloading

``answers_for`` is memoised, batched, prefetching and resumable like the stage; its memo key does not
depend on the caller, so pointing it at data/store/vlm_filter shares answers with the vlm_filter stage.
"""

from __future__ import annotations

import json
import logging
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image
from pydantic import Field, field_validator

from stagewise.cli import StageError
from stagewise.config import Section, fingerprint
from stagewise.hub import DType, identity, load_pretrained, resolve, torch_dtype
from stagewise.images import load_rgb, load_verified
from stagewise.store import Lazy, ResultStore, memo_map

log = logging.getLogger(__name__)

VLM_VERSION = 1  # bump when how a question becomes model input or an answer is decoded changes
SECTION = "vlm_filter"
DECIDED_BY_VLM = "vlm"
DECIDED_BY_DECODE = "decode"
DECIDED_BY_SKIPPED = "skipped"
SKIPPED_REASON = "vlm_filter: skipped (no model configured)"
COLUMNS = ["path", "domain", "sha256", "status", "reason", "answers", "decided_by"]


# ----------------------------------------------------------------------------------------------- config


class Question(Section):
    text: str = Field(min_length=1)
    # Matched against the start of the answer, case and punctuation ignored: "yes" matches "Yes." and
    # "yes, in the corner" but not "yesterday".
    reject: list[str] = Field(default_factory=lambda: ["yes"], description="answers that reject the image")

    @field_validator("reject", mode="before")
    @classmethod
    def _yaml_booleans(cls, answers: Any) -> Any:
        # YAML 1.1 reads an unquoted yes / no as a boolean; the answer meant is the word.
        if isinstance(answers, list):
            return [("yes" if a else "no") if isinstance(a, bool) else a for a in answers]
        return answers

    @field_validator("reject")
    @classmethod
    def _non_empty(cls, answers: list[str]) -> list[str]:
        if any(not normalize(a) for a in answers):
            raise ValueError("a reject answer must contain a letter or digit (matching is on words, punctuation is ignored)")
        return answers


def default_questions() -> list[Question]:
    # The two defects a text detector misses most: logos and semi-transparent overlays without
    # readable words, and contact sheets / collages that teach the model grid lines.
    return [Question(text="Is there a watermark, logo or text overlay?"), Question(text="Is this a grid or collage?")]


class VlmConfig(Section):
    # null skips the stage (recorded per image): no weights can be downloaded on every machine.
    model: str | None = Field(None, description="transformers VLM: hub id or a local folder made with save_pretrained")
    revision: str | None = Field(None, description="hub branch, tag or commit; pin a commit for reproducible answers")
    questions: list[Question] = Field(default_factory=default_questions, min_length=1)
    # {question} is replaced by each question. Chat models (SmolVLM, LLaVA) get it as the user's turn
    # through their chat template; plain ones get this text as it is, e.g. "Question: {question} Answer:".
    prompt: str = "{question}"
    max_new_tokens: int = Field(8, ge=1, description="a yes/no answer is one or two tokens; a few more show what the model meant")
    batch_size: int = Field(8, ge=1, description="images per generate() call (one call per question); raise it on a GPU with memory to spare")
    workers: int = Field(2, ge=1, description="threads decoding the next batches while the model runs")
    device: str = "auto"  # cuda, then mps, then cpu
    dtype: DType = "auto"  # bf16 (else fp16) on CUDA, fp32 on CPU
    max_pixels: int = Field(8192 * 8192, ge=1, description="decompression-bomb guard; keep equal to ingest.max_pixels")

    @field_validator("prompt")
    @classmethod
    def _prompt_has_question(cls, prompt: str) -> str:
        names = {name for _, name, _, _ in string.Formatter().parse(prompt) if name is not None}
        if names != {"question"}:
            raise ValueError("the prompt must contain {question} and no other placeholder")
        return prompt

    @field_validator("questions")
    @classmethod
    def _distinct(cls, questions: list[Question]) -> list[Question]:
        texts = [q.text for q in questions]
        if len(set(texts)) != len(texts):
            raise ValueError("each question may appear once (answers are recorded by question text)")
        return questions


# ------------------------------------------------------------------------------------------------ model


@dataclass(frozen=True)
class ModelRef:
    """A model located on disk, not yet loaded: enough to fingerprint results."""

    ref: str  # what params said
    folder: Path
    identity: str  # content hash of the folder's model files


def locate(ref: str, *, section: str, revision: str | None = None) -> ModelRef:
    folder = resolve(ref, section=section, revision=revision)
    return ModelRef(ref, folder, identity(folder))


@dataclass
class ImageTextModel:
    """A loaded transformers model that turns (image, optional prompt) into text, batched."""

    kind: str  # blip-vqa | blip | vision-encoder-decoder | image-text-to-text
    located: ModelRef
    model: Any
    image_processor: Any  # the image half of the processor (resize, normalise)
    tokenizer: Any
    processor: Any | None
    device: Any
    dtype: Any
    calls: int = field(default=0)  # generate() calls made; progress reporting and tests

    @property
    def identity(self) -> str:
        return self.located.identity

    @property
    def chat(self) -> bool:
        return self.kind == "image-text-to-text" and bool(getattr(self.processor, "chat_template", None))

    def _prompt_text(self, prompt: str) -> str:
        if not self.chat:
            return prompt
        content: list[dict] = [{"type": "image"}] + ([{"type": "text", "text": prompt}] if prompt else [])
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def prepare(self, image: Image.Image) -> Any:
        """Per-image preprocessing, run in the decoding threads so it overlaps the model: the pixel tensor
        for BLIP and vision-encoder-decoder models (their processors resize and normalise each image on
        its own), the image itself for chat models (their processors tie images to prompt tokens)."""
        if self.kind == "image-text-to-text":
            return image
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    def _inputs(self, prepared: Sequence[Any], prompts: Sequence[str] | None) -> dict:
        import torch

        if self.kind == "vision-encoder-decoder":
            if prompts and any(prompts):
                raise StageError(f"{self.located.ref}: vision-encoder-decoder models take no prompt; leave the prompt empty")
            return {"pixel_values": torch.stack(list(prepared))}
        if self.kind in ("blip", "blip-vqa"):
            inputs = {"pixel_values": torch.stack(list(prepared))}
            if prompts and any(prompts):  # what BlipProcessor does with the text: no token type ids
                inputs.update(self.tokenizer(list(prompts), padding=True, return_tensors="pt", return_token_type_ids=False))
            return inputs
        texts = [self._prompt_text(p) for p in prompts] if prompts else [self._prompt_text("")] * len(prepared)
        if not any(texts):
            return dict(self.processor(images=list(prepared), return_tensors="pt"))
        # Chat processors place one image per <image> token of each prompt: one list of images per prompt.
        imgs = [[im] for im in prepared] if self.chat else list(prepared)
        return dict(self.processor(images=imgs, text=texts, return_tensors="pt", padding=True))

    def generate(self, images: Sequence[Image.Image], prompts: Sequence[str] | None, max_new_tokens: int, num_beams: int = 1, keep_prompt: bool = False) -> list[str]:
        """One text per image: the answer to / continuation of its prompt. Greedy unless ``num_beams`` > 1,
        never sampled: memoised results must be what the same settings would give again."""
        return self.generate_prepared([self.prepare(im) for im in images], prompts, max_new_tokens, num_beams, keep_prompt)

    def generate_prepared(self, prepared: Sequence[Any], prompts: Sequence[str] | None, max_new_tokens: int, num_beams: int = 1, keep_prompt: bool = False) -> list[str]:
        """``generate`` for images already through ``prepare``."""
        import torch

        inputs = {
            k: v.to(self.device, dtype=self.dtype) if torch.is_floating_point(v) else v.to(self.device)
            for k, v in self._inputs(prepared, prompts).items() if isinstance(v, torch.Tensor)
        }
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams)
        self.calls += 1
        if self.kind == "image-text-to-text" and not getattr(self.model.config, "is_encoder_decoder", False) and "input_ids" in inputs:
            out = out[:, inputs["input_ids"].shape[1]:]  # decoder-only models echo the (left-padded) prompt
        texts = [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
        if self.kind == "blip" and prompts and not keep_prompt:  # BLIP's decoder continues the prompt text
            texts = [_strip_prefix(t, self._decoded(p)) for t, p in zip(texts, prompts)]
        return texts

    def _decoded(self, prompt: str) -> str:
        return self.tokenizer.decode(self.tokenizer(prompt).input_ids, skip_special_tokens=True).strip()


def _strip_prefix(text: str, prefix: str) -> str:
    return text[len(prefix):].strip() if prefix and text.startswith(prefix) else text


def load_image_text_model(located: ModelRef, *, section: str, device: str = "auto", dtype: DType = "auto") -> ImageTextModel:
    """Load the model and its processor from ``located.folder`` through their standard classes."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from stagewise.device import pick_device

    folder = located.folder
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder))
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise StageError(
                f"{section}.model: {located.ref} needs trust_remote_code (its code ships with the weights), which stagewise does not run; "
                "use a transformers-native version of the model"
            ) from None
        raise StageError(f"{section}.model: {folder}: {str(exc).splitlines()[0]}") from None
    except OSError as exc:
        raise StageError(f"{section}.model: {folder} has no usable config.json ({str(exc).splitlines()[0]})") from None
    model_type, architectures = config.model_type, list(getattr(config, "architectures", None) or [])
    if model_type == "blip":
        kind = "blip-vqa" if any("QuestionAnswering" in a for a in architectures) else "blip"
        model_cls = transformers.BlipForQuestionAnswering if kind == "blip-vqa" else transformers.BlipForConditionalGeneration
    elif model_type == "vision-encoder-decoder":
        kind, model_cls = "vision-encoder-decoder", transformers.VisionEncoderDecoderModel
    elif model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        kind, model_cls = "image-text-to-text", transformers.AutoModelForImageTextToText
    else:
        raise StageError(
            f"{section}.model: {located.ref} is a {model_type!r} model, not an image-to-text one "
            "(supported: BLIP, vision-encoder-decoder, and AutoModelForImageTextToText types such as smolvlm, florence2, llava, git)"
        )
    torch_device = pick_device(device)
    torch_dt = torch_dtype(dtype, torch_device)
    model = load_pretrained(model_cls, folder, section=section, dtype=torch_dt).to(torch_device).eval()
    if kind == "vision-encoder-decoder":
        processor = None
        image_processor = load_pretrained(transformers.AutoImageProcessor, folder, section=section)
        tokenizer = load_pretrained(transformers.AutoTokenizer, folder, section=section)
    else:
        processor = load_pretrained(transformers.AutoProcessor, folder, section=section)
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None or getattr(processor, "image_processor", None) is None:
            raise StageError(f"{section}.model: {folder} has no processor with both an image processor and a tokenizer (save the processor with save_pretrained too)")
        image_processor = processor.image_processor
        if kind == "image-text-to-text" and not getattr(model.config, "is_encoder_decoder", False):
            tokenizer.padding_side = "left"  # batched generation appends to the right end of every row
    log.info("%s: loaded %s (%s, %s) on %s in %s", section, located.ref, kind, type(model).__name__, torch_device, str(torch_dt).removeprefix("torch."))
    return ImageTextModel(kind, located, model, image_processor, tokenizer, processor, torch_device, torch_dt)


def load_for(cfg: VlmConfig, section: str = SECTION) -> ImageTextModel:
    if cfg.model is None:
        raise StageError(f"{section}.model: no model configured")
    model = load_image_text_model(locate(cfg.model, section=section, revision=cfg.revision), section=section, device=cfg.device, dtype=cfg.dtype)
    if model.kind == "vision-encoder-decoder":
        raise StageError(f"{section}.model: {cfg.model} is a vision-encoder-decoder captioner and cannot take a question; use a VQA or chat VLM")
    return model


# ---------------------------------------------------------------------------------------------- answers


def normalize(answer: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed: ``"Yes."`` -> ``"yes"``."""
    return " ".join(re.sub(r"[^\w\s]", " ", answer.lower()).split())


def matching(answer: str, patterns: Sequence[str]) -> str | None:
    """The first pattern the answer starts with (whole words only), else None."""
    said = normalize(answer)
    for pattern in patterns:
        want = normalize(pattern)
        if said == want or said.startswith(want + " "):
            return pattern
    return None


def decide(answers: dict[str, str], cfg: VlmConfig) -> dict[str, str]:
    """Status, reason and decided_by from one image's answers (no model involved)."""
    hits = [f"{q.text!r} answered {answers[q.text]!r}" for q in cfg.questions if matching(answers.get(q.text, ""), q.reject) is not None]
    if hits:
        return {"status": "rejected", "reason": f"vlm_filter: {'; '.join(hits)}", "decided_by": DECIDED_BY_VLM}
    return {"status": "kept", "reason": "", "decided_by": DECIDED_BY_VLM}


def question_prompts(cfg: VlmConfig) -> list[tuple[str, str]]:
    """(question text, prompt text) for each configured question."""
    return [(q.text, cfg.prompt.format(question=q.text)) for q in cfg.questions]


def answers_fingerprint(model_identity: str, cfg: VlmConfig) -> str:
    """Everything that changes the answers, and nothing that only changes the decision."""
    return fingerprint("vlm-answers", VLM_VERSION, model_identity, question_prompts(cfg), cfg.max_new_tokens, cfg.dtype)


def ask(images: Sequence[Image.Image | str | Path], cfg: VlmConfig, model: ImageTextModel | None = None) -> list[dict[str, str]]:
    """Every configured question about each image (PIL images or paths), in batches; not memoised."""
    model = model or load_for(cfg)
    out: list[dict[str, str]] = []
    for start in range(0, len(images), cfg.batch_size):
        chunk = [im if isinstance(im, Image.Image) else load_rgb(im, cfg.max_pixels) for im in images[start:start + cfg.batch_size]]
        out += _ask_batch(model, [model.prepare(im) for im in chunk], cfg)
    return out


def _ask_batch(model: ImageTextModel, prepared: list[Any], cfg: VlmConfig) -> list[dict[str, str]]:
    """Each question in turn over the whole batch (one generate() call per question)."""
    per_image: list[dict[str, str]] = [{} for _ in prepared]
    for question, prompt in question_prompts(cfg):
        for answers, text in zip(per_image, model.generate_prepared(prepared, [prompt] * len(prepared), cfg.max_new_tokens)):
            answers[question] = text
    return per_image


@dataclass
class AskResult:
    answers: dict[str, dict[str, str]]  # sha256 -> {question: answer}
    errors: dict[str, str]  # sha256 -> why it could not be read (not memoised: the file may be fixed)
    asked: int  # images the model ran on this call (the rest were memoised)


def answers_for(rows: pd.DataFrame, cfg: VlmConfig, store_dir: Path, model: ImageTextModel | None = None, section: str = SECTION) -> AskResult:
    """Answers for every distinct image in ``rows`` (columns path, sha256), asking the model only about
    images not memoised in ``store_dir``. Decoding and preprocessing of the next batches run in
    ``cfg.workers`` threads, overlapping the model's work on the current one. ``section`` is the params
    section ``cfg`` came from (error messages and the progress bar name it). The memo key does not
    depend on the caller: two stages asking the same model the same questions can share a store."""
    if model is None and cfg.model is None:
        raise StageError(f"{section}.model: no model configured")
    located = model.located if model is not None else locate(cfg.model, section=section, revision=cfg.revision)
    # A slow VLM answers a few images a second: flush every 4 batches so a killed run loses seconds, not minutes.
    store = ResultStore(store_dir, answers_fingerprint(located.identity, cfg), flush_every=max(cfg.batch_size * 4, 16))
    lazy = Lazy(lambda: load_image_text_model(located, section=section, device=cfg.device, dtype=cfg.dtype), model)

    def prepare(row: Any) -> Any:  # in a decoding thread; an unreadable image never loads the model
        image = load_verified(row.path, row.sha256, cfg.max_pixels)
        return lazy.get().prepare(image)

    def answer(batch: list[Any], prepared: list[Any]) -> list[dict[str, str]]:
        return [{"answers": json.dumps(got, sort_keys=True)} for got in _ask_batch(lazy.get(), prepared, cfg)]

    result = memo_map(rows, store, prepare, answer, batch_size=cfg.batch_size, workers=cfg.workers, desc=section)
    return AskResult({sha: json.loads(values["answers"]) for sha, values in result.values.items()}, result.errors, result.computed)


# ------------------------------------------------------------------------------------------------ stage


def filter_images(manifest: pd.DataFrame, cfg: VlmConfig, store_dir: Path, model: ImageTextModel | None = None) -> tuple[pd.DataFrame, int]:
    """One row per manifest-kept image, kept or rejected with a reason; and how many images the model
    ran on. With no model configured every image is kept with the reason that the filter was skipped."""
    kept = manifest[manifest["status"] == "kept"]
    base = kept[["path", "domain", "sha256"]].reset_index(drop=True)
    if cfg.model is None and model is None:
        frame = base.assign(status="kept", reason=SKIPPED_REASON, answers="{}", decided_by=DECIDED_BY_SKIPPED)
        return frame[COLUMNS], 0
    result = answers_for(kept, cfg, store_dir, model)
    rows = []
    for row in base.itertuples(index=False):
        record = {"path": row.path, "domain": row.domain, "sha256": row.sha256}
        if row.sha256 in result.errors:
            rows.append({**record, "status": "rejected", "reason": result.errors[row.sha256], "answers": "{}", "decided_by": DECIDED_BY_DECODE})
        else:
            got = result.answers[row.sha256]
            rows.append({**record, **decide(got, cfg), "answers": json.dumps(got, sort_keys=True)})
    return pd.DataFrame(rows, columns=COLUMNS), result.asked


def summarize(frame: pd.DataFrame) -> str:
    rejected = frame[frame["status"] != "kept"]
    lines = [f"{len(frame) - len(rejected)} kept, {len(rejected)} rejected of {len(frame)} images"]
    for row in rejected.head(20).itertuples(index=False):  # enough to see what kind; the Parquet has all
        lines.append(f"  {row.path}: {row.reason}")
    if len(rejected) > 20:
        lines.append(f"  ... and {len(rejected) - 20} more")
    return "\n".join(lines)
