"""The DVC commands users run on this project, on its real pipeline (tiny config) in a temp git repo:
`dvc exp run -S`, `dvc exp show`, `dvc params diff`, `dvc metrics diff`, `dvc plots show` with the
offline page template, and what a fresh clone sees."""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, dvc, run
from tiny_pipeline import make_tiny_project

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:dvc.*")

GIT_USER = ["-c", "user.name=stagewise tests", "-c", "user.email=tests@stagewise.invalid"]


def git(project: Path, *args: str) -> subprocess.CompletedProcess:
    return run(["git", *GIT_USER, *args], project)


def committed_template_setting() -> str:
    """plots.html_template as committed in this repository's .dvc/config."""
    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc" / "config")
    return config["plots"]["html_template"]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    """The tiny pipeline reproduced once and committed, as a user's repository would be."""
    project = make_tiny_project(tmp_path_factory.mktemp("dvc_ops") / "project")
    shutil.copy(ROOT / ".gitignore", project / ".gitignore")  # resume backups and memo stores stay out of git
    dvc(project, "config", "plots.html_template", committed_template_setting())
    dvc(project, "repro")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "baseline")
    return project


def exp_rows(project: Path) -> dict[str, dict]:
    """`dvc exp show --json` as {name or rev: data}, baseline and experiments alike."""
    rows = {}
    for commit in json.loads(dvc(project, "exp", "show", "--json").stdout):
        rows[commit["name"] or commit["rev"]] = commit["data"]
        for exp in commit.get("experiments") or []:
            for rev in exp["revs"]:
                rows[rev["name"]] = rev["data"]
    return rows


def test_second_machine_pulls_from_a_remote_and_recomputes_nothing(baseline, tmp_path):
    """Two clones, one local-directory DVC remote (README "Artifacts on a DVC remote"). First in this file:
    it pushes the baseline as reproduced, before the tests below change its workspace. `dvc pull` alone
    brings the cached outputs but not the `cache: false` ones (the latent cache, optimizer state, resume
    backups), so DVC would recompute the cache and retrain; `python -m stagewise.remote pull` brings them
    too, and then `dvc status` is clean and `dvc repro` runs nothing."""
    import sys

    from conftest import build_project_sample

    remote = tmp_path / "remote"
    dvc(baseline, "remote", "add", "--local", "-d", "store", str(remote))  # .dvc/config.local: the baseline's git tree is untouched
    pushed = run([sys.executable, "-m", "stagewise.remote", "push"], baseline).stdout
    assert "data/cache/16: 1 file(s), 1 new on the remote" in pushed and "runs/lrd/backups" in pushed, pushed

    clone = tmp_path / "second"
    run(["git", "clone", "-q", str(baseline), str(clone)], tmp_path)
    dvc(clone, "remote", "add", "--local", "-d", "store", str(remote))
    build_project_sample(clone)  # the input folders: the embedded sample, rebuilt as `make demo` does (same bytes)
    dvc(clone, "pull")
    status = dvc(clone, "status").stdout
    assert "deleted:            data/cache/16" in status and "runs/lrd/backups" in status, status  # what `dvc push` leaves behind
    pulled = run([sys.executable, "-m", "stagewise.remote", "pull"], clone).stdout
    assert "data/cache/16: 1 file(s) pulled" in pulled and "runs/lrd/state.safetensors: 1 file(s) pulled" in pulled, pulled
    for out in ("data/cache/16", "runs/lrd/backups", "runs/gan/state.safetensors"):
        files = lambda root: {p.relative_to(root): p.read_bytes() for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file()}  # noqa: E731
        assert files(clone / out) == files(baseline / out) != {}, out
    assert dvc(clone, "status").stdout.strip() == "Data and pipelines are up to date."
    repro = dvc(clone, "repro")
    assert "Running stage" not in repro.stdout, repro.stdout[-3000:]
    again = run([sys.executable, "-m", "stagewise.remote", "pull"], clone).stdout  # what is here is never overwritten
    assert "data/cache/16: exists here, left as is" in again


def test_exp_run_set_param_then_exp_show_params_diff_metrics_diff(baseline):
    project = baseline
    metrics_before = json.loads((project / "runs/lrd/metrics.json").read_text())
    ran = dvc(project, "exp", "run", "-n", "lower-lr", "-S", "train.stages.lrd.lr=0.001")
    log = ran.stdout + ran.stderr
    reran = set(re.findall(r"Running stage '([^']+)'", log))
    assert reran == {"train@lrd", "train@gan", "swap", "report"}, log[-3000:]  # editing lrd reruns lrd, gan, the swap of gan, report

    rows = exp_rows(project)
    assert rows["lower-lr"]["params"]["params.yaml"]["data"]["train"]["stages"]["lrd"]["lr"] == 0.001
    assert rows["workspace"]["params"]["params.yaml"]["data"]["train"]["stages"]["lrd"]["lr"] == 0.001
    base = rows["main"] if "main" in rows else rows["master"]
    assert base["params"]["params.yaml"]["data"]["train"]["stages"]["lrd"]["lr"] == 0.002
    assert base["metrics"]["runs/lrd/metrics.json"]["data"] == metrics_before  # the baseline row has its metrics
    assert rows["lower-lr"]["metrics"]["runs/lrd/metrics.json"]["data"] == json.loads((project / "runs/lrd/metrics.json").read_text())

    params_diff = json.loads(dvc(project, "params", "diff", "--json").stdout)
    assert params_diff == {"params.yaml": {"train.stages.lrd.lr": {"old": 0.002, "new": 0.001, "diff": pytest.approx(-0.001)}}}

    metrics_diff = json.loads(dvc(project, "metrics", "diff", "--json").stdout)
    lrd = metrics_diff["runs/lrd/metrics.json"]
    assert lrd["a.loss"]["old"] == metrics_before["a"]["loss"]
    assert lrd["a.loss"]["new"] == json.loads((project / "runs/lrd/metrics.json").read_text())["a"]["loss"]
    assert "runs/gan/metrics.json" in metrics_diff and "reports/metrics.json" in metrics_diff


def test_plots_show_renders_loss_curves_with_the_offline_template(baseline):
    project = baseline
    shown = dvc(project, "plots", "show")
    page = Path(shown.stdout.strip().removeprefix("file://"))
    html = page.read_text()
    assert not re.search(r"<script[^>]+src=", html) and "cdn.jsdelivr" not in html  # nothing to fetch
    for package in ("vega@5.33.1", "vega-lite@5.23.0", "vega-embed@6.29.0"):
        assert f"/* {package} */" in html
    # The top-level views of dvc.yaml, with this run's numbers in them.
    top_level = [next(iter(p)) for p in yaml.safe_load((project / "dvc.yaml").read_text())["plots"]]
    specs = {m.group(1): json.loads(m.group(2)) for m in re.finditer(r'<div id = "([^"]+)">\s*<script type = "text/javascript">\s*var spec = (.*?);\s*vegaEmbed', html, re.S)}
    for plot_id in top_level:
        assert plot_id in specs, sorted(specs)
    history = (project / "runs/lrd/history.tsv").read_text().splitlines()
    first_loss = float(history[1].split("\t")[history[0].split("\t").index("loss_a")])
    lrd_points = [v for v in specs["loss_a_by_stage"]["data"]["values"] if v.get("filename", "").endswith("lrd/history.tsv")]
    assert first_loss in [float(v["loss_a"]) for v in lrd_points]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium to render the page")
def test_plots_page_renders_in_a_browser_with_no_network(baseline, tmp_path):
    project = baseline
    page = Path(dvc(project, "plots", "show").stdout.strip().removeprefix("file://"))
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         "--host-resolver-rules=MAP * ~NOTFOUND",  # no name resolves: any fetch from the internet would fail
         "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout
    plots = len(re.findall(r'<div id="[^"]+" class="[^"]*vega-embed', dom))
    drawn = len(re.findall(r'<canvas[^>]*class="marks"', dom)) + len(re.findall(r'<svg[^>]*class="marks"', dom))
    assert plots >= 4 and drawn == plots, dom[:2000]  # vega-embed drew every chart from the inlined code


def test_fresh_clone_has_the_baselines(baseline, tmp_path):
    """dvc.lock and the `cache: false` metrics are committed, so a fresh clone (no DVC cache, no
    remote) already has what `dvc exp show` and `dvc metrics diff` compare against."""
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(baseline), str(clone)], tmp_path)
    rows = exp_rows(clone)
    head = json.loads(run(["git", "show", "HEAD:runs/lrd/metrics.json"], baseline).stdout)
    assert next(iter(rows.values()))["metrics"]["runs/lrd/metrics.json"]["data"] == head
    assert "stages/train.py" in rows["workspace"]["deps"]  # code hashes, from the committed dvc.lock
    assert json.loads(dvc(clone, "metrics", "diff", "--json").stdout) == {}
    status = dvc(clone, "status", "train@lrd").stdout
    assert "deleted:" in status and "runs/lrd/model.safetensors" in status  # DVC knows what to restore


def test_committed_dvc_config_points_at_the_offline_template():
    setting = committed_template_setting()
    template = (ROOT / ".dvc" / setting).resolve()  # DVC resolves it from .dvc/
    assert template == ROOT / "plots" / "offline.html"
    html = template.read_text()
    assert html.count("{plot_divs}") == 1 and "{scripts}" not in html  # DVC adds no CDN <script> tags
    makefile = (ROOT / "Makefile").read_text()
    packages = re.search(r"^VEGA_PACKAGES := (.+)$", makefile, re.M).group(1).split()
    for package in packages:  # the committed page is what `make plots-template` builds
        assert f"/* {package} */" in html and f"{package} from https://registry.npmjs.org" in html
