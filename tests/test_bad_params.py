"""Bad params, end to end: the real stage entry points (and one real `dvc repro`) given a bad params.yaml.

Each case must fail before any work starts: exit status 2, one ``error: params.yaml: <key>: ...`` message
that names the full key path and what is allowed (keys, values, bounds or the stages a parent can be),
no traceback, and nothing written -- the project tree (runs/, backups, data/, stores) is byte-for-byte,
mtime-for-mtime as before, and the stage's output folder does not exist.

Most cases run the entry point in this process (``runpy``: exactly what ``python -m stages.<name>`` runs,
without paying for a fresh interpreter and torch import per case); one training and one curation case
run as real processes, and one through `dvc repro`, to show nothing differs there.
"""

from __future__ import annotations

import hashlib
import os
import re
import runpy
import sys
from pathlib import Path

import pytest
import yaml

from conftest import dvc, run, set_params
from test_trainer import TINY_DEFAULTS, write_cache, write_init

TRAIN_ARGS = ["--stage", "a", "--parent", "runs/init", "--cache", "cache/16", "--out", "runs/a", "--backups", "runs/a/backups", "--no-progress"]
INGEST_ARGS = ["--domain", "a=photos/a", "--domain", "b=photos/b", "--out", "data/curated/manifest.parquet", "--store", "data/store/ingest"]
GOOD_STAGE = {"parent": "init", "resolution_px": 16, "length_kimg": 0.016}
BASE_PARAMS = {"ingest": {"min_side_px": 8}, "codec": {"name": "pixels"}, "train": {"defaults": TINY_DEFAULTS, "stages": {"a": GOOD_STAGE}}}


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A project that a good params.yaml trains and ingests: a 16 px cache, an init model, two photo folders."""
    from harness.faults import make_good

    root = tmp_path_factory.mktemp("bad_params")
    write_cache(root / "cache", 16)
    write_init(root / "runs" / "init")
    make_good(root / "photos" / "a", 2, seed=1, size_px=32)
    make_good(root / "photos" / "b", 2, seed=2, size_px=32)
    return root


def snapshot(root: Path) -> dict[str, tuple]:
    """Every folder and file under ``root`` but params.yaml: a new, removed or touched one shows up."""
    seen: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        seen[rel + "/"] = (os.stat(folder).st_mtime_ns,)
        for name in files:
            if rel == "." and name == "params.yaml":
                continue
            path = Path(folder) / name
            info = path.stat()
            seen[os.path.join(rel, name)] = (info.st_size, info.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return seen


def project_with(template: Path, dest: Path, edit) -> Path:
    import shutil

    shutil.copytree(template, dest, symlinks=True)
    params = yaml.safe_load(yaml.safe_dump(BASE_PARAMS))  # a deep copy
    text = edit(params)
    (dest / "params.yaml").write_text(text if isinstance(text, str) else yaml.safe_dump(params, sort_keys=False))
    return dest


def in_process(module: str, args: list[str], project: Path, monkeypatch, capsys) -> tuple[int, str]:
    """``python -m stages.<module> ARGS`` in this process, in ``project``: (exit status, stderr)."""
    monkeypatch.chdir(project)
    monkeypatch.setattr(sys, "argv", [f"stages/{module}.py", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module(f"stages.{module}", run_name="__main__", alter_sys=True)
    return exit_.value.code, capsys.readouterr().err


def stage(params: dict, **changes) -> None:
    params["train"]["stages"]["a"].update(changes)


def without_train(params: dict) -> None:
    params["trian"] = params.pop("train")


INVALID_YAML = "codec:\n  name: pixels\ntrain:\n  stages:\n    a: {parent: init, resolution_px: 16\n"  # unclosed flow mapping

CASES = {
    # id: (entry point, args, edit, [substrings the error message must hold])
    "unknown_key": ("train", TRAIN_ARGS, lambda p: stage(p, lrr=0.1), ["params.yaml: train.stages.a.lrr: unknown key; allowed keys: ", "lr, lr_dropout"]),
    "unknown_nested_key": ("train", TRAIN_ARGS, lambda p: stage(p, guard={"max_rollback": 1}), ["params.yaml: train.stages.a.guard.max_rollback: unknown key; allowed keys: eps_factor, lr_factor, max_bad_steps, max_rollbacks"]),
    "unknown_default": ("train", TRAIN_ARGS, lambda p: p["train"]["defaults"].update(batchsize=2), ["params.yaml: train.defaults.batchsize: unknown key; allowed keys: ", "batch_size"]),
    "wrong_type": ("train", TRAIN_ARGS, lambda p: stage(p, batch_size="eight"), ["params.yaml: train.stages.a.batch_size: Input should be a valid integer", "(got 'eight')"]),
    "wrong_value": ("train", TRAIN_ARGS, lambda p: stage(p, precision="fp64"), ["params.yaml: train.stages.a.precision: Input should be 'fp32', 'bf16' or 'fp16' (got 'fp64')"]),
    "negative_lr": ("train", TRAIN_ARGS, lambda p: stage(p, lr=-0.001), ["params.yaml: train.stages.a.lr: Input should be greater than 0 (got -0.001)"]),
    "resolution_not_power_of_two": ("train", TRAIN_ARGS, lambda p: stage(p, resolution_px=24), ["params.yaml: train.stages.a.resolution_px: 24 is not a power of two"]),
    "missing_parent": ("train", TRAIN_ARGS, lambda p: stage(p, parent="s64"), ["params.yaml: train.stages.a.parent: 's64' is not an earlier stage or 'init'; allowed here: 'init'"]),
    "freeze_matches_nothing": ("train", TRAIN_ARGS, lambda p: stage(p, freeze=["decoder_c"]), ["params.yaml: train.stages.a.freeze: pattern 'decoder_c' matches no parameter; parameter names look like encoder.blocks"]),
    "codec_name": ("train", TRAIN_ARGS, lambda p: p["codec"].update(name="vae"), ["params.yaml: codec.name: Input should be 'pixels', 'taef2' or 'diffusers' (got 'vae')"]),
    "misspelled_section": ("train", TRAIN_ARGS, without_train, ["params.yaml: trian: unknown section (line ", "did you mean train?; allowed sections: data, sample, ingest, "]),
    "invalid_yaml": ("train", TRAIN_ARGS, lambda p: INVALID_YAML, ["params.yaml: not valid YAML", "line 6"]),
    "ingest_unknown_key": ("ingest", INGEST_ARGS, lambda p: p["ingest"].update(min_side=8), ["params.yaml: ingest.min_side: unknown key; allowed keys: max_file_mb, max_pixels, min_side_px"]),
    "ingest_misspelled_section": ("ingest", INGEST_ARGS, lambda p: p.update(ingset=p.pop("ingest")), ["params.yaml: ingset: unknown section (line ", "), did you mean ingest?; allowed sections: "]),
}
SUBPROCESS = {"freeze_matches_nothing", "ingest_unknown_key"}  # also run as real processes


def check(code: int, err: str, want: list[str], before: dict, project: Path) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    message = err[err.index("error: ") :] if "error: " in err else err
    assert message.startswith("error: params.yaml: "), err
    for part in want:
        assert part in message, f"{part!r} not in {message!r}"
    line = re.search(r"params\.yaml: (\w+): unknown section \(line (\d+)\)", message)
    if line:  # the line named is the one that holds the key
        assert (project / "params.yaml").read_text().splitlines()[int(line[2]) - 1].startswith(f"{line[1]}:")
    assert snapshot(project) == before  # nothing written, touched or removed
    assert not (project / "runs" / "a").exists() and not (project / "data").exists()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_params_fail_before_any_work(case, template, tmp_path, monkeypatch, capsys):
    module, args, edit, want = CASES[case]
    project = project_with(template, tmp_path / "p", edit)
    before = snapshot(project)
    code, err = in_process(module, args, project, monkeypatch, capsys)
    check(code, err, want, before, project)


@pytest.mark.parametrize("case", sorted(SUBPROCESS))
def test_bad_params_in_a_real_process(case, template, tmp_path):
    module, args, edit, want = CASES[case]
    project = project_with(template, tmp_path / "p", edit)
    before = snapshot(project)
    proc = run([sys.executable, "-m", f"stages.{module}", *args], project, check=False, env={"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    check(proc.returncode, proc.stderr, want, before, project)


def test_good_params_do_run(template, tmp_path, monkeypatch, capsys):
    """The control: the same project with BASE_PARAMS trains (so the cases above fail for their edit alone)."""
    project = project_with(template, tmp_path / "p", lambda p: None)
    monkeypatch.chdir(project)
    monkeypatch.setattr(sys, "argv", ["stages/train.py", *TRAIN_ARGS])
    runpy.run_module("stages.train", run_name="__main__", alter_sys=True)
    assert (project / "runs" / "a" / "model.safetensors").exists()


def test_dvc_repro_with_a_bad_param_fails_before_the_stage_writes(tmp_path):
    from tiny_pipeline import make_tiny_project

    project = make_tiny_project(tmp_path / "project", sample=False)  # no data/ at all: nothing may be written there
    set_params(project / "params.yaml", {"data": {"domainz": {"a": "x"}}})  # the first stage's section
    proc = dvc(project, "repro", "ingest", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "error: params.yaml: data.domainz: unknown key; allowed keys: domains" in out
    assert "exited with 2" in out and "Traceback" not in out
    assert not (project / "data").exists() and not (project / "dvc.lock").exists()
