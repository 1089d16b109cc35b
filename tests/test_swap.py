"""The swap stage on the default codec (TAEF2 when its weights are here, else pixels) with a tiny random
model: real detection, alignment, model, colour transfer and blend; frames and video out; blend params
rerun only the blend; a partly unreadable video still swaps every readable frame."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import taef2_dir
from stages import swap as swap_stage
from stagewise.codecs import CodecConfig, load_codec
from stagewise.faces.video import probe_video, read_frames
from stagewise.models.autoencoder import ModelConfig, init_model
from stagewise.train.checkpoint import save_model
from test_faces import astronaut, face_video, hopper, save

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CODEC = "taef2" if taef2_dir() is not None else "pixels"
MODEL_PX = 64  # 8 latent px on TAEF2: more than the 4 x 4 bottleneck


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("swap")
    if CODEC == "taef2":
        os.environ["STAGEWISE_MODELS"] = str(taef2_dir().parent)
    codec = load_codec(CodecConfig(name=CODEC))
    cfg = ModelConfig(resolution_px=MODEL_PX, bottleneck_px=4, channel_base=64, channel_max=16, channel_min=8, ae_dims=32)
    model = init_model(cfg, codec.channels, codec.factor)
    save_model(root / "runs/tiny", model, {"stage": "tiny", "codec_id": codec.id, "resolution_px": MODEL_PX})
    photos = root / "photos"
    save(photos / "1_astronaut.png", astronaut())
    save(photos / "2_hopper.png", hopper())
    save(photos / "3_noise.png", np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8))
    (photos / "4_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    return root


def run_swap(root: Path, swap: dict, name: str = "out") -> dict:
    params = {"swap": {"stage": "tiny", **swap}, "align": {"enabled": True, "crop_px": 128}, "codec": {"name": CODEC}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        swap_stage.main(argparse.Namespace(params="params.yaml", model="runs/tiny", out=f"swaps/{name}", metrics=f"swaps/{name}/summary.json", store="store"))
    finally:
        os.chdir(cwd)
    return json.loads((root / f"swaps/{name}/summary.json").read_text())


def test_swap_photos_then_a_blend_change_reruns_only_the_blend(project):
    counts = run_swap(project, {"input": "photos", "color_transfer": "rct"})
    assert counts == {"frames": 4, "swapped_frames": 2, "faces_swapped": 2, "unchanged_frames": 1, "unreadable": 1, "detected_now": 3, "model_now": 2}
    out = project / "swaps/out"
    rows = pd.read_parquet(out / "swaps.parquet").set_index("input")
    assert rows.loc["3_noise.png", "status"] == "unchanged" and rows.loc["3_noise.png", "reason"].startswith("no face")
    assert rows.loc["4_broken.png", "status"] == "unreadable"
    written = {p.name for p in (out / "frames").iterdir()}
    assert written == {"1_astronaut.png", "2_hopper.png", "3_noise.png"}
    noise_in, noise_out = (np.asarray(Image.open(p)) for p in (project / "photos/3_noise.png", out / "frames/3_noise.png"))
    assert np.array_equal(noise_in, noise_out)  # a frame with no face is copied unchanged
    before, after = astronaut().astype(int), np.asarray(Image.open(out / "frames/1_astronaut.png")).astype(int)
    changed = np.abs(before - after).sum(-1) > 8
    ys, xs = np.nonzero(changed)
    assert 0.01 < changed.mean() < 0.3  # only the face region changed ...
    assert 120 < ys.mean() < 220 and 170 < xs.mean() < 290  # ... and it is the astronaut's face (box ~174-278 x 68-172)
    sheet = Image.open(out / "sheet.png")
    assert sheet.height > 2 * 256

    again = run_swap(project, {"input": "photos", "color_transfer": "lct", "blur_px": 3, "erode_px": 1})
    assert again["detected_now"] == 0 and again["model_now"] == 0 and again["swapped_frames"] == 2
    after2 = np.asarray(Image.open(out / "frames/1_astronaut.png")).astype(int)
    assert not np.array_equal(after, after2)  # the blend did change


def test_swap_a_partly_unreadable_video_writes_every_readable_frame_at_the_same_rate(project):
    clip = project / "clip.mkv"
    face_video(clip, 24, noise_every=4)
    data = clip.read_bytes()
    cut = project / "cut.mkv"
    cut.write_bytes(data[: int(len(data) * 0.92)])
    readable = [f for f in read_frames(cut) if hasattr(f, "rgb")]
    assert 0 < len(readable) < 24
    counts = run_swap(project, {"input": "cut.mkv"}, name="video")
    assert counts["frames"] - counts["unreadable"] == len(readable)
    assert counts["swapped_frames"] >= 1 and counts["unchanged_frames"] >= 1
    video = project / "swaps/video/frames/cut.mp4"
    out_frames = [f for f in read_frames(video) if hasattr(f, "rgb")]
    assert len(out_frames) == len(readable)
    assert probe_video(video).fps == pytest.approx(probe_video(cut).fps)


def test_swap_input_that_does_not_exist_names_the_params_key(project):
    from stagewise.config import ParamsError

    with pytest.raises(ParamsError, match="swap.input: nowhere does not exist"):
        run_swap(project, {"input": "nowhere"})
