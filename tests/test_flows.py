"""The Prefect flows driving real DVC: stage order from DVC's DAG, artifacts, live logs, overrides,
failures (final vs retried), the pipeline lock, and a deployment run by a real server + worker.

Flows run inside one session-scoped `prefect_test_harness()` (a temporary real Prefect server);
single tasks are called with `.fn()`. DVC runs for real in temporary git repos: the project's own
pipeline on a tiny config, or a few-line dvc.yaml where a behaviour needs a stage that fails on purpose.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import ROOT, dvc, make_project, run
from flows import pipeline, stage_run
from flows.curate import curate
from flows.dag import PipelineError, read_dag, select
from flows.pipeline import pipeline_lock
from flows.stage_run import run_dvc_stage
from flows.progressive_train import progressive_train
from tiny_pipeline import TINY_PARAMS, make_tiny_project

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:dvc.*")  # DVC's own, about pygtrie


@pytest.fixture(scope="session")
def prefect_api():
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


def client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def task_runs(state) -> list:
    """The flow run's task runs in the order they started."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with client() as c:
        runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])), sort=TaskRunSort.EXPECTED_START_TIME_ASC)
    return sorted(runs, key=lambda r: r.start_time or r.expected_start_time)


def artifacts_of(state) -> dict[str, str]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with client() as c:
        found = c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    return {a.key: a.data for a in found}


def logs_of(state) -> list:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # logs reach the server in batches: send what is queued, and wait
    with client() as c:
        return c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))


def mini_project(tmp_path: Path, dvc_yaml: str, files: dict[str, str] | None = None) -> Path:
    """A git + DVC repo holding only the given dvc.yaml and helper files (stages that fail on purpose)."""
    project = tmp_path / "mini"
    project.mkdir()
    (project / "dvc.yaml").write_text(textwrap.dedent(dvc_yaml))
    for name, text in (files or {}).items():
        (project / name).write_text(textwrap.dedent(text))
    run(["git", "init", "-q"], project)
    dvc(project, "init", "-q")
    dvc(project, "config", "core.analytics", "false")
    return project


# --- the DAG, from DVC ----------------------------------------------------------------------------

FOREACH_DAG = """
stages:
  report:
    cmd: cat b.txt m/1.txt m/2.txt > report.txt
    deps: [b.txt, m/1.txt, m/2.txt]
    outs: [report.txt]
  model:
    foreach: [1, 2]
    do:
      cmd: mkdir -p m && cat a.txt > m/${item}.txt
      deps: [a.txt]
      outs: ["m/${item}.txt"]
  b:
    cmd: cat a.txt > b.txt
    deps: [a.txt]
    outs: [b.txt]
  a:
    cmd: echo a > a.txt
    outs: [a.txt]
"""


def test_dag_order_comes_from_dvc_and_selection_adds_upstream(tmp_path):
    project = mini_project(tmp_path, FOREACH_DAG)
    dag = read_dag(project)
    names = [s.name for s in dag]
    # dvc.yaml lists them backwards on purpose: the order is DVC's graph, ties in file order.
    assert names == ["a", "model@1", "model@2", "b", "report"]
    listed = dvc(project, "stage", "list", "--name-only").stdout.split()
    assert sorted(names) == sorted(listed)
    for i, stage in enumerate(dag):
        assert set(stage.upstream) <= set(names[:i])
    assert [s.name for s in select(dag, ["model"])] == ["a", "model@1", "model@2"]  # foreach group + upstream
    assert [s.name for s in select(dag, ["model@2"], upstream=False)] == ["model@2"]
    assert [s.name for s in select(dag, ["rep*"])] == names  # glob; report needs everything
    with pytest.raises(PipelineError, match="no stage matches 'nope'; the pipeline has: a, model@1"):
        select(dag, ["nope"])
    assert [s.name for s in select(dag, ["nope", "b"], missing_ok=True)] == ["a", "b"]


# --- one stage through DVC: outcome and failure classes, from real `dvc repro` output -------------


@pytest.mark.parametrize(
    "code, outcome, retryable, message",
    [
        ("print('working')", "ran", False, ""),
        ("import sys; print('error: params.yaml: x.lr: must be > 0', file=sys.stderr); sys.exit(2)", "failed", False, "error: params.yaml: x.lr: must be > 0"),
        ("raise OSError(5, 'Input/output error')", "failed", True, "stage command exited with 1: OSError: [Errno 5] Input/output error"),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "failed", True, "stage command killed by SIGKILL"),
        ("raise ValueError('shape mismatch')", "failed", False, "stage command exited with 1: ValueError: shape mismatch"),
    ],
    ids=["ok", "user-error", "io-error", "killed", "bug"],
)
def test_stage_outcome_and_whether_a_retry_can_help(tmp_path, code, outcome, retryable, message):
    project = mini_project(tmp_path, "stages:\n  s:\n    cmd: python step.py\n    deps: [step.py]\n", {"step.py": code + "\n"})
    result = run_dvc_stage(project, "s")
    assert (result.outcome, result.retryable, result.message) == (outcome, retryable, message)
    if outcome == "ran":
        assert "working" in result.tail  # the stage's own output came through, line by line
        assert run_dvc_stage(project, "s").outcome == "up to date"  # DVC, not the flow, decides


# Loaded by every Python process started with this folder on PYTHONPATH: DVC's log records say the same
# thing in other words (reversed), as a DVC release or a translation might.
REWORDED_DVC_LOG = """
import logging
_make_record = logging.getLogRecordFactory()
def _reworded(*args, **kwargs):
    record = _make_record(*args, **kwargs)
    if record.name.split(".")[0] in ("dvc", "dvc_data", "dvc_objects"):
        record.msg, record.args = "dvc, reworded: " + record.getMessage()[::-1], ()
    return record
logging.setLogRecordFactory(_reworded)
"""


def test_outcome_is_dvcs_answer_not_its_log_text(tmp_path, monkeypatch):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(REWORDED_DVC_LOG)
    monkeypatch.setenv("PYTHONPATH", str(hooks))
    project = mini_project(tmp_path, "stages:\n  s:\n    cmd: python step.py\n    deps: [step.py]\n", {"step.py": "print('working')\n"})
    ran = run_dvc_stage(project, "s")
    assert ran.outcome == "ran" and "working" in ran.tail
    assert "dvc, reworded: " + "Running stage 's':"[::-1] in ran.tail  # DVC's lines really did read differently
    skipped = run_dvc_stage(project, "s")
    assert skipped.outcome == "up to date"
    assert not any("didn't change" in line for line in skipped.tail)
    (project / "step.py").write_text("import sys; print('error: params.yaml: x.lr: must be > 0', file=sys.stderr); sys.exit(2)\n")
    failed = run_dvc_stage(project, "s")
    assert (failed.outcome, failed.retryable, failed.exit_status, failed.message) == ("failed", False, 2, "error: params.yaml: x.lr: must be > 0")


def test_busy_dvc_repo_reads_already_running(tmp_path):
    project = mini_project(tmp_path, "stages:\n  slow:\n    cmd: sleep 8 && echo done > out.txt\n    outs: [out.txt]\n")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    other = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "slow"], cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (project / ".dvc" / "tmp" / "rwlock").exists() or "slow" not in (project / ".dvc" / "tmp" / "rwlock").read_text():
            assert time.monotonic() < deadline, "the first dvc repro never took its lock"
            time.sleep(0.2)
        result = run_dvc_stage(project, "slow")
        assert (result.outcome, result.retryable) == ("already running", False)
        assert result.message.startswith("already running: another DVC process is working on this pipeline")
    finally:
        assert other.wait(60) == 0, other.stdout.read()
    assert (project / "out.txt").read_text() == "done\n"  # the first run was not disturbed


# --- flows on the real pipeline ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(prefect_api, tmp_path_factory):
    """The project's own pipeline, every stage, on the tiny config: run once by `progressive-train`."""
    project = make_tiny_project(tmp_path_factory.mktemp("flows") / "project")
    state = progressive_train(project_dir=str(project), return_state=True)
    return project, state


def test_progressive_train_runs_every_stage_in_dag_order_with_artifacts_and_logs(trained):
    project, state = trained
    assert state.is_completed(), state.message
    dag = read_dag(project)
    assert {"domains", "ingest", "init", "train@lrd", "train@gan", "report"} <= {s.name for s in dag}
    runs = task_runs(state)
    assert [r.name for r in runs] == [s.name for s in dag]  # one task per DVC stage, in DAG order
    assert all(r.state.is_completed() and r.run_count == 1 for r in runs)
    assert [r["outcome"] for r in state.result()] == ["ran"] * len(dag)
    # The run graph in the UI is DVC's DAG: each task waits for exactly the stages it reads from.
    name_of = {r.id: r.name for r in runs}
    for run_, stage in zip(runs, dag):
        edges = {name_of[i.id] for inputs in run_.task_inputs.values() for i in inputs if getattr(i, "id", None) in name_of}
        assert edges == set(stage.upstream), stage.name
    assert "Data and pipelines are up to date" in dvc(project, "status").stdout  # DVC agrees: nothing stale

    found = artifacts_of(state)
    # The curation counts with reasons, from the manifest the ingest stage wrote.
    manifest = pd.read_parquet(project / "data/curated/manifest.parquet")
    for domain, rows in manifest.groupby("domain"):
        kept, rejected = (rows.status == "kept").sum(), (rows.status == "rejected").sum()
        assert f"| {domain} | {kept} | {rejected} |" in found["ingest-curation"]
    for kind, count in manifest.loc[manifest.status == "rejected", "reason"].str.split(":").str[0].value_counts().items():
        assert re.search(rf"\| {re.escape(kind)} \| {count} \|", found["ingest-curation"]), kind
    # A training stage's metrics.json as a table, and its preview.png embedded.
    metrics = json.loads((project / "runs/lrd/metrics.json").read_text())
    assert "`runs/lrd/metrics.json`" in found["train-lrd-metrics"]
    assert f"| a.psnr_db | {metrics['a']['psnr_db']:.6g} |" in found["train-lrd-metrics"]
    uri = re.search(r"!\[train@lrd preview\]\(data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+)\)", found["train-lrd-preview"])
    with Image.open(io.BytesIO(base64.b64decode(uri.group(2)))) as shown, Image.open(project / "runs/lrd/preview.png") as written:
        assert shown.size == written.size  # small previews go in unscaled
    assert "progressive-train-summary" in found and "report-metrics" in found

    # The stage's own log lines, streamed into the task run's log as they were printed.
    ingest_run = next(r for r in runs if r.name == "ingest")
    ingest_lines = [log.message for log in logs_of(state) if log.task_run_id == ingest_run.id]
    assert "Running stage 'ingest':" in ingest_lines
    assert any(re.search(r"stages\.ingest: decoded \d+ new or changed files", line) for line in ingest_lines), ingest_lines[:40]


def test_curate_flow_runs_the_curation_stages_only(trained):
    project, _ = trained
    state = curate(project_dir=str(project), return_state=True)
    assert state.is_completed(), state.message
    dag = read_dag(project)
    curation = [s.name for s in dag if s.group not in ("init", "train", "diffuse_init", "diffuse", "swap", "report")]
    assert [r.name for r in task_runs(state)] == curation  # in DAG order; no init, train@*, diffuse*, report
    assert {r["outcome"] for r in state.result()} == {"up to date"}


def test_changed_param_reruns_only_downstream_stages(trained):
    project, _ = trained
    state = progressive_train(project_dir=str(project), set_params=["train.stages.lrd.lr=0.001"], return_state=True)
    assert state.is_completed(), state.message
    outcomes = {r["stage"]: r["outcome"] for r in state.result()}
    assert {s for s, o in outcomes.items() if o == "ran"} == {"train@lrd", "train@gan", "swap", "report"}
    assert {s for s, o in outcomes.items() if o != "ran"} == {s.name for s in read_dag(project)} - {"train@lrd", "train@gan", "swap", "report"}
    assert set(outcomes.values()) == {"ran", "up to date"}
    # The override went into params.yaml and, through the stage that read it, into dvc.lock.
    assert yaml.safe_load((project / "params.yaml").read_text())["train"]["stages"]["lrd"]["lr"] == 0.001
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["train@lrd"]["params"]["params.yaml"]["train.stages.lrd"]["lr"] == 0.001
    assert json.loads((project / "runs/lrd/meta.json").read_text())["config"]["lr"] == 0.001


def test_finished_run_saved_as_a_dvc_experiment(trained):
    project, _ = trained
    shutil.copy(ROOT / ".gitignore", project / ".gitignore")  # resume backups stay out of git
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@stagewise.invalid", "commit", "-q", "-m", "baseline"], project)
    state = progressive_train(project_dir=str(project), experiment="from-the-flow", return_state=True)
    assert state.is_completed(), state.message
    assert {r["outcome"] for r in state.result()} == {"up to date"}  # nothing changed since the last test
    shown = json.loads(dvc(project, "exp", "show", "--json").stdout)
    experiments = {rev["name"]: rev["data"] for commit in shown for exp in commit.get("experiments") or [] for rev in exp["revs"]}
    assert experiments["from-the-flow"]["params"]["params.yaml"]["data"]["train"]["stages"]["lrd"]["lr"] == 0.001
    assert experiments["from-the-flow"]["metrics"]["runs/lrd/metrics.json"]["data"] == json.loads((project / "runs/lrd/metrics.json").read_text())


def test_preview_is_embedded_when_small_and_named_when_too_large(tmp_path):
    from flows.artifacts import MAX_EMBEDDED_IMAGE_BYTES, PREVIEW_MAX_WIDTH_PX, preview_markdown

    rng = np.random.default_rng(0)
    small, noise = tmp_path / "small.png", tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 255, (64, 384, 3), dtype=np.uint8)).save(small)
    Image.fromarray(rng.integers(0, 255, (2048, 2048, 3), dtype=np.uint8)).save(noise)  # incompressible
    uri = re.search(r"\(data:image/\w+;base64,([A-Za-z0-9+/=]+)\)", preview_markdown("train@x", "runs/x/preview.png", small)).group(1)
    with Image.open(io.BytesIO(base64.b64decode(uri))) as shown:
        assert shown.size == (384, 64)
    too_large = preview_markdown("train@x", "runs/x/preview.png", noise)
    assert "data:" not in too_large and "open `runs/x/preview.png`" in too_large
    assert 2048 > PREVIEW_MAX_WIDTH_PX and MAX_EMBEDDED_IMAGE_BYTES < PREVIEW_MAX_WIDTH_PX**2


def test_set_params_edits_params_yaml_like_dvc_exp_run_keeping_comments(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    before = (tmp_path / "params.yaml").read_text()
    pipeline.apply_set_params(tmp_path, ["ingest.min_side_px=100", "+ingest.workers=1"])
    after = (tmp_path / "params.yaml").read_text()
    assert yaml.safe_load(after)["ingest"] == {**yaml.safe_load(before)["ingest"], "min_side_px": 100, "workers": 1}
    comments = [line.split("#", 1)[1] for line in before.splitlines() if "#" in line]
    assert comments and all(c in after for c in comments)  # DVC's -S writer keeps the file's comments
    with pytest.raises(PipelineError, match=r"Could not override 'ingest\.min_side'"):
        pipeline.apply_set_params(tmp_path, ["ingest.min_side=1"])  # a typo is not silently added


def test_bad_params_fail_the_flow_at_once_with_the_stages_message(prefect_api, tmp_path):
    project = make_project(tmp_path / "project", TINY_PARAMS)
    state = progressive_train(stages=["ingest"], set_params=["+ingest.bogus=1"], project_dir=str(project), return_state=True)
    assert state.is_failed()
    assert state.message.startswith("stage ingest failed: error: params.yaml: ingest.bogus: unknown key")
    runs = {r.name: r for r in task_runs(state)}
    assert runs["domains"].state.is_completed()
    assert runs["ingest"].state.is_failed() and runs["ingest"].run_count == 1  # exit 2: no retry
    assert "error: params.yaml: ingest.bogus" in runs["ingest"].state.message
    summary = artifacts_of(state)["progressive-train-summary"]
    assert "| domains | ran |" in summary and "| ingest | failed |" in summary


def test_unknown_stage_or_override_fails_before_anything_runs(prefect_api, tmp_path):
    project = mini_project(tmp_path, FOREACH_DAG)
    state = progressive_train(stages=["trian"], project_dir=str(project), return_state=True)
    assert state.is_failed() and state.message.startswith("no stage matches 'trian'")
    state = progressive_train(set_params=["a.b=1"], project_dir=str(project), return_state=True)
    assert state.is_failed() and "params.yaml does not exist" in state.message
    assert task_runs(state) == [] and not (project / "a.txt").exists()


# --- retries and the pipeline lock (few-line pipelines) -------------------------------------------

FLAKY = """
import os, sys
tries = int(open("tries.txt").read()) + 1 if os.path.exists("tries.txt") else 1
open("tries.txt", "w").write(str(tries))
if tries == 1:
    raise OSError(5, "Input/output error")  # a flaky disk
open("out.txt", "w").write("ok")
"""


def test_transient_failure_is_retried_with_backoff_then_completes(prefect_api, tmp_path, monkeypatch):
    monkeypatch.setattr(stage_run, "RETRY_DELAYS_S", [0])  # the policy is the module's; the wait is not the point here
    project = mini_project(tmp_path, "stages:\n  flaky:\n    cmd: python flaky.py\n    deps: [flaky.py]\n    outs: [out.txt]\n", {"flaky.py": FLAKY})
    state = progressive_train(project_dir=str(project), return_state=True)
    assert state.is_completed(), state.message
    (flaky,) = task_runs(state)
    assert flaky.run_count == 2 and (project / "tries.txt").read_text() == "2"


def test_second_run_is_turned_away_while_the_first_holds_the_pipeline(prefect_api, tmp_path):
    project = mini_project(tmp_path, "stages:\n  slow:\n    cmd: sleep 6 && echo done > out.txt\n    outs: [out.txt]\n")
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    first = subprocess.Popen(
        [sys.executable, "-m", "flows.progressive_train", "--project-dir", str(project)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        lock = project / ".dvc" / "tmp" / pipeline.LOCK_NAME
        deadline = time.monotonic() + 90
        while not (lock.exists() and "flow run" in lock.read_text()):
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the pipeline lock"
            time.sleep(0.2)
        holder = lock.read_text().strip()
        second = progressive_train(project_dir=str(project), set_params=["+x=1"], return_state=True)
        assert second.is_failed()
        assert second.message == f"already running: {holder} is running this pipeline ({lock}). Wait for it to finish or cancel it, then run again."
        assert task_runs(second) == [] and not (project / "params.yaml").exists()  # turned away before touching anything
    finally:
        output = first.communicate(timeout=120)[0]
    assert first.returncode == 0, output[-3000:]
    assert (project / "out.txt").read_text() == "done\n"
    with pipeline_lock(project, "test"):  # released by the first run
        pass


# --- a real server, pool, deployment and worker ------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_deployment_runs_on_a_served_worker(tmp_path):  # ~1 min: server start, deploy, worker, a flow-run process
    """`make serve`'s code path, then `prefect deployment run curate/default --watch`, as the README says."""
    from flows import local_server

    project = make_project(tmp_path / "project", TINY_PARAMS)
    home, port = tmp_path / "prefect-home", free_port()
    env = {**local_server.prefect_env(home, port)}
    try:
        local_server.start(home, port, project)
        again = subprocess.run([sys.executable, "-m", "flows.local_server", "start", "--home", str(home), "--port", str(port), "--project", str(project)], cwd=project, env=env, capture_output=True, text=True)
        assert again.returncode == 0, again.stderr
        assert "server: already running" in again.stdout and "already exists" not in again.stdout
        assert "work pool: 'stagewise' exists" in again.stdout and "worker: already running" in again.stdout

        watched = subprocess.run(
            [sys.executable, "-m", "prefect", "deployment", "run", "curate/default", "--watch", "--watch-timeout", "400", "--param", 'set_params=["ingest.min_side_px=72"]'],
            cwd=project, env=env, capture_output=True, text=True, timeout=450,
        )
        assert watched.returncode == 0, watched.stdout[-3000:] + watched.stderr[-3000:]
        assert "Flow run finished successfully" in watched.stdout
        manifest = pd.read_parquet(project / "data/curated/manifest.parquet")
        assert manifest["reason"].str.contains("min_side_px 72").any()  # the parameter reached the stage
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", watched.stdout).group(1)
        import urllib.request

        request = urllib.request.Request(f"{local_server.api_url(port)}/artifacts/filter", data=json.dumps({"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            keys = {a["key"] for a in json.load(response)}
        assert {"ingest-curation", "curate-summary"} <= keys
    finally:
        local_server.stop(home)
    assert local_server._read_pid(home / "worker.pid") is None and not local_server.healthy(port)
