"""The recipe is data: params.yaml ``train`` is an ordered map of stage name -> settings.

    train:
      device: auto                       # execution only: changing it reruns nothing
      defaults: {batch_size: 8, ...}     # merged under every stage (a change reruns every stage)
      stages:
        s128:        {parent: init, resolution_px: 128, length_kimg: 4}
        s256_locked: {parent: s128, resolution_px: 256, length_kimg: 1, freeze: [old]}
        ...

Each stage names its parent explicitly (``init`` for the first), so the DVC DAG and the order of growth
are both visible in the file. ``parent`` and ``resolution_px`` must be written in the stage itself (not in
``defaults``): dvc.yaml builds each stage's dependency paths from them. Checks that need the parent's
model (its resolution, which tensors a freeze pattern matches) run when the stage starts, with the same
``params.yaml: train.stages.<name>.<key>`` messages.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pathlib import Path

from pydantic import Field

from stagewise.config import ParamsError, Section, parse_section, read_params
from stagewise.train.gan import GanConfig
from stagewise.train.losses import LossWeights
from stagewise.train.warp import WarpConfig

INIT = "init"  # the parent name of the first stage: runs/init, written by the init stage
STAGE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")  # a folder name under runs/ and a DVC stage key


class GuardConfig(Section):
    """NaN guard: what a run of non-finite steps triggers."""

    max_bad_steps: int = Field(8, ge=1)  # consecutive skipped steps that trigger a rollback
    max_rollbacks: int = Field(3, ge=0)  # then the stage fails, naming the last good backup
    lr_factor: float = Field(0.5, gt=0, le=1)  # DFL practice after a NaN: halve the LR ...
    eps_factor: float = Field(10.0, ge=1)  # ... and raise Adam's epsilon, which bounds the step size


class EmaSettings(Section):
    """Exponential moving average of the weights (edm style, half-life in images)."""

    halflife_kimg: float | None = Field(None, gt=0)  # None: no EMA
    rampup_ratio: float | None = Field(0.05, gt=0)  # edm: half-life at most 5 % of the images seen so far
    use_for_output: bool = True  # preview, metrics and model.safetensors use the averaged weights


class StageConfig(Section):
    """One training stage. Progress is counted in images (``*_kimg``), never in steps."""

    parent: str  # stage whose model.safetensors this one starts from ('init' for the first)
    resolution_px: int = Field(ge=8)  # the parent's, or twice it (then the model grows)
    length_kimg: float = Field(gt=0)  # thousands of images (of each domain) this stage trains on
    batch_size: int = Field(8, ge=1)  # per domain; 8 fits a 2-core CPU and any GPU
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimizer step (effective batch = batch_size * grad_accum)
    optimizer: Literal["adam", "adamw"] = "adam"
    reset_optimizer: bool = False  # true: fresh Adam moments, EMA and discriminator instead of the parent stage's
    lr: float = Field(5e-5, gt=0)  # DFL's default learning rate
    betas: tuple[float, float] = (0.5, 0.999)  # DFL's Adam beta1 0.5: faster response to a changing target
    lr_warmup_kimg: float = Field(0.0, ge=0)  # LR ramps up linearly over this many kimg: fresh Adam moments take full-size steps
    eps: float = Field(1e-7, gt=0)  # DFL's epsilon; fp16 stages want about 1e-5 (1e-7 underflows)
    weight_decay: float = Field(0.0, ge=0)  # adamw only
    clip_grad: float | None = Field(None, gt=0)  # max global grad norm; None: no clipping (DFL's default)
    freeze: list[str] = []  # module-name patterns kept frozen: encoder, inter*, decoder_a, old, ...
    fade_in_kimg: float = Field(0.0, ge=0)  # growth stages: ProGAN fade-in of the new level over this many kimg
    random_warp: bool = True  # DFL's default: warp the input, so the model cannot copy pixels through
    warp: WarpConfig = WarpConfig()
    flip: bool = True  # use the cache's mirrored rows (or mirror on the fly if it has none)
    lr_dropout: float = Field(1.0, gt=0, le=1)  # keep probability of each weight's update; 1.0 = off, DFL "on" = 0.3
    gan_power: float = Field(0.0, ge=0)  # weight of the generator's adversarial term; 0 = no discriminator
    gan: GanConfig = GanConfig()
    loss: LossWeights = LossWeights()
    masked_training: bool = False  # DFL: the losses see only the face (blurred mask edge); needs align.enabled (masks in the cache)
    eyes_mouth_prio: bool = False  # DFL: extra L1 on the eyes and mouth (30x our MSE scale, DFL's 300 vs 10); needs align.enabled
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16/fp16: autocast; fp16 adds a grad scaler
    ema: EmaSettings = EmaSettings()
    save_every_kimg: float = Field(1.0, gt=0)  # rolling backups; a kill loses at most this much progress
    backups_kept: int = Field(3, ge=1)  # rolling backups kept, plus the untouchable stage start / end ones
    short_cycle_kimg: float | None = Field(None, gt=0)  # seed idea: save and reload every N kimg (None: off)
    log_every_kimg: float = Field(0.25, gt=0)  # status line + history.tsv row; the only per-step host syncs
    preview_every_kimg: float | None = Field(None, gt=0)  # also write preview.png during the stage (None: at the end only)
    preview_rows: int = Field(2, ge=1, le=8)  # images per domain in preview.png
    holdout_per_domain: int = Field(4, ge=0)  # images per domain never trained on; metrics.json measures them (4: one image is noise)
    seed: int = 0  # data order, warp, flip and LRD masks are pure functions of (seed, step)
    guard: GuardConfig = GuardConfig()

    @property
    def length_images(self) -> int:
        return round(self.length_kimg * 1000)

    def resume_fingerprint_fields(self) -> dict[str, Any]:
        """The settings a backup must share to be resumed: everything that changes the trajectory.

        Length, save cadence and logging are left out on purpose: a stage lengthened after it finished
        continues from its end backup (DFL's "train more"), bit-identical to having run longer at once."""
        skip = {"length_kimg", "save_every_kimg", "backups_kept", "log_every_kimg", "preview_every_kimg", "preview_rows"}
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in skip}


class TrainConfig(Section):
    """params.yaml ``train``: execution settings, stage defaults, and the ordered recipe.

    Build it with ``parse_train`` / ``load_train``: they merge ``defaults`` under each stage and check the
    order, with messages that name the key."""

    device: str = "auto"  # auto = cuda, then mps, then cpu
    compile: bool = False  # torch.compile the model; pays off only on long GPU runs
    devices: int = Field(1, ge=1)  # > 1: torchrun DDP on this many processes (GPUs; gloo processes on CPU); batch_size must divide
    defaults: dict[str, Any] = {}  # stage settings shared by every stage (a stage's own keys win)
    stages: dict[str, StageConfig]


def parse_train(raw: Any, source: str = "params.yaml") -> TrainConfig:
    def fail(key: str, message: str) -> ParamsError:
        return ParamsError(f"{source}: train.{key}: {message}")

    if not isinstance(raw, dict):
        raise fail("stages", "missing: params.yaml needs a train section with an ordered map of stages")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise fail("defaults", "must be a mapping of stage settings")
    for key in defaults:
        if key in ("parent", "resolution_px"):
            raise fail(f"defaults.{key}", "set it in each stage (dvc.yaml builds the stage's dependency paths from it)")
        if key not in StageConfig.model_fields:
            raise fail(f"defaults.{key}", f"unknown key; allowed keys: {', '.join(sorted(StageConfig.model_fields))}")
    stages = raw.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise fail("stages", "the recipe is empty; add at least one stage with parent: init")
    merged = {name: _deep_merge(defaults, spec) if isinstance(spec, dict) else spec for name, spec in stages.items()}
    cfg = parse_section({**raw, "stages": merged}, TrainConfig, "train", source)
    seen: dict[str, int] = {}
    for name, stage in cfg.stages.items():
        where = f"stages.{name}"
        if not STAGE_NAME.match(name) or name == INIT:
            raise fail(where, f"a stage name is letters, digits and _ (starting with a letter), and not {INIT!r}")
        if stage.parent != INIT and stage.parent not in seen:
            later = " (it comes later: stages run in the order written)" if stage.parent in cfg.stages else ""
            allowed = ", ".join(repr(n) for n in [INIT, *seen])
            raise fail(f"{where}.parent", f"{stage.parent!r} is not an earlier stage or {INIT!r}{later}; allowed here: {allowed}")
        res = stage.resolution_px
        if res & (res - 1):
            raise fail(f"{where}.resolution_px", f"{res} is not a power of two")
        if stage.parent in seen and res not in (seen[stage.parent], 2 * seen[stage.parent]):
            raise fail(f"{where}.resolution_px", f"{res} is neither the parent's ({stage.parent}: {seen[stage.parent]} px) nor twice it")
        if len(set(stage.freeze)) != len(stage.freeze):
            raise fail(f"{where}.freeze", "a pattern is listed twice")
        seen[name] = res
    return cfg


def load_train(path: Path | str = "params.yaml") -> TrainConfig:
    return parse_train(read_params(path).get("train"), str(path))


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def stage_error(stage: str, key: str, message: str) -> ParamsError:
    """A runtime recipe check failure, worded like the static ones."""
    return ParamsError(f"params.yaml: train.stages.{stage}.{key}: {message}")
