"""Shared fixtures. Tests run real code: real Parquet, real DVC in temporary git repos, real models built
from tiny configs. Environment settings below keep them offline and quiet."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
# Files a pipeline copy needs: the DAG, params, and the code it lists as dependencies.
PROJECT_FILES = ["dvc.yaml", "params.yaml", ".dvcignore", "stages", "stagewise", "flows", "prefect.yaml", "plots"]


def taef2_dir() -> Path | None:
    """The bundled TAEF2 weights, if this machine has them (CI does, via STAGEWISE_MODELS)."""
    for base in (os.environ.get("STAGEWISE_MODELS"), ROOT.parent / "shared" / "models"):
        if base and (Path(base) / "taef2" / "taef2_encoder.pth").exists():
            return Path(base) / "taef2"
    return None


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's spin-waits make
    them ~100x slower with two threads than with one (measured: one tiny generate() 3.9 s against 0.04 s, a
    4 x 4 convolution 137 ms against 1.2 ms). Modules of tiny-model tests use it with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    """The embedded sample, built once per session with the default seed."""
    from stagewise.sample import SampleConfig, build_sample

    out = tmp_path_factory.mktemp("sample")
    build_sample(out, SampleConfig())
    return out


def set_params(params_file: Path, updates: dict) -> None:
    """Deep-merge ``updates`` into a params.yaml file."""
    params = yaml.safe_load(params_file.read_text()) or {}

    def merge(dst: dict, src: dict) -> None:
        for key, value in src.items():
            if isinstance(value, dict) and isinstance(dst.get(key), dict):
                merge(dst[key], value)
            else:
                dst[key] = value

    merge(params, updates)
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


def run(cmd: list[str], cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command with this interpreter's bin folder first on PATH (so DVC's `python` is ours)."""
    full_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def build_project_sample(project: Path) -> Path:
    """``make demo``'s first step: the embedded sample into ``project``/data/sample (params.yaml data.domains'
    default), with the project's ``sample`` settings. It is an input folder, not a DVC stage."""
    from stagewise.config import load_section
    from stagewise.sample import SampleConfig, build_sample

    out = project / "data" / "sample"
    build_sample(out, load_section("sample", SampleConfig, project / "params.yaml"))
    return out


def make_project(dest: Path, params: dict | None = None, sample: bool = True) -> Path:
    """A copy of this project's pipeline in a fresh git + DVC repo at ``dest``; with ``sample``, its default
    input folders (the embedded sample) built as ``make demo`` does."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    run(["git", "init", "-q"], dest)
    run([sys.executable, "-m", "dvc", "init", "-q"], dest)
    run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], dest)
    run([sys.executable, "-m", "dvc", "config", "core.check_update", "false"], dest)
    if params:
        set_params(dest / "params.yaml", params)
    if sample:
        build_project_sample(dest)
    return dest


def dvc(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], project, check=check)
