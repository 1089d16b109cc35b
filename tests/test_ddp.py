"""Training on torchrun DDP (``train.devices: 2``, gloo on CPU), with real processes: the stage's entry point
re-launches itself under torchrun. Two ranks train the same loss curve and weights as one process with the
same global batch (within float tolerance: the gradient all-reduce sums in another order); a rank killed
with SIGKILL mid-stage stops the other, leaves the backups intact, and the same command resumes to weights
bit-identical to an uninterrupted two-rank run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run
from safetensors.torch import load_file

from stagewise.codecs import CodecConfig
from stagewise.config import ParamsError
from stagewise.train.loop import StageJob, run_stage
from stagewise.train.recipe import parse_train
from stagewise.train.runner import KILL_ENV
from test_train_resume import rolling_backups, train_cmd
from test_trainer import TINY_DEFAULTS, write_cache, write_init

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 8 images per step (4 per domain: 2 per rank), 12 steps, a rolling backup every 4 steps; with LRD, EMA, the GAN and
# random warp on, each of which must stay identical on both ranks.
DDP_STAGE = {"parent": "init", "resolution_px": 16, "length_kimg": 0.096, "save_every_kimg": 0.032, "lr_dropout": 0.5, "ema": {"halflife_kimg": 0.05}, "random_warp": True, "gan_power": 0.1}
KILL_AT_STEP = 7  # after the rolling backup at step 4 (32 images), before the one at step 8


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    write_cache(root / "cache", 16)
    write_init(root / "runs" / "init")
    params = {"codec": {"name": "pixels"}, "train": {"devices": 2, "defaults": TINY_DEFAULTS, "stages": {"a": DDP_STAGE}}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


@pytest.fixture(scope="module")
def two_ranks(project) -> Path:
    """An uninterrupted two-rank run: runs/ddp/a."""
    run(train_cmd("ddp/a"), project)
    return project / "ddp" / "a"


def losses(folder: Path) -> torch.Tensor:
    header, *rows = [line.split("\t") for line in (folder / "history.tsv").read_text().splitlines()]
    cols = [i for i, c in enumerate(header) if c.startswith(("loss_", "gan_")) or c == "grad_norm"]
    return torch.tensor([[float(r[c]) for c in cols] for r in rows], dtype=torch.float64)


def test_two_ranks_train_the_one_process_curve(project, two_ranks):
    train = parse_train({"defaults": TINY_DEFAULTS, "stages": {"a": DDP_STAGE}})
    one = project / "one" / "a"
    run_stage(StageJob("a", train, CodecConfig(name="pixels"), project / "runs" / "init", project / "cache" / "16", one, one / "backups", progress=False))
    assert len(losses(one)) == 6  # a status every 2 steps
    # Float tolerance: the all-reduce sums the ranks' gradients in another order than one backward does, and
    # twelve steps of warp + affine resampling amplify that rounding (measured: up to 4.5e-4 relative by the
    # last status row). Ranks that do not average their gradients differ by orders of magnitude more.
    torch.testing.assert_close(losses(two_ranks), losses(one), rtol=2e-3, atol=1e-5)
    ours, theirs = load_file(str(two_ranks / "model.safetensors")), load_file(str(one / "model.safetensors"))
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-5, msg=k)
    events = [json.loads(line)["event"] for line in (two_ranks / "events.jsonl").read_text().splitlines()]
    assert events == ["started", "finished"]  # rank 0 alone writes: one event each, not one per rank


@pytest.mark.parametrize("rank", [1, pytest.param(0, marks=pytest.mark.slow)])
def test_a_killed_rank_stops_the_other_and_the_rerun_resumes_exactly(project, two_ranks, rank):
    out = project / f"kill{rank}" / "a"
    failed = run(train_cmd(f"kill{rank}/a"), project, check=False, env={KILL_ENV: f"{rank}:{KILL_AT_STEP}"})
    assert failed.returncode != 0 and f"rank {rank} (SIGKILL)" in failed.stderr and "resume" in failed.stderr
    assert rolling_backups(out / "backups") == [32] and not (out / "model.safetensors").exists()  # the last good backup, intact

    run(train_cmd(f"kill{rank}/a"), project)  # the same command again

    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["started", "resumed", "finished"] and events[1]["from_kimg"] == 0.032
    resumed, uninterrupted = load_file(str(out / "model.safetensors")), load_file(str(two_ranks / "model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    assert (out / "history.tsv").read_text().splitlines()[0] == (two_ranks / "history.tsv").read_text().splitlines()[0]
    torch.testing.assert_close(losses(out), losses(two_ranks), rtol=0, atol=0)


def test_a_batch_that_does_not_split_names_the_key(project):
    from stages.train import main

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["stages"]["a"] = {**DDP_STAGE, "batch_size": 3}
    bad = project / "bad.yaml"
    bad.write_text(yaml.safe_dump(params))
    args = argparse.Namespace(params=str(bad), stage="a", parent="runs/init", cache="cache/16", out=str(project / "never"), backups=None, no_progress=True)
    with pytest.raises(ParamsError, match=r"train\.stages\.a\.batch_size: 3 does not divide over 2 devices \(train\.devices\)"):
        main(args)
    assert not (project / "never").exists()


@pytest.mark.slow
def test_a_diffusion_phase_on_two_ranks_trains_the_one_process_curve(tmp_path):
    """The diffusion phases run the same runner: two ranks draw the global batch's noise, timesteps and
    caption dropout and keep their rows', so the curve and weights are one process's (TAEF2 cache)."""
    import os

    from conftest import taef2_dir
    from stagewise.codecs import load_codec
    from stagewise.diffusion.config import parse_diffusion
    from stagewise.diffusion.loop import PhaseJob, run_phase
    from test_diffusion import init_stage
    from tiny_diffusion import params, write_cache as write_latents, write_params

    if taef2_dir() is None:
        pytest.skip("TAEF2 weights not on this machine (set STAGEWISE_MODELS)")
    os.environ.setdefault("STAGEWISE_MODELS", str(taef2_dir().parent))
    phase = {"parent": "init", "resolution_px": 32, "length_kimg": 0.024, "grad_accum": 2, "ema_halflife_kimg": 0.01, "offset_noise": 0.1, "caption_dropout": 0.5}
    write_latents(tmp_path / "cache", load_codec(CodecConfig()), 32)
    params_file = write_params(tmp_path, {"p1": phase})
    init_stage(tmp_path, params_file)
    raw = yaml.safe_load(params_file.read_text())
    raw["diffusion"]["devices"] = 2
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    run([sys.executable, "-m", "stages.diffuse", "--phase", "p1", "--parent", "runs/init", "--text", "runs/init/text", "--cache", "cache/32", "--out", "ddp/p1", "--no-progress"], tmp_path)

    one = tmp_path / "one" / "p1"
    cfg = parse_diffusion(params({"p1": phase})["diffusion"])
    run_phase(PhaseJob(name="p1", diffusion=cfg, codec=CodecConfig(), parent_dir=tmp_path / "runs" / "init", text_dir=tmp_path / "runs" / "init" / "text",
                       cache_dir=tmp_path / "cache" / "32", out_dir=one, backups_dir=one / "backups", progress=False))

    def curve(folder: Path) -> torch.Tensor:
        header, *rows = [line.split("\t") for line in (folder / "history.tsv").read_text().splitlines()]
        return torch.tensor([[float(r[header.index(c)]) for c in ("loss", "grad_norm")] for r in rows], dtype=torch.float64)

    assert len(curve(one)) == 3
    torch.testing.assert_close(curve(tmp_path / "ddp" / "p1"), curve(one), rtol=1e-4, atol=1e-6)
    ours, theirs = load_file(str(tmp_path / "ddp" / "p1" / "unet.safetensors")), load_file(str(one / "unet.safetensors"))
    for k in theirs:  # AdamW turns a rounding-level gradient difference on a near-zero gradient into up to lr (1e-3) per step
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-4, msg=k)
