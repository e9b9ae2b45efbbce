"""Run configuration: dataclasses loaded from YAML with strict validation.

One :class:`RunConfig` drives every driver (centralized, torchrun, NVFlare). Unknown keys,
mistyped values and out-of-range settings raise :class:`bsf.errors.ConfigError` naming the key.
Overrides use dotted paths: ``train.steps=200 data.root=/data/ukb``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from bsf.errors import ConfigError

log = logging.getLogger(__name__)

#: ``train.device``: auto (a GPU if there is one), cpu, mps, cuda or cuda:N.
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
#: Largest ROI side in voxels (a 0.5 mm brain is under 512 voxels across) and largest ROI volume
#: (256 x 512 x 512 voxels = 268 MB per float32 channel): larger crops cannot fit any GPU's memory.
MAX_ROI_SIDE = 512
MAX_ROI_VOXELS = 256 * 512 * 512
#: Voxel sizes a resampling target may ask for, in mm.
SPACING_RANGE_MM = (0.1, 20.0)
#: A run of at most this many steps is a smoke test (the ``*_test`` presets warm up over 5 steps and their tiny runs
#: take 1-5): its warm-up is not checked against its length (:func:`_schedule_checks`).
SMOKE_RUN_STEPS = 5

@dataclass
class ModelConfig:
    size: str = "test"
    in_channels: int = 2
    out_channels: int = 3  # fine-tuning only: BraTS 3 (TC, WT, ET), ATLAS 1
    dropout: float = 0.0
    use_checkpoint: bool = False
    # the previous stage's model (any layout bsf.model.import_weights reads); its encoder is loaded,
    # its input channels adapted by modality name from pretrained_modalities to the model's channels
    pretrained: str | None = None
    pretrained_modalities: list[str] = field(default_factory=lambda: ["t1", "flair"])
    # a modality-aware model: its input channels by name, the federation's union in the canonical order
    # (t1, t1ce, t2, flair; bsf.federation.modality); a site feeds its data.modalities and leaves the others
    # empty. Empty: the model's channels are data.modalities (or the data set's full set), as before
    modalities: list[str] = field(default_factory=list)


@dataclass
class NormalizeConfig:
    """Intensity normalisation of the image channels, after the foreground crop (MRI: never a CT window).

    ``zscore_nonzero``: MONAI ``NormalizeIntensityd(nonzero=True, channel_wise=True)``, each channel's brain
    voxels (!= 0) to mean 0, std 1. ``percentile``: ``ScaleIntensityRangePercentilesd(channel_wise=True)``,
    each channel's ``lower``/``upper`` percentiles to ``b_min``/``b_max`` (``clip`` clips outside).
    ``none``: the file's intensities.
    """

    method: Literal["zscore_nonzero", "percentile", "none"] = "zscore_nonzero"
    lower: float = 0.5
    upper: float = 99.5
    b_min: float = 0.0
    b_max: float = 1.0
    clip: bool = False


@dataclass
class CropConfig:
    """How each loaded volume is cut into ``data.crops_per_volume`` training crops of ``data.roi``.

    ``random``: MONAI ``RandSpatialCropSamplesd``, uniform positions. ``pos_neg`` (fine-tuning only):
    ``RandCropByPosNegLabeld``, crop centres on lesion voxels and on other voxels in the ratio ``pos``:``neg``.
    """

    mode: Literal["random", "pos_neg"] = "random"
    pos: float = 1.0
    neg: float = 1.0


@dataclass
class AugmentConfig:
    """Fine-tuning augmentation of every crop (image and label together; SSL makes its own views instead).

    In this order: ``RandFlipd`` per spatial axis with ``flip_prob[axis]``; ``RandRotate90d`` in the first two
    spatial axes with ``rotate90_prob`` (null: 0.25 for ATLAS, the paper's random rotation, else 0);
    ``RandScaleIntensityd`` (image x (1 + U(-f, f))) and ``RandShiftIntensityd`` (image + U(-o, o)).
    """

    flip_prob: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    rotate90_prob: float | None = None
    scale_intensity_prob: float = 1.0
    scale_intensity_factor: float = 0.1
    shift_intensity_prob: float = 1.0
    shift_intensity_offset: float = 0.1


@dataclass
class TransformsConfig:
    """Preprocessing (deterministic, cached) and augmentation (per crop) of one data set in one stage.

    Deterministic, in this order: load -> ``orientation`` (axis codes, e.g. RAS; null keeps the file's) ->
    ``spacing`` (resample to [x, y, z] mm, bilinear image / nearest label; null keeps the grid) -> crop to
    the foreground (voxels > 0, plus ``foreground_margin``) when ``foreground_crop`` -> ``normalize`` ->
    pad to ``data.roi``. Random: ``crop`` then (fine-tuning) ``augment``. Defaults: the paper's pipeline.
    """

    orientation: str | None = "RAS"
    spacing: list[float] | None = None
    foreground_crop: bool = True
    foreground_margin: int = 0
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    crop: CropConfig = field(default_factory=CropConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # probability that a training crop has a random subset of its present modalities emptied (at least one kept;
    # seeded from the sample, bsf.data.transforms.RandModalityDropoutd), SSL and fine-tuning; 0: off
    modality_dropout: float = 0.0


@dataclass
class DataConfig:
    dataset: Literal["ukb", "brats", "atlas"] = "ukb"
    root: str = ""
    datalist: str | None = None
    roi: list[int] = field(default_factory=lambda: [96, 96, 96])
    crops_per_volume: int = 2
    batch_size: int = 1
    num_workers: int = 0
    val_cases: int = 1
    cache: Literal["none", "memory", "persistent"] = "memory"
    # persistent: MONAI PersistentDataset folder (preprocessed volumes on disk); also remembers checked files
    cache_dir: str = ""
    # channel mapping by modality name, e.g. [t1] for BraTS T1-only; empty = every image file, in datalist order
    modalities: list[str] = field(default_factory=list)
    # BraTS: the datalist's "fold" K becomes validation, the other folds training
    fold: int | None = None
    # before training: "header" reads NIfTI headers only; "full" also decodes every voxel (NaN/Inf, empty, labels)
    check: Literal["header", "full"] = "full"
    # leave out (and log) cases that fail the check instead of refusing to start
    skip_broken: bool = False
    # preprocessing and augmentation: orientation, spacing, foreground crop, normalisation, crop mode, augmentation
    transforms: TransformsConfig = field(default_factory=TransformsConfig)


@dataclass
class SSLConfig:
    rotation_weight: float = 1.0
    contrastive_weight: float = 1.0
    reconstruction_weight: float = 1.0
    temperature: float = 0.5
    max_box_fraction: float = 0.25  # box sides in [int(0.05 n), int(max_box_fraction n)), the public max_block_sz
    max_drop_fraction: float = 0.30  # a box pass stops when its volumes pass U(0, max_drop_fraction) x voxels (public max_drop)
    noise_range: Literal["crop", "unit"] = "crop"  # crop: box noise spans the crop's [min, max] per channel; unit: [0, 1]


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 1e-5
    warmup_steps: int = 0
    total_steps: int | None = None
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    accumulate: int = 1


@dataclass
class FinetuneConfig:
    label_format: Literal["auto", "brats2021", "brats2023"] = "auto"  # BraTS enhancing tumour = 4 (2021) or 3 (2023+)
    loss: Literal["dice", "dice_ce"] = "dice"  # the paper: Dice; dice_ce adds BCE, which learns faster on small lesions
    freeze_encoder: bool = False
    encoder_lr_scale: float = 1.0
    sw_overlap: float = 0.5
    sw_batch_size: int = 2
    threshold: float = 0.5
    # foreground probability of every voxel at initialisation: the new output layer's bias is logit(prior)
    # (the prior-probability init of Lin et al. 2017). With PyTorch's default init every voxel starts near 0.5
    # and Dice loss spends its first thousands of steps lowering the background; null keeps the default init.
    output_prior: float | None = 0.01


@dataclass
class TrainConfig:
    steps: int = 100
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False  # torch.compile the training forward (minutes of compiling on a CPU; see benchmarks/RESULTS.md)
    attention: Literal["monai", "sdpa"] = "monai"  # sdpa: Swin window attention through scaled_dot_product_attention
    val_every: int = 0
    log_every: int = 1
    checkpoint_every: int = 0
    output_dir: str = "runs/stage1"
    device: str = "auto"
    progress: bool = True


#: Choices of the federation section, each listed once (the CLI, the aggregator and the site use these).
Algorithm = Literal["fedavg", "fedprox", "fedopt", "scaffold"]  # fedprox: proximal term at the site; fedopt: server
# optimiser; scaffold: control variates at the site and the server (bsf.fl.scaffold)
Scope = Literal["encoder", "all"]  # which weights are global: the encoder (``swinViT.*``) or the whole network
Transfer = Literal["diff", "full"]  # a site sends its weight difference or its weights
TransferDtype = Literal["float32", "float16"]
Weighting = Literal["steps", "cases", "uniform", "fedcostwavg"]  # the FedAvg weight of a site's update
# (fedcostwavg: cases and the round's loss improvement, Mächler et al. 2021; bsf.federation.fedcost)
Robust = Literal["none", "clip", "trimmed_mean", "median"]  # the server's rule against wild updates (bsf.federation.robust)
ServerOptimizer = Literal["momentum", "adam"]  # fedopt: the server's optimiser on the aggregated difference
Encryption = Literal["none", "he"]  # he: the sites encrypt their updates (CKKS); the server sums ciphertexts (bsf.fl.he)
Task = Literal["brats", "atlas"]  # federation.tasks: a task's data set, one output head each (bsf.federation.task_heads)
ALGORITHMS: tuple[str, ...] = typing.get_args(Algorithm)
SCOPES: tuple[str, ...] = typing.get_args(Scope)
TRANSFERS: tuple[str, ...] = typing.get_args(Transfer)
TRANSFER_DTYPES: tuple[str, ...] = typing.get_args(TransferDtype)
WEIGHTINGS: tuple[str, ...] = typing.get_args(Weighting)
ROBUST_RULES: tuple[str, ...] = typing.get_args(Robust)
SERVER_OPTIMIZERS: tuple[str, ...] = typing.get_args(ServerOptimizer)
ENCRYPTIONS: tuple[str, ...] = typing.get_args(Encryption)
TASKS: tuple[str, ...] = typing.get_args(Task)
#: the default norm bound of the sites' updates (federation.norm_bound_*; bsf.federation.update_checks.NormBound):
#: refuse an update above 10 x the round's median update norm (rounds of >= 3 updates) or above an RMS of 100 per value
NORM_BOUND_MULTIPLE = 10.0
NORM_BOUND_RMS = 100.0


@dataclass
class FederationConfig:
    """How a federated job runs: written by the job into its run config, read back by the server and every site.

    ``rounds`` is the whole job's round count; a resumed job keeps it and starts at ``start_round``.
    The learning-rate schedule spans the whole job: ``train.steps`` must equal :attr:`schedule_steps`
    (``rounds * local_steps``; :func:`bsf.fl.jobs.job_run_config` writes it).
    """

    algorithm: Algorithm = "fedavg"
    rounds: int = 3
    local_steps: int = 4
    scope: Scope = "encoder"
    transfer: Transfer = "diff"
    transfer_dtype: TransferDtype = "float32"
    weigh_by: Weighting = "steps"
    min_clients: int = 2
    start_round: int = 0
    validate_global: bool = True  # each site validates the global model it receives, every round
    resume: bool = True  # each site keeps a per-round checkpoint and continues from it after a restart
    cross_site_eval: bool = True
    encryption: Encryption = "none"  # he: homomorphic encryption of the updates (POC or production, not the simulator)
    # the sites' documented uplink in Mbit/s: NVFlare's transfer timeouts follow from it and the payload (bsf.federation.payload)
    uplink_mbit: float | None = None
    # robust aggregation (see bsf.federation.robust); the rules work on differences: transfer diff
    robust: Robust = "none"
    clip_bound: float = 0.0  # robust clip: fixed L2 bound of an update (0: use clip_multiple)
    clip_multiple: float = 0.0  # robust clip: bound = clip_multiple x the round's median update norm (>= 1; 0: off)
    trim_fraction: float = 0.2  # robust trimmed_mean: fraction of the values dropped at each end, in [0, 0.5)
    # the norm bound, before any robust rule (bsf.federation.update_checks): an update whose L2 norm (a FULL one's: of
    # its difference to the global model) is above norm_bound_multiple x the round's median update norm (rounds of >= 3
    # updates) or whose RMS per value is above norm_bound_rms (every round) is refused by name. norm_bound: off opts out
    norm_bound: bool = True
    norm_bound_multiple: float = NORM_BOUND_MULTIPLE  # >= 1, or 0: no bound relative to the median
    norm_bound_rms: float = NORM_BOUND_RMS  # > 0, or 0: no ceiling (rounds of one or two updates then go unbounded)
    # slow sites: a round closes once min_responses results are in (0: every asked site) and
    # wait_time_after_min_received seconds have passed; a later result is dropped and logged
    min_responses: int = 0
    wait_time_after_min_received: int = 0
    fedprox_mu: float = 0.01  # algorithm fedprox: weight of the site's proximal term mu/2 ||w - w_global||^2
    fedopt_optimizer: ServerOptimizer = "momentum"  # algorithm fedopt (Reddi et al. 2021: FedAvgM / FedAdam)
    fedopt_lr: float = 1.0  # the server's learning rate on the aggregated difference
    fedopt_beta1: float = 0.9  # momentum / Adam's first-moment decay
    fedopt_beta2: float = 0.99  # Adam's second-moment decay
    fedopt_eps: float = 1e-3  # Adam's tau (adaptivity; Reddi et al. use 1e-3)
    fedcost_alpha: float = 0.5  # weigh_by fedcostwavg: alpha x case share + (1 - alpha) x loss-improvement share
    # Stage 3 across tasks: the data sets whose sites take part, one output head each, aggregated among that task's
    # sites only (the rest over all sites; bsf.federation.task_heads). Empty: one task
    tasks: list[Task] = field(default_factory=list)

    def __post_init__(self) -> None:
        checks = [
            (self.rounds >= 1, f"federation.rounds must be >= 1, got {self.rounds}"),
            (self.local_steps >= 1, f"federation.local_steps must be >= 1, got {self.local_steps}"),
            (self.min_clients >= 1, f"federation.min_clients must be >= 1, got {self.min_clients}"),
            (self.uplink_mbit is None or self.uplink_mbit > 0, f"federation.uplink_mbit must be > 0 (Mbit/s) or null, got {self.uplink_mbit}"),
            (0 <= self.start_round < self.rounds,
             f"federation.start_round must be in [0, rounds={self.rounds}), got {self.start_round}"),
            *((getattr(self, name) in choices, f"federation.{name}: {getattr(self, name)!r} is not one of {', '.join(choices)}")
              for name, choices in (("algorithm", ALGORITHMS), ("scope", SCOPES), ("transfer", TRANSFERS),
                                    ("transfer_dtype", TRANSFER_DTYPES), ("weigh_by", WEIGHTINGS),
                                    ("robust", ROBUST_RULES), ("fedopt_optimizer", SERVER_OPTIMIZERS),
                                    ("encryption", ENCRYPTIONS))),
            *self._aggregation_checks(),
            *self._encryption_checks(),
            *self._task_checks(),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def _aggregation_checks(self) -> list[tuple[bool, str]]:
        """(ok, message) of the robust, slow-site, FedProx, FedOpt and FedCostWAvg settings."""
        finite = all(math.isfinite(getattr(self, name)) for name in
                     ("clip_bound", "clip_multiple", "trim_fraction", "norm_bound_multiple", "norm_bound_rms",
                      "fedprox_mu", "fedopt_lr", "fedopt_beta1", "fedopt_beta2", "fedopt_eps", "fedcost_alpha"))
        return [
            (finite, "federation: clip_bound, clip_multiple, trim_fraction, norm_bound_*, fedprox_mu, fedopt_* and "
                     "fedcost_alpha must be finite numbers"),
            (self.norm_bound_multiple == 0 or self.norm_bound_multiple >= 1,
             f"federation.norm_bound_multiple must be 0 (no bound relative to the median) or >= 1, got {self.norm_bound_multiple}"),
            (self.norm_bound_rms >= 0, f"federation.norm_bound_rms must be >= 0 (0: no ceiling), got {self.norm_bound_rms}"),
            (not self.norm_bound or self.norm_bound_multiple > 0 or self.norm_bound_rms > 0,
             "federation.norm_bound is on but norm_bound_multiple and norm_bound_rms are both 0; "
             "to accept every update's norm say so: norm_bound: off"),
            (self.robust == "none" or self.transfer == "diff",
             f"federation.robust: {self.robust} works on weight differences; set federation.transfer: diff"),
            (self.clip_bound >= 0, f"federation.clip_bound must be >= 0, got {self.clip_bound}"),
            (self.clip_multiple == 0 or self.clip_multiple >= 1,
             f"federation.clip_multiple must be 0 (off) or >= 1, got {self.clip_multiple}"),
            (self.robust != "clip" or (self.clip_bound > 0) != (self.clip_multiple > 0),
             "federation.robust: clip needs exactly one of clip_bound (a fixed bound) or clip_multiple (times the "
             f"round's median update norm); got clip_bound={self.clip_bound}, clip_multiple={self.clip_multiple}"),
            (0 <= self.trim_fraction < 0.5, f"federation.trim_fraction must be in [0, 0.5), got {self.trim_fraction}"),
            (self.min_responses == 0 or self.min_responses >= self.min_clients,
             f"federation.min_responses must be 0 (every asked site) or >= min_clients={self.min_clients}, "
             f"got {self.min_responses}"),
            (self.wait_time_after_min_received >= 0,
             f"federation.wait_time_after_min_received must be >= 0 seconds, got {self.wait_time_after_min_received}"),
            (self.fedprox_mu >= 0, f"federation.fedprox_mu must be >= 0, got {self.fedprox_mu}"),
            (self.fedopt_lr > 0, f"federation.fedopt_lr must be > 0, got {self.fedopt_lr}"),
            (0 <= self.fedopt_beta1 < 1 and 0 <= self.fedopt_beta2 < 1,
             f"federation.fedopt_beta1/beta2 must be in [0, 1), got {self.fedopt_beta1}, {self.fedopt_beta2}"),
            (self.fedopt_eps > 0, f"federation.fedopt_eps must be > 0, got {self.fedopt_eps}"),
            (0 <= self.fedcost_alpha <= 1, f"federation.fedcost_alpha must be in [0, 1], got {self.fedcost_alpha}"),
            (self.weigh_by != "fedcostwavg" or self.robust in ("none", "clip"),
             f"federation.weigh_by: fedcostwavg weighs the mean, but robust: {self.robust} is unweighted; "
             "use robust: none or clip"),
        ]

    def _task_checks(self) -> list[tuple[bool, str]]:
        """(ok, message) of ``tasks``: distinct, the whole network shared, and the rules that know per-task heads."""
        if not self.tasks:
            return []
        return [
            (all(t in TASKS for t in self.tasks) and len(set(self.tasks)) == len(self.tasks),
             f"federation.tasks {list(self.tasks)}: distinct names among {', '.join(TASKS)}"),
            (self.scope == "all", "federation.tasks (one head per task) fine-tunes the whole network; set scope: all"),
            (self.transfer == "diff", "federation.tasks: a round may update only some tasks' heads; set transfer: diff"),
            (self.robust == "none" and self.algorithm in ("fedavg", "fedprox") and self.weigh_by != "fedcostwavg"
             and self.encryption == "none",
             "federation.tasks works with algorithm fedavg or fedprox, robust: none, weigh_by steps/cases/uniform and "
             f"no encryption (got algorithm {self.algorithm}, robust {self.robust}, weigh_by {self.weigh_by}, "
             f"encryption {self.encryption})"),
        ]

    def _encryption_checks(self) -> list[tuple[bool, str]]:
        """(ok, message) of ``encryption: he``: the server sees only ciphertexts, so it can only sum them."""
        if self.encryption != "he":
            return []
        return [
            (self.robust == "none",
             f"federation.encryption: he cannot run robust: {self.robust} (the rule needs plaintext updates); set robust: none"),
            (self.algorithm not in ("fedopt", "scaffold"),
             f"federation.encryption: he cannot run algorithm: {self.algorithm} (the server needs the plaintext difference "
             "or control variates)"),
            (self.weigh_by == "steps",
             f"federation.encryption: he weighs by steps (each site scales its update by its step count before "
             f"encrypting); weigh_by: {self.weigh_by} is not possible"),
            (not self.cross_site_eval,
             "federation.encryption: he cannot run cross_site_eval (the server holds only the encrypted global model); "
             "set cross_site_eval: false"),
        ]

    @property
    def schedule_steps(self) -> int:
        """The whole job's local steps per site (``rounds * local_steps``): the length of its learning-rate schedule."""
        return self.rounds * self.local_steps

    @property
    def remaining_rounds(self) -> int:
        """Rounds still to run from ``start_round``."""
        return self.rounds - self.start_round


@dataclass
class RunConfig:
    stage: Literal["ssl", "finetune"] = "ssl"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig | None = None  # set in a federated job's run config (bsf_run.yaml)

    @property
    def schedule_steps(self) -> int:
        """Length of the warm-up cosine schedule (``optim.total_steps`` or ``train.steps``)."""
        return self.optim.total_steps or self.train.steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESET_PACKAGE = "bsf.presets"


def list_presets() -> list[str]:
    """Names of the YAML presets shipped inside the package (without ``.yaml``)."""
    return sorted(p.name[:-5] for p in resources.files(PRESET_PACKAGE).iterdir() if p.name.endswith(".yaml"))


def load_config(
    source: str | Path | Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    settings: Mapping[str, Any] | None = None,
) -> RunConfig:
    """Build a validated :class:`RunConfig`.

    ``source`` is a YAML path, the name of a shipped preset (``stage1_test``), a mapping, or
    ``None`` for the defaults. ``settings`` (``dotted.key -> value``, e.g. a site's sections) and then
    ``overrides`` (``dotted.key=value`` strings, values parsed as YAML) are set in the raw mapping, in
    order, before anything is validated.
    """
    raw: dict[str, Any] = {}
    if isinstance(source, Mapping):
        raw = copy.deepcopy(dict(source))
    elif source is not None:
        raw = _read_yaml(source)
    for key, value in (settings or {}).items():
        set_dotted(raw, key, copy.deepcopy(value))  # the caller's mappings stay as they are
    for item in overrides:
        set_dotted(raw, *parse_override(item))
    config = _build(RunConfig, _upgrade(raw), "")
    validate(config)
    return config


def parse_override(item: str) -> tuple[str, Any]:
    """``section.key=value`` -> ``("section.key", value parsed as YAML)``; a malformed one is a ConfigError naming it."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        problem = str(exc).splitlines()[0]
        raise ConfigError(f"override {item!r}: the value {value!r} is not valid YAML ({problem})") from None
    return key.strip(), parsed


def _upgrade(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with keys of older configs (kept in checkpoints and summaries) moved to where they live now:
    ``finetune.crop`` -> ``data.transforms.crop.mode``."""
    finetune = raw.get("finetune")
    if not isinstance(finetune, Mapping) or "crop" not in finetune:
        return raw
    raw = copy.deepcopy(raw)
    mode = raw["finetune"].pop("crop")
    log.warning("config key finetune.crop is now data.transforms.crop.mode; read as data.transforms.crop.mode=%s", mode)
    set_dotted(raw, "data.transforms.crop.mode", mode)
    return raw


def _read_yaml(source: str | Path) -> dict[str, Any]:
    path = Path(source)
    if not path.exists() and str(source) in list_presets():
        path = Path(str(resources.files(PRESET_PACKAGE) / f"{source}.yaml"))
    if not path.exists():
        raise ConfigError(f"config {source}: no such file (shipped presets: {', '.join(list_presets())})")
    if path.is_dir():
        raise ConfigError(f"config {source}: is a directory, expected a YAML file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {source}: not valid YAML ({exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config {source}: not a text (UTF-8) file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {source}: top level must be a mapping")
    return data


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set ``section.key`` in a raw (not yet validated) config mapping, creating sections on the way."""
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
    node[leaf] = value


def _build(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (valid in this section: {', '.join(sorted(names))})")
    kwargs = {name: _coerce(hints[name], value, prefix + name) for name, value in raw.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the type hint; return it converted where lossless (int -> float)."""
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float:
        number = _as_float(value)
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{key}: {value!r} is not a finite number")
            return number
    if hint in (int, str, bool) and type(value) is hint:
        return value
    expected = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def _as_float(value: Any) -> float | None:
    """``value`` as a float when it is a number (not a bool) or a numeric string (YAML reads 1e-4 as a string)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def validate(config: RunConfig) -> None:
    """Range checks that types alone cannot express."""
    from bsf.model import MODEL_SIZES

    ssl_weights = (config.ssl.rotation_weight, config.ssl.contrastive_weight, config.ssl.reconstruction_weight)
    roi_voxels = math.prod(config.data.roi) if config.data.roi else 0
    checks = [
        (config.seed >= 0, "seed must be >= 0"),
        (config.model.size in MODEL_SIZES, f"model.size: {config.model.size!r} is not one of {', '.join(MODEL_SIZES)}"),
        (config.model.in_channels >= 1, "model.in_channels must be >= 1"),
        (config.model.out_channels >= 1, "model.out_channels must be >= 1"),
        (0 <= config.model.dropout < 1, "model.dropout must be in [0, 1)"),
        (bool(config.model.modalities) or not config.data.modalities or len(config.data.modalities) == config.model.in_channels,
         "data.modalities must name one modality per model.in_channels"),
        *_modality_checks(config),
        (config.stage == "ssl" or config.data.dataset != "ukb", "stage finetune needs labelled data: data.dataset brats or atlas"),
        (0 <= config.finetune.sw_overlap < 1, "finetune.sw_overlap must be in [0, 1)"),
        (config.finetune.encoder_lr_scale >= 0, "finetune.encoder_lr_scale must be >= 0"),
        (0 < config.finetune.threshold < 1, f"finetune.threshold must be in (0, 1), got {config.finetune.threshold}"),
        (config.finetune.sw_batch_size >= 1, "finetune.sw_batch_size (windows per sliding-window batch) must be >= 1"),
        (config.finetune.output_prior is None or 0 < config.finetune.output_prior < 1, "finetune.output_prior must be in (0, 1) or null"),
        (len(config.data.roi) == 3, "data.roi must have 3 sides"),
        (all(s >= 64 and s % 32 == 0 for s in config.data.roi), "data.roi: every side must be a multiple of 32 and >= 64"),
        (all(s <= MAX_ROI_SIDE for s in config.data.roi) and roi_voxels <= MAX_ROI_VOXELS,
         f"data.roi {config.data.roi} cannot fit: at most {MAX_ROI_SIDE} voxels a side and {MAX_ROI_VOXELS:,} voxels in all "
         "(the paper uses [96, 96, 96] for SSL and [128, 128, 128] for fine-tuning)"),
        (config.data.fold is None or config.data.fold >= 0, "data.fold must be >= 0 or null"),
        (config.data.crops_per_volume >= 1, "data.crops_per_volume must be >= 1"),
        (config.data.batch_size >= 1, "data.batch_size must be >= 1"),
        (config.data.num_workers >= 0, "data.num_workers must be >= 0"),
        (config.data.val_cases >= 0, "data.val_cases must be >= 0"),
        (all(w >= 0 for w in ssl_weights), "ssl.rotation_weight, contrastive_weight, reconstruction_weight must be >= 0"),
        (config.stage != "ssl" or sum(ssl_weights) > 0, "ssl: at least one of the three loss weights must be > 0"),
        (config.ssl.temperature > 0, "ssl.temperature must be > 0"),
        (0.05 < config.ssl.max_box_fraction <= 1, "ssl.max_box_fraction must be in (0.05, 1] (boxes start at 0.05 of a side)"),
        (0 <= config.ssl.max_drop_fraction <= 1, "ssl.max_drop_fraction must be in [0, 1]"),
        (config.optim.lr > 0, "optim.lr must be > 0"),
        (config.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (0 <= config.optim.min_lr_ratio <= 1, "optim.min_lr_ratio must be in [0, 1]"),
        (config.optim.total_steps is None or config.optim.total_steps >= 1, "optim.total_steps must be >= 1 or null"),
        (config.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
        (config.optim.accumulate >= 1, "optim.accumulate must be >= 1"),
        (config.optim.grad_clip is None or config.optim.grad_clip > 0, "optim.grad_clip must be > 0 or null"),
        (config.train.steps >= 0, "train.steps must be >= 0"),
        (config.train.log_every >= 1, "train.log_every must be >= 1 (log every N steps)"),
        (config.train.val_every >= 0, "train.val_every must be >= 0 (0: validate at the end only)"),
        (config.train.checkpoint_every >= 0, "train.checkpoint_every must be >= 0 (0: at the end only)"),
        (bool(DEVICE_PATTERN.match(config.train.device)),
         f"train.device: {config.train.device!r} is not auto, cpu, mps, cuda or cuda:N"),
        (config.schedule_steps >= 1, "optim.total_steps must be >= 1"),
        (config.federation is None or config.train.steps == config.federation.schedule_steps,
         f"train.steps must equal federation.rounds * federation.local_steps "
         f"({config.federation.schedule_steps if config.federation else 0}) in a federated run config"),
    ]
    for ok, message in [*checks, *_schedule_checks(config), *_transforms_checks(config)]:
        if not ok:
            raise ConfigError(message)


def _schedule_checks(config: RunConfig) -> list[tuple[bool, str]]:
    """The warm-up must end before the schedule does: ``optim.warmup_steps`` < ``optim.total_steps`` (or ``train.steps``,
    in a federated run config ``federation.rounds x federation.local_steps``). A longer warm-up ramps the learning rate up
    for the whole run and never reaches ``optim.lr`` (e.g. a paper preset's 500 warm-up steps in a 12-step job).
    Runs of at most :data:`SMOKE_RUN_STEPS` steps are smoke tests and are not checked."""
    total, warmup = config.schedule_steps, config.optim.warmup_steps
    if total <= SMOKE_RUN_STEPS or warmup < total:
        return []
    key = "optim.total_steps" if config.optim.total_steps else "train.steps"
    fed = config.federation
    origin = (f" (= federation.rounds {fed.rounds} x federation.local_steps {fed.local_steps})"
              if fed is not None and key == "train.steps" else "")
    return [(False, f"optim.warmup_steps {warmup} is not shorter than the schedule, {key} {total}{origin}: the learning "
                    f"rate would ramp up for the whole run and never reach optim.lr. Set optim.warmup_steps below {total}, "
                    f"or lengthen the schedule")]


def _modality_checks(config: RunConfig) -> list[tuple[bool, str]]:
    """A modality-aware model (``model.modalities``): canonical names in the canonical order, one per
    ``model.in_channels``, and the site's ``data.modalities`` among them; ``data.transforms.modality_dropout`` a probability."""
    from bsf.data.index import MODALITIES
    from bsf.federation.modality import MODALITY_ORDER

    model, dropout = config.model.modalities, config.data.transforms.modality_dropout
    checks = [(0 <= dropout <= 1, f"data.transforms.modality_dropout must be in [0, 1], got {dropout}")]
    if not model:
        return checks
    held = config.data.modalities or MODALITIES[config.data.dataset]
    canonical = [m for m in MODALITY_ORDER if m in model]
    return [
        *checks,
        (all(m in MODALITY_ORDER for m in model) and list(model) == canonical,
         f"model.modalities {list(model)}: must be distinct canonical names in the order {', '.join(MODALITY_ORDER)}"
         + (f" (here {canonical})" if canonical and len(canonical) == len(model) else "")),
        (len(model) == config.model.in_channels,
         f"model.modalities names {len(model)} channel(s) but model.in_channels is {config.model.in_channels}"),
        (all(m in model for m in held) and len(set(held)) == len(held),
         f"data.modalities {list(held)} (what this site holds) must be distinct names among model.modalities {list(model)}"),
    ]


def _transforms_checks(config: RunConfig) -> list[tuple[bool, str]]:
    """Range and consistency checks of ``data.transforms``: (ok, message naming the key)."""
    t = config.data.transforms
    key = "data.transforms"
    axes = [{"L", "R"}, {"P", "A"}, {"I", "S"}]
    codes = t.orientation or ""
    norm, crop, aug = t.normalize, t.crop, t.augment
    probabilities = [(f"augment.flip_prob[{i}]", p) for i, p in enumerate(aug.flip_prob)] + [
        ("augment.rotate90_prob", aug.rotate90_prob or 0.0),
        ("augment.scale_intensity_prob", aug.scale_intensity_prob),
        ("augment.shift_intensity_prob", aug.shift_intensity_prob),
    ]
    # percentile settings changed from their defaults (an error unless the method is percentile)
    stray = [f.name for f in dataclasses.fields(norm) if f.name != "method" and getattr(norm, f.name) != getattr(NormalizeConfig(), f.name)]
    return [
        (t.orientation is None or (len(codes) == 3 and all(sum(c in a for c in codes) == 1 for a in axes)),
         f"{key}.orientation: {t.orientation!r} must be 3 axis codes, one of L/R, P/A, I/S each (e.g. RAS), or null"),
        (t.spacing is None or (len(t.spacing) == 3 and all(SPACING_RANGE_MM[0] <= v <= SPACING_RANGE_MM[1] for v in t.spacing)),
         f"{key}.spacing must be 3 voxel sizes in mm between {SPACING_RANGE_MM[0]} and {SPACING_RANGE_MM[1]}, or null"),
        (t.foreground_margin >= 0, f"{key}.foreground_margin must be >= 0"),
        (t.foreground_crop or t.foreground_margin == 0, f"{key}.foreground_margin needs foreground_crop: true"),
        (norm.method == "percentile" or not stray, f"{key}.normalize.{stray[0] if stray else ''} applies to method percentile only"),
        (0 <= norm.lower < norm.upper <= 100, f"{key}.normalize: need 0 <= lower < upper <= 100"),
        (norm.b_min < norm.b_max, f"{key}.normalize: need b_min < b_max"),
        (crop.mode == "pos_neg" or (crop.pos, crop.neg) == (1.0, 1.0), f"{key}.crop.pos/neg apply to mode pos_neg only"),
        (crop.mode == "random" or config.stage == "finetune", f"{key}.crop.mode pos_neg needs labels: stage finetune"),
        (crop.pos >= 0 and crop.neg >= 0 and crop.pos + crop.neg > 0, f"{key}.crop: pos and neg must be >= 0, not both 0"),
        (config.stage == "finetune" or aug == AugmentConfig(),
         f"{key}.augment applies to stage finetune only (SSL makes its own rotated, corrupted views)"),
        (len(aug.flip_prob) == 3, f"{key}.augment.flip_prob needs one probability per spatial axis (3)"),
        *((0 <= p <= 1, f"{key}.{name} must be in [0, 1]") for name, p in probabilities),
        (aug.scale_intensity_factor >= 0, f"{key}.augment.scale_intensity_factor must be >= 0"),
        (aug.shift_intensity_offset >= 0, f"{key}.augment.shift_intensity_offset must be >= 0"),
    ]
