"""Code changes retrain; kills resume. The resume key of a training stage holds a content hash of the code
dvc.yaml lists as the stage's code deps, so a fixed loss reruns the stage from its parent instead of
republishing its old ``end`` backup, while the same code (a rerun after a kill, ``dvc repro -f``) resumes."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import yaml
from safetensors.torch import load_file

from conftest import ROOT, dvc, make_project, run, taef2_dir
from stagewise.code import CODE_ROOT, DIFFUSE_CODE, TRAIN_CODE, code_fingerprint
from test_trainer import TINY_DEFAULTS, TINY_MODEL, write_cache, write_init
from test_train_resume import ran


@pytest.mark.parametrize("stage, code", [("train", TRAIN_CODE), ("diffuse", DIFFUSE_CODE)])
def test_the_hashed_code_is_what_dvc_yaml_lists_for_the_stage(stage, code):
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["do"]["deps"]
    assert tuple(d for d in deps if not d.startswith(("runs/", "data/"))) == code
    assert CODE_ROOT == ROOT or (CODE_ROOT / "stagewise").is_dir()


def test_code_fingerprint_follows_every_file_but_not_bytecode(tmp_path):
    for dep in TRAIN_CODE:
        src, dst = CODE_ROOT / dep, tmp_path / dep
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    base = code_fingerprint(TRAIN_CODE, tmp_path)
    assert base == code_fingerprint(TRAIN_CODE, CODE_ROOT)  # where the tree lies does not matter
    (tmp_path / "stagewise/train/__pycache__").mkdir()
    (tmp_path / "stagewise/train/__pycache__/losses.cpython-311.pyc").write_bytes(b"bytecode")
    assert code_fingerprint(TRAIN_CODE, tmp_path) == base
    losses = tmp_path / "stagewise/train/losses.py"
    losses.write_text(losses.read_text() + "\n# a fix\n")
    changed = code_fingerprint(TRAIN_CODE, tmp_path)
    assert changed != base
    (tmp_path / "stagewise/models/autoencoder.py").unlink()
    assert code_fingerprint(TRAIN_CODE, tmp_path) not in (base, changed)


def events(project) -> list[str]:
    return [json.loads(line)["event"] for line in (project / "runs/a/events.jsonl").read_text().splitlines()]


def fix_the_loss(project) -> None:
    """A fix to the loss in the project's copy of the code (a code dep of the stage): an added L1 term."""
    losses = project / "stagewise/train/losses.py"
    losses.write_text(
        losses.read_text()
        + "\n\n_before_the_fix = reconstruction_loss\n\n\ndef reconstruction_loss(pred, target, cfg):\n"
        + "    loss, parts = _before_the_fix(pred, target, cfg)\n    return loss + (pred - target).abs().mean(), parts\n"
    )


def check_retrain_then_resume(project, train) -> None:
    """``train()`` runs the stage; between its runs the loss is fixed, then nothing changes."""
    train()
    first = load_file(str(project / "runs/a/model.safetensors"))
    fix_the_loss(project)
    train()
    assert events(project)[0] == "started" and "resumed" not in events(project)  # from the parent, not the old end
    fixed = load_file(str(project / "runs/a/model.safetensors"))
    assert any(not first[k].equal(fixed[k]) for k in first)  # trained with the new loss, not republished
    assert len(list((project / "runs/a/backups").iterdir())) == 1  # the old code's backups are gone
    train()  # the same code again (a rerun after a kill, or forced): it resumes from its newest backup, the end
    assert events(project)[-2:] == ["resumed", "finished"]
    again = load_file(str(project / "runs/a/model.safetensors"))
    assert all(fixed[k].equal(again[k]) for k in fixed)


def test_a_changed_loss_retrains_from_the_parent_and_unchanged_code_resumes(tmp_path):
    """The stage's own command in a copy of the project's code (what DVC runs, without DVC's start-up)."""
    project = tmp_path / "project"
    for name in ("stages", "stagewise"):
        shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    params = {"codec": {"name": "pixels"}, "train": {"defaults": TINY_DEFAULTS, "stages": {"a": {"parent": "init", "resolution_px": 16, "length_kimg": 0.032}}}}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    write_cache(project / "cache", 16)
    write_init(project / "runs" / "init")
    cmd = [sys.executable, "-m", "stages.train", "--stage", "a", "--parent", "runs/init", "--cache", "cache/16", "--out", "runs/a", "--no-progress"]
    check_retrain_then_resume(project, lambda: run(cmd, project))


@pytest.mark.slow
def test_dvc_repro_retrains_after_a_code_change_and_force_resumes(tmp_path):
    """The same through DVC: the code change makes train@a stale; `dvc repro -s -f` (the flows' force) resumes."""
    project = make_project(tmp_path / "project", {"codec": {"name": "pixels"}, "model": {**TINY_MODEL, "resolution_px": 8}})
    dag = yaml.safe_load((project / "dvc.yaml").read_text())
    dag["stages"] = {k: v for k, v in dag["stages"].items() if k in ("init", "train")}
    dag.pop("plots", None)
    (project / "dvc.yaml").write_text(yaml.safe_dump(dag, sort_keys=False))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"].update(defaults=TINY_DEFAULTS, stages={"a": {"parent": "init", "resolution_px": 8, "length_kimg": 0.032}})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_cache(project / "data" / "cache", 8)
    calls = iter([(["repro"], ["init", "train@a"]), (["repro"], ["train@a"]), (["repro", "-s", "-f", "train@a"], ["train@a"])])

    def train() -> None:
        args, expected = next(calls)
        assert ran(dvc(project, *args)) == expected

    check_retrain_then_resume(project, train)
    assert "Data and pipelines are up to date." in dvc(project, "status").stdout


@pytest.mark.skipif(taef2_dir() is None, reason="TAEF2 weights not on this machine (set STAGEWISE_MODELS)")
def test_a_changed_diffusion_code_retrains_the_phase_from_its_parent_and_unchanged_code_resumes(tmp_path):
    """The same for a diffusion phase (its resume key holds the hash of DIFFUSE_CODE): the phase's own
    command in a copy of the project's code, on a TAEF2 cache."""
    from stagewise.codecs import CodecConfig, load_codec
    from tiny_diffusion import write_cache as write_latents, write_params

    project = tmp_path / "project"
    for name in ("stages", "stagewise"):
        shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    write_params(project, {"a": {"parent": "init", "resolution_px": 32, "length_kimg": 0.008}})
    write_latents(project / "cache", load_codec(CodecConfig()), 32)
    env = {"STAGEWISE_MODELS": str(taef2_dir().parent)}
    run([sys.executable, "-m", "stages.diffuse_init", "--out", "runs/init"], project, env=env)
    phase = [sys.executable, "-m", "stages.diffuse", "--phase", "a", "--parent", "runs/init", "--text", "runs/init/text",
             "--cache", "cache/32", "--out", "runs/a", "--backups", "runs/a/backups", "--no-progress"]
    run(phase, project, env=env)
    loop = project / "stagewise/diffusion/loop.py"
    loop.write_text(loop.read_text() + "\n# a fix\n")  # any change to the phase's code deps
    run(phase, project, env=env)
    assert events(project)[0] == "started" and "resumed" not in events(project)  # from the parent, not the old end
    assert len(list((project / "runs/a/backups").iterdir())) == 1  # the old code's backups are gone
    run(phase, project, env=env)  # the same code again: it resumes from its newest backup, the end
    assert events(project)[-2:] == ["resumed", "finished"]
