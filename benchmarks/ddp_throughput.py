"""DDP throughput: images/s of one training stage on 1 process vs N torchrun processes, same global batch.

It builds a temp project (a pixels-codec cache of smooth random images and an init model of the size
given), then runs the real entry point, ``python -m stages.train``, with ``train.devices: 1`` and then
``train.devices: N`` (gloo on CPU, NCCL with a GPU per rank), and reads each run's throughput from its
history.tsv: the images/s of the status rows after the first (so interpreter start-up, the torchrun
launch, model loading and the final preview and metrics are left out), their median. It also prints the
launch-to-exit wall time of each run and the largest difference between the two runs' loss curves.

    python benchmarks/ddp_throughput.py [--devices 2] [--resolution-px 64] [--batch-size 8] [--steps 60] [--threads 1]

The two curves agree to float rounding at first and then drift apart as training amplifies it: a run
with batch 8 and one with batch 4 x grad_accum 2 (no DDP, the same mean of means) drift alike (measured:
2e-4 relative after 10 steps, 2e-1 after 40); tests/test_ddp.py checks the short curve and exactness.

On CPU the figure is for correctness, not speed: N gloo processes share the machine's cores, and each
rank holds a full copy of the model and optimizer. With N GPUs it measures the scaling.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from stagewise.models import ModelConfig, init_model  # noqa: E402
from stagewise.train import checkpoint as ckpt  # noqa: E402
from test_trainer import write_cache  # noqa: E402  # the trainer tests' cache: smooth images, both domains, mirrored rows


def history(folder: Path) -> list[dict[str, float]]:
    header, *rows = [line.split("\t") for line in (folder / "history.tsv").read_text().splitlines()]
    return [{k: float(v) for k, v in zip(header, row) if v != ""} for row in rows]


def run(project: Path, devices: int, out: str, threads: int) -> float:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["devices"] = devices
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    # the same threads per process in both runs (torchrun would set 1 for its ranks, a lone process takes every core)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "stages.train", "--stage", "a", "--parent", "runs/init", "--cache", f"cache/{params['train']['stages']['a']['resolution_px']}", "--out", out, "--no-progress"]
    proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} (devices {devices}) failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2, help="processes of the DDP run (default: %(default)s)")
    parser.add_argument("--resolution-px", type=int, default=64, help="image size of the model and cache (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="global batch per domain; must divide by --devices (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default: %(default)s)")
    parser.add_argument("--channels", type=int, default=64, help="channel_max of the model (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process, in both runs (default: %(default)s: 1 process x 1 thread vs N x 1)")
    args = parser.parse_args()
    if args.batch_size % args.devices:
        parser.error(f"--batch-size {args.batch_size} does not divide over --devices {args.devices}")
    images_per_step = 2 * args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        write_cache(project / "cache", args.resolution_px, per_domain=16)
        model = ModelConfig(resolution_px=args.resolution_px, bottleneck_px=4, channel_base=64 * args.resolution_px, channel_max=args.channels, channel_min=16, ae_dims=128)
        net = init_model(model, 3, 1)
        ckpt.save_model(project / "runs" / "init", net, {"stage": "init", "codec_id": "pixels", "config": {}})
        length_kimg = args.steps * images_per_step / 1000
        stage = {"parent": "init", "resolution_px": args.resolution_px, "length_kimg": length_kimg, "batch_size": args.batch_size, "lr": 1e-3,
                 "log_every_kimg": 10 * images_per_step / 1000, "save_every_kimg": length_kimg, "holdout_per_domain": 1, "preview_rows": 1}
        (project / "params.yaml").write_text(yaml.safe_dump({"codec": {"name": "pixels"}, "train": {"defaults": {}, "stages": {"a": stage}}}))
        walls, rates, curves = {}, {}, {}
        for devices in (1, args.devices):
            walls[devices] = run(project, devices, f"d{devices}/a", args.threads)
            rows = history(project / f"d{devices}" / "a")
            rates[devices] = statistics.median(r["images_per_s"] for r in rows[1:]) if len(rows) > 1 else float("nan")
            curves[devices] = torch.tensor([[r["loss_a"], r["loss_b"]] for r in rows])
        params_m = sum(p.numel() for p in net.parameters()) / 1e6
        device = "cuda" if torch.cuda.is_available() else "cpu"
        print(f"model {params_m:.2f} M params at {args.resolution_px} px, global batch {images_per_step} images/step, {args.steps} steps, on {device} "
              f"({torch.cuda.device_count() if device == 'cuda' else os.cpu_count()} {'GPUs' if device == 'cuda' else 'cores'}; load average {os.getloadavg()[0]:.1f})")
        for devices in (1, args.devices):
            print(f"  devices {devices}: {rates[devices]:8.1f} images/s in training (median of status rows), {walls[devices]:6.1f} s launch to exit")
        gap = ((curves[1] - curves[args.devices]).abs() / curves[1].abs()).max(dim=1).values  # per status row
        print(f"  speed-up {rates[args.devices] / rates[1]:.2f}x; relative loss difference between the curves: {gap[0]:.1e} at the first status row, {gap.max():.1e} at most "
              "(float rounding of the all-reduce, grown by training)")


if __name__ == "__main__":
    main()
