"""Recipes are data: YAML validated against typed schemas (pydantic), with ``key.sub=value``
overrides from the command line. A wrong key or value fails naming the key and what is allowed."""
from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from longtail.registry import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def yes_no(value: Any) -> Any:
    """``yes``/``no`` for the auto/yes/no options, however YAML or the user spelled them: YAML reads
    ``yes``, ``no``, ``on``, ``off`` as booleans, and README, docstrings and hints all write ``no``."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str) and value.strip().lower() in YES_NO_SPELLINGS:
        return YES_NO_SPELLINGS[value.strip().lower()]
    return value


YES_NO_SPELLINGS = {"yes": "yes", "y": "yes", "on": "yes", "true": "yes", "no": "no", "n": "no", "off": "no",
                    "false": "no", "auto": "auto"}


class AugmentConfig(Section):
    """Augmentation applied batched on the training device (see longtail.data.augment)."""

    crop_padding: int = Field(0, ge=0, description="random crop after zero padding (CIFAR recipes: 4); 0 disables")
    random_resized_crop: bool = Field(
        False, description="ImageNet-style crop (scale 0.08-1, ratio 3/4-4/3): file datasets when decoding, "
                           "in-memory ones batched on the device (bilinear) to random_resized_crop_size")
    random_resized_crop_size: int | None = Field(
        None, ge=1, description="in-memory sets: the side the resized crops get (LIFT's CIFAR: 224); None: the "
                                "images' own side. File sets crop to data.image_size")
    flip: bool = Field(False, description="random horizontal flip (CIFAR recipes: true; never for digits)")
    rotation: float = Field(
        0.0, ge=0.0, le=180.0,
        description="random rotation by an angle ~ U(-rotation, rotation) degrees about the centre, nearest, "
                    "black corners: torchvision's RandomRotation(rotation), as RIDE's and SADE's CIFAR loaders "
                    "(15); 0 disables")
    autoaugment: Literal["none", "cifar10", "imagenet"] = "none"
    autoaugment_fill: int = Field(
        128, ge=0, le=255, description="pixel value AutoAugment's geometric ops fill with: 128 as the policies in the "
                                       "seeds' code (fillcolor 128); 0 is torchvision's default")
    randaugment: bool = False
    randaugment_ops: int = Field(2, ge=1)
    randaugment_magnitude: int = Field(9, ge=0, le=30)
    cutout: int = Field(0, ge=0, description="side of the square Cutout hole in pixels; 0 disables")
    cutout_fill: Literal["black", "mean"] = Field(
        "black", description="black: the hole is 0 before normalisation (SHIKE's and BALMS's code); mean: 0 after "
                             "normalisation, i.e. the dataset's mean colour")
    mixup_alpha: float = Field(0.0, ge=0.0, description="Beta(alpha, alpha) mixup; 0 disables")
    remix: bool = Field(False, description="Remix labels (Chou et al. 2020) instead of mixup's")
    remix_kappa: float = Field(3.0, gt=0.0)
    remix_tau: float = Field(0.5, ge=0.0, le=1.0)
    mix_until_epoch: int | None = Field(None, description="stop mixing after this epoch (None: always)")


class DataConfig(Section):
    dataset: str = "digits_lt"
    root: str | None = Field(None, description="folder, archive or list-file root of the dataset")
    train_list: str | None = None
    val_list: str | None = None
    test_list: str | None = None
    download: bool = False
    imbalance_factor: float | None = Field(
        None, description="max/min class size of the long-tailed profile (default: 10 for the benchmark sets; "
                          "image_folder keeps the tree as it is unless this or max_count is set)")
    profile: Literal["exp", "step"] = "exp"
    max_count: int | None = Field(None, description="images of the largest class (default: all it has)")
    selection: Literal["random", "first"] = Field(
        "random", description="which images a class keeps: a seeded shuffle (Cao et al.) or the first n (SHIKE's code)")
    selection_seed: int = 0
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="stratified validation split of the LT training set")
    val_source: Literal["train", "test"] = Field(
        "train", description="where the validation split comes from: the LT training set, or a balanced split of the test set")
    image_size: int | None = Field(None, ge=1, description="side file images are resized and centre-cropped to "
                                   "(image_folder and list_files; an image of this size is kept as it is). Unset: "
                                   "the images' own size when all have one square size, else 224 (run header)")
    in_memory: Literal["auto", "yes", "no"] = Field(
        "auto", description="keep decoded uint8 images in one tensor on the training device")
    cache_dir: str | None = Field(None, description="where decoded datasets are cached (default ~/.cache/longtail)")
    batch_size: int = Field(32, ge=1, description="per process; the default suits Digits-LT, CIFAR recipes use 128")
    drop_last: bool = Field(
        False, description="drop each epoch's last incomplete training batch (BBN's and BALMS's code) or keep it "
                           "(torch's default: Cao et al., SHIKE, RIDE); a kept last batch of one sample joins the "
                           "batch before it, so batch norm never sees a single sample")
    eval_batch_size: int = Field(1024, ge=1)
    num_workers: int = Field(4, ge=0)
    decode_on_device: Literal["auto", "yes", "no"] = Field(
        "auto", description="file sets: workers read JPEG bytes and the training device decodes them "
        "(torchvision.io, nvJPEG on CUDA); auto: on CUDA when every file is a JPEG")
    bad_files: Literal["fail", "skip"] = Field(
        "fail", description="image files whose header cannot be read (checked before training): fail naming "
                            "them all, or skip them and list them in the log")
    sampler: str = "instance"
    sampler_params: dict[str, Any] = Field(default_factory=dict)
    pair_sampler: str | None = Field(
        None, description="a second sampler whose batch is appended to each batch (BBN: reversed)")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    @field_validator("in_memory", "decode_on_device", mode="before")
    @classmethod
    def _yes_no(cls, value: Any) -> Any:
        return yes_no(value)

    @field_validator("imbalance_factor")
    @classmethod
    def _imbalance_at_least_one(cls, value: float | None) -> float | None:
        if value is None:
            return value
        if not math.isfinite(value):
            raise ValueError(f"imbalance factor must be a finite number >= 1, got {value}; use 1 for a balanced set")
        if value < 1:
            raise ValueError(f"imbalance factor is max/min class size and must be >= 1, got {value}; "
                             "use 1 for a balanced set")
        return value


FINETUNE = Literal["full", "linear", "partial", "lora", "adaptformer", "vpt", "bitfit", "ssf"]


class ModelConfig(Section):
    name: str = "mlp"
    params: dict[str, Any] = Field(default_factory=dict)
    pretrained_path: str | None = Field(None, description="local weights file; nothing is downloaded "
                                        "(model.weights is the same for every model)")
    weights: str | None = Field(None, description="local weights file (a state dict or a library checkpoint), "
                                "loaded strictly when the run starts; nothing is downloaded")
    pretrained: bool = Field(False, description="timm/open_clip: load the library's pretrained weights (its hub "
                             "cache, or a download where the machine may)")
    finetune: FINETUNE = Field("full", description="what of a timm/open_clip backbone trains (models/finetune.py)")
    finetune_params: dict[str, Any] = Field(default_factory=dict, description="the finetune mode's settings")
    normalization: Literal["model", "dataset"] = Field(
        "model", description="timm/open_clip: normalise with the pretrained model's mean/std (model) or the "
                             "dataset's; file images are decoded at the model's input size unless data.image_size "
                             "is set")

    @model_validator(mode="after")
    def _one_weights_file(self) -> "ModelConfig":
        if self.weights and self.pretrained_path:
            raise ValueError("model.weights and model.pretrained_path name the same thing; give one")
        return self


class EvalConfig(Section):
    """How test and validation images are scored."""
    tta: Literal["none", "flip", "five_crop", "ten_crop"] = Field(
        "none", description="test-time ensembling, logits averaged over views: flip (image + mirror), five_crop "
                            "(LIFT's: enlarge by tta_resize, four corner crops and the centre), ten_crop (those "
                            "and their mirrors); every scoring of the run uses it (training's evaluation, stage "
                            "2's final scores, eval, calibrate, eval --shifts, predict), an exported file does not")
    tta_resize: float = Field(248 / 224, ge=1.0, description="five/ten_crop: the image is enlarged by this factor "
                              "before cropping (LIFT: 224 + 24 pixels)")


class LossConfig(Section):
    name: str = "ce"
    params: dict[str, Any] = Field(default_factory=dict)


class OptimConfig(Section):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(2e-4, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)


class ScheduleConfig(Section):
    name: Literal["cosine", "step", "linear", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0.0)
    warmup_start_factor: float = Field(0.0, ge=0.0, le=1.0,
                                       description="lr at the start of warm-up, as a fraction of lr")
    milestones: list[int] = Field(default_factory=list, description="epochs of the step schedule")
    gamma: float = Field(0.1, description="step: lr x gamma^k after the k-th milestone (unless factors is set)")
    factors: list[float] | None = Field(
        None, description="step: the lr multiplier from each milestone on, one per milestone, e.g. [0.01, 0.0001] "
                          "(LDAM-DRW's code); replaces gamma")
    final_lr_factor: float = Field(0.0, ge=0.0, description="lr at the end of cosine/linear, as a fraction")
    per_step: bool = Field(True, description="update the lr every step (True) or every epoch")

    @model_validator(mode="after")
    def _one_factor_per_milestone(self) -> "ScheduleConfig":
        if self.name != "step" or self.factors is None:
            return self  # a recipe may inherit factors and switch to another schedule
        if self.milestones != sorted(self.milestones):
            raise ValueError(f"schedule.milestones {self.milestones} must be ascending when schedule.factors is set")
        if len(self.factors) != len(self.milestones):
            raise ValueError(f"schedule.factors has {len(self.factors)} values for {len(self.milestones)} "
                             f"milestones {self.milestones}; give one lr multiplier per milestone")
        return self


class TrainConfig(Section):
    epochs: int = Field(30, ge=1, description="the default suits the Digits-LT example; CIFAR recipes use 200")
    amp: Literal["auto", "none", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA and on CPUs with native bfloat16 (AVX-512 BF16 / AMX), "
                            "else none (float32); losses and metrics stay float32")
    channels_last: Literal["auto", "yes", "no"] = Field(
        "auto", description="auto: yes on CUDA and on CPUs with AVX-512, else no")
    compile: bool = False
    grad_clip: float | None = None
    log_interval: int = Field(50, ge=1, description="steps between log lines / device syncs")
    eval_every: int = Field(1, ge=0, description="evaluate every N epochs (0: only at the end)")
    select: Literal["last", "val", "test"] = Field(
        "last", description="which checkpoint is 'best': last (always), val (needs a validation split), "
                            "or test (the seeds' practice; marked in the metrics, never the default)")
    checkpoint_every: int = Field(1, ge=1)
    stop_at_epoch: int | None = Field(
        None, ge=1, description="stop after this epoch with a checkpoint (split a long run into jobs); "
                                "`longtail train --resume RUN` continues exactly")
    keep_epochs: list[int] = Field(
        default_factory=list, description="also keep the checkpoint of the end of these epochs "
        "(RUN/checkpoints/epoch<N>.pt), where another run may start from it with `longtail train --start-from` "
        "(readings that differ only after that epoch, e.g. an lr decay)")
    deterministic: bool = False
    scale_schedule: bool = Field(
        False, exclude=True, description="scale every setting counted in epochs (schedule milestones and warm-up, "
        "DRW and re-weighting epochs, mix_until_epoch; stage 2's likewise by stage2.epochs) from the recipe's own "
        "epochs to train.epochs; config.yaml holds the scaled values (so this switch is not written there)")

    @field_validator("channels_last", mode="before")
    @classmethod
    def _yes_no(cls, value: Any) -> Any:
        return yes_no(value)

    @model_validator(mode="after")
    def _kept_epochs_inside(self) -> "TrainConfig":
        outside = [epoch for epoch in self.keep_epochs if not 1 <= epoch <= self.epochs]
        if outside:
            raise ValueError(f"train.keep_epochs {outside} are outside the run's epochs 1-{self.epochs}: "
                             "an epoch the run never ends keeps nothing")
        return self


class Stage2Config(Section):
    method: str = "crt"
    params: dict[str, Any] = Field(default_factory=dict)
    epochs: int = Field(10, ge=0)
    from_checkpoint: Literal["last", "best"] | str = "last"
    sampler: str | None = "class_balanced"
    sampler_params: dict[str, Any] = Field(default_factory=dict)
    # what the stage-2 training job runs with; unset (None), each is stage 1's value, as before these keys existed
    batch_size: int | None = Field(None, description="per process; None (or 0): data.batch_size")
    grad_clip: float | None = Field(None, ge=0, description="None: train.grad_clip; 0: no clipping")
    compile: bool | None = Field(None, description="torch.compile the stage-2 step; None: train.compile")
    log_interval: int | None = Field(None, ge=1, description="steps between log lines / device syncs; "
                                                              "None: train.log_interval")
    amp: Literal["auto", "none", "bf16", "fp16"] | None = Field(
        None, description="stage 2's precision (its steps, feature caching and evaluation); None: train.amp")
    loss: LossConfig | None = None
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=0.1, weight_decay=5e-4))
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    augment: AugmentConfig | None = None
    features: Literal["images", "cached"] | None = Field(
        None, description="images: augmented images through the frozen backbone, BN in train mode (the authors' "
                          "cRT/SHIKE); cached: one pass over un-augmented images, BN frozen (fast); "
                          "None: the method's default")
    stop_at_epoch: int | None = Field(
        None, ge=1, description="stop stage 2 after this epoch with a checkpoint; --resume continues exactly")
    eval_every: int = Field(
        0, ge=0, description="also score test (and val) every N stage-2 epochs, for stage 2's learning curve in "
                             "its metrics.csv (the seeds' code reports its best epoch on test: this sizes that); "
                             "0: only the final evaluation. With several ranks shifting BN, each scores its "
                             "shard with its own statistics until they are averaged at the end")


class CalibrateConfig(Section):
    method: str = "ts"
    params: dict[str, Any] = Field(default_factory=dict)


class ShiftsConfig(Section):
    """``longtail eval --shifts``: forward- and backward-LT test sets drawn from the balanced one (SADE's
    test-agnostic protocol)."""
    imbalance_factors: list[float] = Field(default_factory=lambda: [2.0, 5.0, 10.0, 25.0, 50.0])
    seed: int = 0
    oracle: bool = Field(True, description="also correct with the true test prior (an upper bound for EM)")
    model_prior: Literal["train", "uniform"] = Field(
        "train", description="the prior the model's softmax assumes: train (CE and most losses) or uniform "
                             "(balanced softmax / logit-adjusted losses, which already remove the training prior)")

    @field_validator("imbalance_factors")
    @classmethod
    def _factors_at_least_one(cls, value: list[float]) -> list[float]:
        # a factor of 1 is the balanced test set again (three identical columns); inf and nan draw nothing sensible
        if not value or not all(math.isfinite(f) and f > 1 for f in value):
            raise ValueError(f"shifts.imbalance_factors must be a non-empty list of finite numbers > 1 (the balanced "
                             f"test set is always included), got {value}")
        return sorted(set(value))


def check_folder_name(value: str, what: str) -> str:
    """``value`` if it can name one folder (a run, a study, a study recipe, a stage-2 variant, a
    calibrator): not empty, no path separator, not starting with '.' (so never '..'), no surrounding
    whitespace or control characters. Else ValueError saying why, so no name places output outside
    the folder it belongs in."""
    problem = ("is empty" if not value.strip() else
               "contains a path separator" if "/" in value or "\\" in value else
               "starts with '.'" if value.startswith(".") else
               "starts or ends with whitespace" if value != value.strip() else
               "contains a control character" if any(ord(c) < 32 for c in value) else
               "is longer than 255 bytes" if len(value.encode()) > 255 else None)
    if problem:
        raise ValueError(f"{what} {value!r} {problem}; it must be one folder name (e.g. my_run-2)")
    return value


class Config(Section):
    name: str = "digits_lt_ce"
    seed: int = 0
    output_dir: str = "runs"
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    stage2: Stage2Config | None = None
    calibrate: CalibrateConfig | None = None
    shifts: ShiftsConfig = Field(default_factory=ShiftsConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    _notes: list[str] = PrivateAttr(default_factory=list)  # what loading resolved (scaled epochs), for the run header

    @field_validator("name")
    @classmethod
    def _one_folder(cls, value: str) -> str:
        return check_folder_name(value, "name (the run's folder in output_dir)")

    @model_validator(mode="after")
    def _selection_needs_validation(self) -> "Config":
        if self.train.select == "val" and self.data.val_fraction == 0 and self.data.val_list is None:
            raise ValueError("train.select=val needs a validation split: set data.val_fraction (e.g. 0.1) "
                             "or data.val_list")
        return self


def format_validation_error(error: ValidationError, source: str, root: type[BaseModel] | None = None) -> str:
    """One line per problem; an unknown key names the keys allowed in its section (of ``root``,
    default: the recipe schema ``Config``)."""
    lines = [f"invalid config {source}:"]
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            section = _section_at(item["loc"][:-1], root or Config)
            allowed = list(section.model_fields) if section else []
            close = difflib.get_close_matches(str(item["loc"][-1]), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"  unknown key {key!r}{hint}; allowed here: {', '.join(allowed) or '?'}")
        elif item["type"] == "literal_error":
            lines.append(f"  {key}: {item['msg']} (got {item['input']!r})")
        elif not item["loc"]:  # a check across sections: the input is the whole config
            lines.append(f"  {item['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {key}: {item['msg'].removeprefix('Value error, ')} (got {item.get('input')!r})")
    return "\n".join(lines)


def _section_at(loc: tuple, section: type[BaseModel]) -> type[BaseModel] | None:
    for part in loc:
        if isinstance(part, int):  # an item of a list of sections
            continue
        field = section.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        candidates = getattr(annotation, "__args__", (annotation,))
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return None
        section = nested[0]
    return section


def parse_value(text: str) -> Any:
    """Parse a command-line value as YAML, so ``1e-3``, ``true``, ``[1, 2]`` and ``null`` work."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (creating sections as needed)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        dotted, value = item.split("=", 1)
        node = raw
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {dotted!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = parse_value(value)
    return raw


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, source)) from None


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: sections merge, values (and lists) replace."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_recipe(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML recipe with its ``base:`` files (a path or a list, relative to the recipe) merged under it."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; see configs/ for the recipes")
    if path in _seen:
        raise ConfigError(f"config {path} includes itself through 'base'")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"config file {path}{line} is not valid YAML: {problem}. Indent with spaces, never "
                          "tabs, and write `key: value` pairs") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(raw).__name__}")
    bases = raw.pop("base", None) or []
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = merge(merged, read_recipe(path.parent / base, (*_seen, path)))
    return merge(merged, raw)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                check_epochs: bool = True) -> Config:
    """Read a YAML recipe (or the built-in Digits-LT default when ``path`` is None) and apply overrides.
    Settings counted in epochs are scaled (``train.scale_schedule``) and then, with ``check_epochs``,
    checked against the epochs they belong to (``resolve_epochs``)."""
    raw = read_recipe(path) if path is not None else {}
    recipe_epochs = {"train": (raw.get("train") or {}).get("epochs", TrainConfig.model_fields["epochs"].default),
                     "stage2": (raw.get("stage2") or {}).get("epochs", Stage2Config.model_fields["epochs"].default)}
    overrides = list(overrides or [])
    raw = apply_overrides(raw, overrides)
    config = config_from_dict(raw, str(path) if path is not None else "<default Digits-LT>")
    given = {item.split("=", 1)[0].strip() for item in overrides if "=" in item}
    return resolve_epochs(config, recipe_epochs, given, check_epochs)


# ------------------------------------------------------------------ settings counted in epochs
def _epoch_keys(params: dict[str, Any], prefix: str) -> list[str]:
    """Dotted keys of every ``*_epoch`` integer in a loss's params, nested ones (RIDE's and IKL's
    ``base_params``) included."""
    keys = []
    for key, value in params.items():
        if isinstance(value, dict):
            keys += _epoch_keys(value, f"{prefix}.{key}")
        elif key.endswith("_epoch") and isinstance(value, int) and not isinstance(value, bool):
            keys.append(f"{prefix}.{key}")
    return keys


def epoch_settings(config: Config, stage: Literal["train", "stage2"]) -> list[str]:
    """Dotted keys of the settings counted in epochs that are in effect in ``stage``: warm-up,
    milestones of a step schedule, mix_until_epoch when mixing, and the loss's ``*_epoch`` params."""
    if stage == "train":
        schedule, augment, loss, root = config.schedule, config.data.augment, config.loss, ""
    else:
        if config.stage2 is None:
            return []
        schedule, augment, loss, root = config.stage2.schedule, config.stage2.augment, config.stage2.loss, "stage2."
    keys = []
    if schedule.warmup_epochs > 0:
        keys.append(f"{root}schedule.warmup_epochs")
    if schedule.name == "step" and schedule.milestones:
        keys.append(f"{root}schedule.milestones")
    if augment is not None and augment.mixup_alpha > 0 and augment.mix_until_epoch is not None:
        keys.append(f"{root + 'augment' if root else 'data.augment'}.mix_until_epoch")
    if loss is not None:
        keys += _epoch_keys(loss.params, f"{root}loss.params")
    return keys


def _get(config: Config, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def _set(config: Config, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node: Any = config
    for part in parents:
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    if isinstance(node, dict):
        node[last] = value
    else:
        setattr(node, last, value)


def _scaled(value: Any, key: str, new: int, old: int) -> Any:
    """A setting moved from a run of ``old`` epochs to one of ``new``: epoch indices (switch points) round
    down, so one inside the old run stays inside the new one; warm-up, a length, scales exactly."""
    if key.endswith("warmup_epochs"):
        return value * new / old
    if isinstance(value, list):
        return [item * new // old for item in value]
    return value * new // old


def _beyond(key: str, value: Any, epochs: int) -> bool:
    """Whether a setting falls at or after the end of a run of ``epochs`` epochs (never takes effect);
    warm-up may last the whole run."""
    if key.endswith("warmup_epochs"):
        return value > epochs
    return any(item >= epochs for item in (value if isinstance(value, list) else [value]))


def check_epochs(config: Config, stages: tuple[str, ...] = ("train", "stage2"), can_scale: bool = True) -> None:
    """ConfigError naming every setting counted in epochs that falls at or after its stage's end
    (``can_scale``: the command reads a recipe, so train.scale_schedule is a way out)."""
    problems = []
    for stage in stages:
        epochs_key = "train.epochs" if stage == "train" else "stage2.epochs"
        keys = epoch_settings(config, stage)  # type: ignore[arg-type]
        epochs = _get(config, epochs_key) if keys else 0
        problems += [f"{key}={_get(config, key)} (at or after the end of {epochs_key}={epochs})"
                     for key in keys if _beyond(key, _get(config, key), epochs)]
    if problems:
        scale = (", or add train.scale_schedule=true to scale every epoch setting from the recipe's own epochs"
                 if can_scale else "")
        raise ConfigError(f"{', '.join(problems)} would never take effect; set {'them' if len(problems) > 1 else 'it'} "
                          f"inside the run{scale}")


def resolve_epochs(config: Config, recipe_epochs: dict[str, int], given: set[str], check: bool = True) -> Config:
    """With ``train.scale_schedule``, every setting counted in epochs that the overrides did not set
    (``given``: those are already in the run's epochs) is scaled from the recipe's epochs of its stage
    (``recipe_epochs["train"]``, ``["stage2"]``) to ``train.epochs`` / ``stage2.epochs``; what changed is
    kept in ``config._notes`` for the run header. Then ``check_epochs``."""
    for stage in ("train", "stage2") if config.train.scale_schedule else ():
        epochs_key = "train.epochs" if stage == "train" else "stage2.epochs"
        keys = epoch_settings(config, stage)  # type: ignore[arg-type]
        epochs, old_epochs = (_get(config, epochs_key) if keys else 0), recipe_epochs[stage]
        if not keys or epochs == old_epochs or old_epochs < 1:
            continue
        changed = []
        for key in keys:
            if any(key == item or key.startswith(item + ".") for item in given):
                continue
            old = _get(config, key)
            new = _scaled(old, key, epochs, old_epochs)
            _set(config, key, new)
            changed.append(f"{key} {old} -> {new}")
        config._notes.append(f"train.scale_schedule: {'stage 2' if stage == 'stage2' else 'stage 1'} epoch settings "
                             f"scaled from the recipe's {old_epochs} epochs to {epochs}: "
                             + (", ".join(changed) or "all were set by the overrides"))
    if check:
        check_epochs(config)
    return config


def config_notes(config: Config) -> list[str]:
    """What loading resolved for this config (scaled epoch settings), one line each, for the run header."""
    return list(config._notes)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
