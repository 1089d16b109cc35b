"""The vlm_filter stage on tiny random models built from configs and loaded back with from_pretrained:
answers recorded per question, memo reuse, resume after an interruption, rejection on configured answers,
the generic chat-template path, and the skipped-by-default path."""

import hashlib
import json
import os
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import ROOT, run
from stagewise.config import ParamsError, parse_section
from stagewise.curation import vlm
from stagewise.curation.ingest import IngestConfig, ingest
from stagewise.curation.vlm import COLUMNS, SKIPPED_REASON, VlmConfig, answers_for, ask, decide, filter_images, load_for, matching, normalize
from stagewise.curation.vlm import load_image_text_model, locate
from stagewise.images import load_rgb
from tiny_models import tiny_blip, tiny_llava, tiny_vit_gpt2

Q1, Q2 = "is there a watermark?", "is this a grid or collage?"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlms")
    return {"blip": tiny_blip(root / "blip-vqa"), "llava": tiny_llava(root / "llava")}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Ten distinct images (noise and flat colours, so a random model answers differently) + a manifest."""
    folder = tmp_path_factory.mktemp("vlm-images")
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (70 + i, 80, 3), dtype=np.uint8)).save(folder / f"noise_{i}.png")
    for name in ["red", "green", "blue", "white"]:
        Image.new("RGB", (72, 72), name).save(folder / f"flat_{name}.png")
    manifest, _ = ingest({"a": folder}, IngestConfig(), folder.parent / f"{folder.name}-ingest")
    return folder, manifest


def cfg_for(model_dir, **kw):
    return VlmConfig(model=str(model_dir), questions=[{"text": Q1, "reject": ["nothing-says-this"]}, {"text": Q2, "reject": ["nothing-says-this"]}], batch_size=3, **kw)


def first_word(answer):
    words = normalize(answer).split()
    return words[0] if words else ""


def test_answer_matching():
    assert matching("Yes.", ["yes"]) == "yes" and matching("yes, in the corner", ["yes"]) == "yes"
    assert matching("YES!", ["no", "yes"]) == "yes"
    assert matching("Yesterday", ["yes"]) is None and matching("no", ["yes"]) is None and matching("", ["yes"]) is None
    assert matching("Not sure, maybe", ["not sure"]) == "not sure" and matching("not", ["not sure"]) is None
    cfg = VlmConfig(questions=[{"text": "Logo?"}, {"text": "Grid?", "reject": ["yes", "maybe"]}])
    assert decide({"Logo?": "No.", "Grid?": "no"}, cfg) == {"status": "kept", "reason": "", "decided_by": "vlm"}
    assert decide({"Logo?": "Yes.", "Grid?": "maybe so"}, cfg) == {
        "status": "rejected", "reason": "vlm_filter: 'Logo?' answered 'Yes.'; 'Grid?' answered 'maybe so'", "decided_by": "vlm",
    }


def test_params_are_checked():
    assert parse_section(yaml.safe_load("questions: [{text: q, reject: [yes, no]}]"), VlmConfig, "vlm_filter").questions[0].reject == ["yes", "no"]
    with pytest.raises(ParamsError, match=r"vlm_filter\.prompt: .*must contain \{question\}"):
        parse_section({"prompt": "Answer:"}, VlmConfig, "vlm_filter")
    with pytest.raises(ParamsError, match=r"vlm_filter\.questions\.0\.reject: .*must contain a letter"):
        parse_section({"questions": [{"text": "q", "reject": ["?"]}]}, VlmConfig, "vlm_filter")
    with pytest.raises(ParamsError, match=r"vlm_filter\.questions: .*each question may appear once"):
        parse_section({"questions": [{"text": "q"}, {"text": "q"}]}, VlmConfig, "vlm_filter")


def test_skipped_by_default(images, tmp_path):
    _, manifest = images
    frame, asked = filter_images(manifest, VlmConfig(), tmp_path / "store")
    assert asked == 0 and list(frame.columns) == COLUMNS and len(frame) == (manifest["status"] == "kept").sum()
    assert set(frame["status"]) == {"kept"} and set(frame["reason"]) == {SKIPPED_REASON} and set(frame["decided_by"]) == {"skipped"}
    assert not (tmp_path / "store").exists()


def test_blip_vqa_answers_memo_and_rejection(models, images, tmp_path, monkeypatch):
    folder, manifest = images
    manifest = manifest.copy()
    (folder.parent / "gone.png").write_bytes(b"")  # manifest rows whose file no longer decodes / changed
    manifest.loc[len(manifest)] = {**manifest.iloc[0].to_dict(), "path": str(folder.parent / "gone.png"), "sha256": hashlib.sha256(b"").hexdigest()}
    manifest.loc[len(manifest)] = {**manifest.iloc[0].to_dict(), "sha256": "f" * 64}
    cfg = cfg_for(models["blip"])
    model = load_for(cfg)
    assert model.kind == "blip-vqa" and type(model.model).__name__ == "BlipForQuestionAnswering"

    frame, asked = filter_images(manifest, cfg, tmp_path / "store", model)
    assert asked == 10 and model.calls == 2 * 4  # 2 questions x ceil(10 / 3) batches; the unreadable one never reached it
    assert list(frame.columns) == COLUMNS
    unreadable = frame[frame["decided_by"] == "decode"].set_index("sha256")
    assert set(unreadable["status"]) == {"rejected"} and len(unreadable) == 2
    assert unreadable.loc[hashlib.sha256(b"").hexdigest(), "reason"] == "empty: 0 bytes"
    assert unreadable.loc["f" * 64, "reason"].startswith("changed since ingest")
    good = frame[frame["decided_by"] == "vlm"]
    answers = {row.path: json.loads(row.answers) for row in good.itertuples()}
    assert all(set(a) == {Q1, Q2} for a in answers.values())
    # The recorded answers are the model's: asking again without the memo, one image at a time, agrees.
    paths = sorted(answers)
    assert ask(paths, cfg.model_copy(update={"batch_size": 1}), model) == [answers[p] for p in paths]
    assert set(good["status"]) == {"kept"}  # no answer starts with "nothing-says-this"

    # Rerun: everything memoised, the model is not even loaded.
    monkeypatch.setattr(vlm, "load_image_text_model", lambda *a, **k: pytest.fail("the model was loaded for a memoised run"))
    again, asked = filter_images(manifest, cfg, tmp_path / "store")
    assert asked == 0
    pd.testing.assert_frame_equal(again, frame)

    # Reject on whatever this random model says first to Q1 for one image: decided from the memo.
    words = {p: first_word(a[Q1]) for p, a in answers.items()}
    assert len(set(words.values())) > 1, f"the tiny model answered alike for every image: {words}"
    target = next(w for w in words.values() if w)
    strict = cfg.model_copy(update={"questions": [cfg.questions[0].model_copy(update={"reject": [target]}), cfg.questions[1]]})
    decided, asked = filter_images(manifest, strict, tmp_path / "store")
    assert asked == 0
    rejected = set(decided.loc[(decided["status"] == "rejected") & (decided["decided_by"] == "vlm"), "path"])
    assert rejected == {p for p, w in words.items() if w == target} and 0 < len(rejected) < len(words)
    reason = decided.set_index("path").loc[next(iter(rejected)), "reason"]
    assert reason.startswith(f"vlm_filter: '{Q1}' answered '") and "'" + Q2 not in reason


@pytest.mark.parametrize("kind", ["blip-vqa", "blip", "vision-encoder-decoder", "image-text-to-text"])
def test_generation_matches_the_plain_transformers_path(kind, images, tmp_path):
    """What ImageTextModel returns for a batch (images prepared one by one in decoding threads, then
    stacked) is what the processor + generate() + batch_decode recipe from the model cards gives."""
    build = {"blip-vqa": lambda d: tiny_blip(d), "blip": lambda d: tiny_blip(d, task="caption"), "vision-encoder-decoder": tiny_vit_gpt2, "image-text-to-text": tiny_llava}
    model = load_image_text_model(locate(str(build[kind](tmp_path / "m")), section="t"), section="t")
    assert model.kind == kind
    folder, _ = images
    batch = [load_rgb(path, 2**30) for path in sorted(folder.glob("*.png"))[:5]]
    prompt = None if kind == "vision-encoder-decoder" else "is there a watermark?"
    got = model.generate(batch, [prompt] * len(batch) if prompt else None, max_new_tokens=6, keep_prompt=True)

    if kind == "vision-encoder-decoder":
        inputs = model.image_processor(images=batch, return_tensors="pt")
    elif kind == "image-text-to-text":
        chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = model.processor.apply_chat_template(chat, add_generation_prompt=True)
        inputs = model.processor(images=[[im] for im in batch], text=[text] * len(batch), return_tensors="pt", padding=True)
    else:
        inputs = model.processor(images=batch, text=[prompt] * len(batch), return_tensors="pt", padding=True)
    out = model.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    if kind == "image-text-to-text":
        out = out[:, inputs["input_ids"].shape[1]:]
    assert got == [t.strip() for t in model.tokenizer.batch_decode(out, skip_special_tokens=True)]


def test_resumes_after_interruption(models, images, tmp_path):
    _, manifest = images
    cfg = cfg_for(models["blip"], workers=1).model_copy(update={"questions": [cfg_for(models["blip"]).questions[0]]})
    model = load_for(cfg)
    real_generate = model.generate_prepared

    def dies_on_third_batch(*args, **kwargs):
        if model.calls == 2:
            raise KeyboardInterrupt("killed")
        return real_generate(*args, **kwargs)

    model.generate_prepared = dies_on_third_batch
    with pytest.raises(KeyboardInterrupt):
        filter_images(manifest, cfg, tmp_path / "store", model)
    del model.generate_prepared
    model.calls = 0
    result = answers_for(manifest[manifest["status"] == "kept"], cfg, tmp_path / "store", model)
    assert result.asked == 10 - 2 * 3 and model.calls == 2  # the 4 left, in batches of 3
    full = answers_for(manifest[manifest["status"] == "kept"], cfg, tmp_path / "fresh-store", model)
    assert result.answers == full.answers  # resumed answers = one uninterrupted run's


def test_generic_chat_model(models, images, tmp_path):
    _, manifest = images
    cfg = cfg_for(models["llava"], prompt="answer yes or no : {question}")
    model = load_for(cfg)
    assert model.kind == "image-text-to-text" and model.chat and model.tokenizer.padding_side == "left"
    assert model._prompt_text("is there a watermark?") == "user : <image> is there a watermark? assistant : "
    frame, asked = filter_images(manifest, cfg, tmp_path / "store", model)
    assert asked == 10 and set(frame["decided_by"]) == {"vlm"}
    answers = [json.loads(a) for a in frame["answers"]]
    assert all(set(a) == {Q1, Q2} for a in answers)
    assert len({a[Q1] for a in answers}) > 1  # answers depend on the image, so they are the model's, per image
    assert "assistant" not in " ".join(a[Q1] for a in answers)  # the echoed prompt is cut off


def test_stage_end_to_end(models, images, tmp_path):
    folder, manifest = images
    manifest.to_parquet(tmp_path / "manifest.parquet")
    params = {"vlm_filter": {"model": str(models["blip"]), "batch_size": 4, "questions": [{"text": Q1, "reject": ["yes"]}]}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    args = ["--manifest", "manifest.parquet", "--out", "vlm_filter.parquet", "--store", "store"]
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # see conftest.one_torch_thread
    first = run([sys.executable, "-m", "stages.vlm_filter", *args], tmp_path, env=env)
    assert "asked the model about 10 images" in first.stderr
    frame = pd.read_parquet(tmp_path / "vlm_filter.parquet")
    assert list(frame.columns) == COLUMNS and len(frame) == 10 and set(frame["decided_by"]) == {"vlm"}
    said_yes = {p for p, a in zip(frame["path"], frame["answers"]) if first_word(json.loads(a)[Q1]) == "yes"}
    assert set(frame.loc[frame["status"] == "rejected", "path"]) == said_yes
    second = run([sys.executable, "-m", "stages.vlm_filter", *args], tmp_path, env=env)
    assert "asked the model about 0 images" in second.stderr
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "vlm_filter.parquet"), frame)
    assert os.listdir(tmp_path / "store")  # the memo lives where --store said
