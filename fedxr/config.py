"""The typed recipe schema.

A recipe is YAML with the sections ``data``, ``model``, ``federated``, ``distill``, ``export``,
``explain``, ``privacy`` and ``output``. :func:`load_recipe` turns it (plus ``key=value`` overrides) into one :class:`Recipe`
object. Unknown keys are errors, every problem is reported at once and each message names the key path
and the fix. Site facts (where a hospital's images live) are not recipe keys: they come from the site.
"""

from __future__ import annotations

import difflib
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedxr import defaults as D
from fedxr.errors import FedxrError
from fedxr.layout import RunLayout

if TYPE_CHECKING:
    from fedxr.preprocessing import Preprocessing


_PROBLEM_SEP = "\n"


class RecipeError(FedxrError):
    """A recipe failed to load; ``problems`` lists every problem found, one per line."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"recipe {source} has {len(problems)} problem(s):\n{lines}")


class _Section(BaseModel):
    # extra="forbid" makes a misspelt key an error instead of a silently ignored setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PhantomConfig(_Section):
    """How to generate the built-in phantom data set (used when ``data.source`` is ``phantom``)."""

    patients: int = Field(D.PHANTOM_PATIENTS, ge=2, description="number of synthetic patients")
    hospitals: int = Field(D.PHANTOM_HOSPITALS, ge=1, description="number of hospitals with their own acquisition profile")
    size: int = Field(D.PHANTOM_SIZE, ge=32, le=1024, description="stored image size in pixels (square)")
    seed: int = D.PHANTOM_SEED


class DataConfig(_Section):
    source: Literal["phantom", "nih", "csv", "chexpert", "padchest", "vindr", "mimic"] = Field(
        "phantom", description="phantom (generated) | nih (ChestX-ray14 layout) | csv (a labels CSV: one row per image, "
                               "blank = unknown) | chexpert | padchest | vindr | mimic (those data sets' own label files)")
    root: str = Field("data/phantom", description="data set folder; phantom data is generated here")
    labels_file: Optional[str] = Field(None, description="label file under root (csv: labels.csv; others: their file)")
    metadata_file: Optional[str] = Field(None, description="mimic: mimic-cxr-2.0.0-metadata.csv under root")
    boxes_file: Optional[str] = Field(None, description="ground-truth boxes in NIH's BBox_List_2017.csv form, under root")
    extra_columns: list[str] = Field(default_factory=list, description="csv: columns kept as metadata, not labels")
    uncertain: Literal["ignore", "zeros", "ones"] = Field(
        "ignore", description="chexpert/mimic: what −1 (uncertain) becomes: unknown, 0 or 1 (the CheXpert paper's U-policies)")
    blank: Literal["negative", "unknown"] = Field(
        "negative", description="chexpert/mimic: what a blank (unmentioned) cell becomes; the CheXpert paper reads it as negative")
    vindr_rule: Literal["any", "majority"] = Field(
        "majority", description="vindr: a finding is present when any / a majority of an image's radiologists mark it")
    phantom: PhantomConfig = Field(default_factory=PhantomConfig)
    image_size: int = Field(128, ge=16, le=1024, description="training input size in pixels")
    sites: int = Field(D.SITES, ge=1, description="number of federated sites to split the data into")
    scheme: Literal["iid", "dirichlet", "quantity", "column"] = D.SPLIT_SCHEME
    column: Optional[str] = Field(D.SITE_COLUMN, description="column holding the natural site, for scheme=column")
    alpha: float = Field(D.DIRICHLET_ALPHA, gt=0, description="Dirichlet concentration (smaller = more label skew)")
    val_fraction: float = Field(D.VAL_FRACTION, ge=0, lt=1)
    test_fraction: float = Field(D.TEST_FRACTION, ge=0, lt=1, description="used only when no official test_list.txt")
    min_site_patients: int = Field(D.MIN_SITE_PATIENTS, ge=1)
    missing_images: Literal["error", "drop"] = "error"
    seed: int = D.DATA_SEED
    cache_dir: str = D.CACHE_DIR
    batch_size: int = Field(32, ge=1)
    num_workers: int = Field(2, ge=0)
    augment: bool = True


class ModelConfig(_Section):
    name: str = Field("densenet121", description="registry name; `fedxr models list` shows them")
    pretrained: bool = False
    precision: Literal["auto", "32-true", "16-mixed", "bf16-mixed", "bf16-true"] = Field(
        "auto", description="auto = bf16-mixed on a CPU with AMX or AVX512-BF16 or a bf16 GPU, else 32-true; "
                            "32-true under privacy.dp (fedxr/precision.py)")
    channels_last: bool = False
    compile: bool = False
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = "auto"
    devices: int | Literal["auto"] = Field(
        "auto", description="devices per site (each a DDP process under torchrun inside a federated site); "
                            "auto = all in central/local training, one inside a federated site")
    strategy: str = Field("auto", description="Lightning strategy; several devices per site train with ddp")
    lr: float = Field(1e-3, gt=0)
    init_from: Optional[str] = Field(
        None, description="a fedxr checkpoint of the same architecture to start from (e.g. a phantom-trained teacher)")
    norm: Literal["auto", "batch", "group"] = Field(
        "auto", description="normalisation layers: auto = GroupNorm with privacy.dp, else BatchNorm; group also "
                            "without DP (e.g. a public model that a DP federation will fine-tune)")
    trainable: Literal["all", "last_blocks", "norms_and_head", "head"] = Field(
        "all", description="what training changes: all weights, the last stage of blocks and the head, every "
                           "normalisation layer's scale and shift and the head, or the head alone (fine-tuning from "
                           "model.init_from; fewer trainable weights = less DP noise)")
    seed: int = Field(0, description="training seed: initial weights, data order, augmentation and every site's "
                                     "per-round seed (data.seed fixes the data and the split)")
    weight_decay: float = Field(1e-4, ge=0)
    mixup: float = Field(0.0, ge=0, description="mixup of training images and labels with a Beta(a, a) weight; 0 = off")
    warmup_epochs: float = Field(0.0, ge=0)
    max_epochs: int = Field(5, ge=1)
    max_steps: int = Field(-1, ge=-1, description="-1 = limited by max_epochs only")
    pos_weight_cap: float = Field(10.0, ge=1, description="upper bound on per-class BCE pos_weight")
    threshold_rule: Literal["youden", "f1"] = "youden"


class FederatedConfig(_Section):
    algorithm: Literal["fedavg", "fedprox", "scaffold", "fedopt"] = "fedavg"
    rounds: int = Field(3, ge=1)
    min_clients: int = Field(2, ge=1)
    local_epochs: int = Field(1, ge=1)
    local_steps: Optional[int] = Field(None, ge=1, description="steps per round; overrides local_epochs")
    max_local_steps: Optional[int] = Field(
        None, ge=1, description="cap on a site's steps per round: a site whose local epochs are longer trains this "
        "many steps instead (FedAvg weights sites by steps, so a site with most of the images otherwise outweighs "
        "all others together); shorter sites train their whole epochs")
    fedprox_mu: float = Field(0.01, ge=0)
    fedbn: bool = False
    env: Literal["sim", "poc", "prod"] = "sim"
    cross_site_eval: bool = True
    timeout_s: int = Field(3600, ge=10, description="how long the server waits for a site before giving up on it")


#: Keys recipes once had, with what to do instead: accepted with a FutureWarning and otherwise ignored, so
#: recipes (and the resolved recipes saved beside every run) written by earlier versions keep loading.
DEPRECATED_KEYS = {
    ("distill", "feature_weight"): "fedxr distils the teacher's outputs only and never used it; remove the key",
}


def _drop_deprecated(data: dict[str, Any], source: str) -> dict[str, Any]:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for (section, key), fix in DEPRECATED_KEYS.items():
        if isinstance(data.get(section), dict) and key in data[section]:
            del data[section][key]
            warnings.warn(f"{source}: {section}.{key} is deprecated and ignored: {fix}", FutureWarning, stacklevel=3)
    return data


class DistillConfig(_Section):
    students: list[str] = Field(default_factory=lambda: ["mobilenetv3_small_100"],
                                description="small models to distil the teacher into; [] skips distillation")
    mode: Literal["federated", "central"] = "federated"
    alpha: float = Field(0.7, ge=0, le=1, description="weight of the distillation term")
    temperature: float = Field(2.0, gt=0)
    mixup: float = Field(0.0, ge=0, description="mixup for the students (with and without the teacher alike): "
                                                "the teacher labels the mixed images; 0 = off")
    rounds: int = Field(3, ge=1)
    local_epochs: int = Field(1, ge=1)
    lr: Optional[float] = Field(None, gt=0, description="students' learning rate; default model.lr")
    image_size: Optional[int] = Field(None, ge=16, le=1024, description="students' input size in pixels; default "
                                      "data.image_size (the teacher sees each batch at its own size)")
    ablation_no_teacher: bool = True


class ExportConfig(_Section):
    out: str = "export"
    int8: Literal["auto", "on", "off"] = "auto"
    fp16: bool = False
    opset: int = Field(18, ge=13)
    calibration_images: int = Field(200, ge=1)
    parity_tolerance: float = Field(1e-4, gt=0)
    operating_point: str = Field("youden", description="per-finding threshold rule on validation: youden, "
                                 "sensitivity:0.90 or specificity:0.95")
    ood_quantile: float = Field(0.99, gt=0.5, lt=1, description="validation quantile of the OOD score above which an "
                                "image is flagged as unlike the training data")
    trust_images: int = Field(2000, ge=10, description="images per split read to fit the OOD score and calibration")

    @field_validator("operating_point")
    @classmethod
    def _known_operating_point(cls, v: str) -> str:
        from fedxr.trust.operating import parse_rule

        parse_rule(v)
        return v


class ExplainConfig(_Section):
    enabled: bool = True
    images: int = Field(16, ge=1, description="test images with boxes shown in the Grad-CAM grid")
    max_boxes: int = Field(200, ge=1, description="ground-truth boxes scored in the pointing game")
    val_boxes: int = Field(200, ge=0, description="validation boxes that choose each model's Grad-CAM layer "
                                                  "(0: the last map of at least 6 cells a side)")


class EnergyConfig(_Section):
    country: str = Field("USA", pattern=r"^[A-Z]{3}$",
                         description="ISO 3166-1 alpha-3 code of the electricity grid (its carbon intensity, from "
                                     "CodeCarbon's offline tables); e.g. USA, DEU, FRA, GBR")


class DPConfig(_Section):
    """DP-SGD at every site (Opacus); see fedxr.privacy.dp and the README's Privacy section."""

    epsilon: float = Field(8.0, description="target ε for each site over the whole federation (every round and "
                                            "local epoch); smaller = more private, noisier model")
    delta: Optional[float] = Field(None, description="target δ; must be below 1/N for a site with N training "
                                                     "images; default 1/(10 N) at each site")
    max_grad_norm: float = Field(1.0, gt=0, description="every image's gradient is clipped to this L2 norm")
    optimizer: Literal["sgd", "adamw"] = Field(
        "sgd", description="sgd (with privacy.dp.momentum; DP-SGD as published) or adamw (whose second-moment "
                           "estimate is mostly noise under DP, so it takes lr-sized steps where nothing was learned)")
    momentum: float = Field(0.9, ge=0, lt=1, description="momentum of DP-SGD")
    lr: Optional[float] = Field(None, gt=0, description="learning rate under DP; default model.lr")
    unit: Literal["image", "patient"] = Field(
        "image", description="what ε protects: one training image, or one patient (Poisson sampling and clipping "
                             "over patients, all of a patient's images together; δ below 1/patients)")
    logical_batch_size: Optional[int] = Field(
        None, ge=1, description="images per DP-SGD step on average (Poisson); trained in physical chunks of "
                                "data.batch_size, so it may be far above what fits in memory; default data.batch_size")
    augmentations: int = Field(1, ge=1, le=32, description="augmented copies of every image whose gradients are "
                                                           "averaged before clipping (augmentation multiplicity)")
    val_min_count: int = Field(
        20, ge=2, description="a DP site's released validation AUROC averages only the labels with at least this "
                              "many validation positives and negatives: one image moves a label with few of either "
                              "so much that its noise would drown the score")

    @field_validator("epsilon")
    @classmethod
    def _epsilon_positive(cls, value: float) -> float:
        if not value > 0:
            raise ValueError(f"privacy.dp.epsilon must be above 0 (got {value}); smaller is more private, "
                             "typical targets are 1 to 10")
        return value

    @field_validator("delta")
    @classmethod
    def _delta_probability(cls, value: Optional[float]) -> Optional[float]:
        if value is not None and not 0 < value < 1:
            raise ValueError(f"privacy.dp.delta must be between 0 and 1, and below 1/N for N training images at a "
                             f"site (got {value}); leave it out for 1/(10 N)")
        return value


class PrivacyConfig(_Section):
    audit: bool = Field(True, description="record what each site sends (tensor names, shapes, bytes, metric keys) "
                                          "in the job's outgoing-filter log; the report shows it")
    dp: Union[DPConfig, Literal[False]] = Field(False, description="differential privacy (DP-SGD) at every site; "
                                                                   "false = off")
    filter: Literal["none", "percentile", "svt"] = Field(
        "none", description="NVFlare's privacy filter on each site's update (sent as weight differences): "
                            "percentile (share only the largest changes) or svt (sparse vector technique)")
    he: bool = Field(False, description="homomorphic encryption: the server aggregates encrypted updates "
                                        "(POC/production only, TenSEAL)")

    @field_validator("dp", mode="before")
    @classmethod
    def _dp_true_means_defaults(cls, value):
        return {} if value is True else value


class EdgeDPConfig(_Section):
    """Differential privacy per device (fedxr.crossdevice.privacy): every update clipped and noised on the device."""

    epsilon: float = Field(8.0, gt=0, description="what one device may spend over the whole run")
    delta: float = Field(1e-5, gt=0, lt=1)
    clip: float = Field(1.0, gt=0, description="L2 norm a device's update of the parameters is clipped to (as one "
                        "vector; BatchNorm statistics are not sent under DP)")
    max_updates: int = Field(4, ge=1, description="updates one device may send in the run; the noise is chosen so "
                             "that this many spend epsilon, and a device that has sent them drops later tasks")


class EdgeFederationConfig(_Section):
    """``fedxr edge-federate``: the student fine-tuned across simulated point-of-care devices (NVFlare FedBuff)."""

    enabled: bool = Field(False, description="run it as the `edge` stage of `fedxr run` (after explain, before the "
                          "report); `fedxr edge-federate` runs it whatever this says")
    site: str = Field("site-1", description="the site whose training films are dealt out to the devices; its "
                      "validation split scores every model version, its test split the start and the end")
    manifest: Optional[str] = Field(None, description="a site manifest (a CSV `fedxr data split` wrote) dealt out "
                                    "instead of one of the run's own sites: e.g. a hospital the student never saw")
    init_from: Optional[str] = Field(None, description="the student checkpoint to start from; default: the run's "
                                     "first student distilled with the teacher")
    devices: int = Field(100, ge=1, description="simulated devices")
    images_per_device: tuple[int, int] = Field((5, 50), description="each device holds a number of films drawn "
                                               "uniformly from this range")
    skew: Optional[float] = Field(None, gt=0, description="devices differ in case mix: each device's share of "
                                  "abnormal films is drawn from Beta(skew, skew) (small = very skewed); none = alike")
    dropout: float = Field(0.3, ge=0, lt=1, description="share of tasks a device drops (goes away mid-task)")
    stragglers: float = Field(0.1, ge=0, le=1, description="share of tasks a device answers late")
    straggler_delay_s: float = Field(2.0, ge=0, description="how late a straggler answers")
    selection: int = Field(20, ge=1, description="devices given a task at once (the server's selection)")
    updates_per_version: int = Field(10, ge=1, description="device updates (dropped ones included) that make a "
                                     "new model version")
    versions: int = Field(10, ge=2, description="model versions to make; version 1 is the starting student")
    max_staleness: Optional[int] = Field(5, ge=1, description="an update trained on a version this many versions "
                                         "older than the current one is ignored; none = never")
    staleness_weight: bool = Field(False, description="weight stale updates by 1/(1+sqrt(age)) (NVFlare FedBuff)")
    global_lr: float = Field(1.0, gt=0, description="server learning rate: the new version is the old one plus "
                             "this times the mean device update")
    lr: float = Field(0.01, gt=0, description="devices' SGD learning rate")
    momentum: float = Field(0.0, ge=0, lt=1)
    local_epochs: int = Field(1, ge=1, description="passes over its own films a device makes per task")
    batch_size: int = Field(16, ge=2)
    workers: int = Field(2, ge=1, description="devices training at once in the simulator (threads)")
    timeout_s: float = Field(600.0, gt=0, description="how long the server waits for devices, and a client for "
                             "its parent, before the job stops")
    seed: int = Field(0, description="which films each device holds and when it drops out or straggles")
    runtime: Literal["torch", "executorch"] = Field("torch", description="how a device trains: plain PyTorch, or "
                                                   "the student's ExecuTorch training program, as a phone or board "
                                                   "runs it (a GroupNorm student without max-pooling; README)")
    dp: Union[EdgeDPConfig, Literal[False]] = Field(False, description="differential privacy per device: "
                                                    "clipping and Gaussian noise of each update on the device")

    @field_validator("dp", mode="before")
    @classmethod
    def _dp_true_means_defaults(cls, value):
        return {} if value is True else value

    @model_validator(mode="after")
    def _check(self) -> "EdgeFederationConfig":
        if self.dp:
            # Devices past their budget answer with empty updates and the server makes no version from those: the
            # devices together must be able to send every update the versions can take (each version folds in at
            # most the updates that arrive while it is due: updates_per_version plus a selection's worth).
            most = (self.versions - 1) * (self.updates_per_version + self.selection)
            if self.devices * self.dp.max_updates < most:
                raise ValueError(f"dp.max_updates: {self.devices} devices x {self.dp.max_updates} updates each cannot "
                                 f"fill {self.versions} versions (up to {most} updates); raise devices or "
                                 "dp.max_updates, or make fewer versions")
        low, high = self.images_per_device
        if not 1 <= low <= high:
            raise ValueError(f"images_per_device: {[low, high]} is not a range of film counts; use e.g. [5, 50]")
        if self.updates_per_version > self.selection:
            raise ValueError(f"updates_per_version ({self.updates_per_version}) is more than the devices at work at "
                             f"once (selection: {self.selection}); no version would ever be made")
        return self


class OutputConfig(_Section):
    runs_dir: str = "runs"
    name: str = Field("quickstart", pattern=r"^[A-Za-z0-9_.-]+$")
    energy: Union[EnergyConfig, Literal[False]] = Field(
        default_factory=EnergyConfig, description="energy and CO2e of every training job (CodeCarbon, offline); "
                                                  "false turns it off")

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, value: str) -> str:
        if value in (".", ".."):
            raise ValueError("output.name names the run's folder; use letters, digits, '_', '-' or '.', not . or ..")
        return value

    @field_validator("energy", mode="before")
    @classmethod
    def _energy_true_means_defaults(cls, value):
        return {} if value is True else value


class Recipe(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    federated: FederatedConfig = Field(default_factory=FederatedConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    explain: ExplainConfig = Field(default_factory=ExplainConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    edge_federation: EdgeFederationConfig = Field(default_factory=EdgeFederationConfig)

    @model_validator(mode="after")
    def _check_across_sections(self) -> "Recipe":
        problems = []
        if self.federated.min_clients > self.data.sites:
            problems.append(
                f"federated.min_clients: {self.federated.min_clients} is more than data.sites "
                f"({self.data.sites}); set it to at most {self.data.sites}"
            )
        if self.data.scheme == "column" and not self.data.column:
            problems.append("data.column: scheme 'column' needs a column name, e.g. column: hospital")
        if self.data.source in ("chexpert", "padchest", "vindr", "mimic") and not self.data.labels_file:
            problems.append(f"data.labels_file: data.source {self.data.source!r} needs the data set's label file "
                            "(relative to data.root), e.g. labels_file: train.csv")
        if self.data.source == "mimic" and not self.data.metadata_file:
            problems.append("data.metadata_file: data.source 'mimic' needs mimic-cxr-2.0.0-metadata.csv as well")
        m = self.model
        if isinstance(m.devices, int) and m.devices < 1:
            problems.append(f"model.devices: {m.devices} is not a number of devices; use 1 or more, or auto")
        # torchrun starts the processes: DDP strategies that spawn their own cannot work under it.
        if isinstance(m.devices, int) and m.devices > 1 and m.strategy not in ("auto", "ddp") \
                and not m.strategy.startswith("ddp_find_unused_parameters"):
            problems.append(f"model.strategy: several devices per site train with DDP under torchrun; use ddp (or auto, "
                            f"or ddp_find_unused_parameters_true), not {m.strategy!r}")
        if self.federated.fedbn and self.federated.cross_site_eval:
            problems.append("federated.cross_site_eval: with federated.fedbn the server's models hold no trained "
                            "BatchNorm (each site kept its own), so scoring them at every site says nothing; set "
                            "federated.cross_site_eval: false — each site's own model is scored at its site instead")
        if self.federated.local_steps and self.federated.max_local_steps:
            problems.append("federated.max_local_steps: it caps whole local epochs; with federated.local_steps every "
                            "site already trains the same number of steps — set one of the two")
        if self.edge_federation.enabled and not self.distill.students and not self.edge_federation.init_from:
            problems.append("edge_federation.enabled: the devices start from the run's first distilled student and "
                            "distill.students is empty; add a student or set edge_federation.init_from to a checkpoint")
        from fedxr.privacy.rules import recipe_problems

        problems += recipe_problems(self)
        if self.data.val_fraction + self.data.test_fraction >= 1:
            problems.append("data.val_fraction + data.test_fraction must be below 1")
        from fedxr.models.registry import UnknownModelError, get_spec

        for key, name in [("model.name", self.model.name)] + [(f"distill.students[{i}]", n) for i, n in enumerate(self.distill.students)]:
            try:
                get_spec(name)
            except UnknownModelError as exc:
                problems.append(f"{key}: {exc}")
        if problems:
            raise ValueError(_PROBLEM_SEP.join(problems))
        return self

    @property
    def norm(self) -> str:
        """The model's normalisation layers: ``model.norm``, where auto means GroupNorm when it trains with
        differential privacy and BatchNorm otherwise."""
        from fedxr.privacy.dp import DP_NORM

        if self.model.norm != "auto":
            return self.model.norm
        return DP_NORM if self.privacy.dp else "batch"

    @property
    def layout(self) -> RunLayout:
        """The paths of this recipe's run (``output.runs_dir / output.name``) and of its exports."""
        return RunLayout.of(self)

    @property
    def energy_country(self) -> str | None:
        """The grid whose carbon intensity applies to this run's energy; None when tracking is off."""
        return self.output.energy.country if self.output.energy else None

    @property
    def preprocessing(self) -> "Preprocessing":
        """The model's input, resolved once: ``data.image_size`` pixels with the registry normalisation of
        ``model.name``. It is stored with the model from here on and read back by every later stage."""
        from fedxr.models.registry import get_spec

        return get_spec(self.model.name).preprocessing(self.data.image_size)

    def changed(self, label: str, **sections: dict[str, Any]) -> "Recipe":
        """A validated copy with some values replaced: ``recipe.changed("seed 1", model={"seed": 1})``.
        ``label`` names the copy in error messages."""
        return recipe_from_dict(_deep_merge(self.resolved(), sections), f"{self.output.name} ({label})")

    def resolved(self) -> dict[str, Any]:
        """The full config with every default filled in, as plain data (saved with every artifact)."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.resolved(), sort_keys=False)


def _known_keys(model: type[BaseModel], path: tuple) -> list[str]:
    import typing

    for part in path:
        field = model.model_fields.get(str(part))
        # A section or `false` (privacy.dp: Union[DPConfig, Literal[False]]): its keys are the section's.
        kinds = [field.annotation, *typing.get_args(field.annotation)] if field is not None else []
        sections = [k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)]
        if not sections:
            return []
        model = sections[0]
    return list(model.model_fields)


def _format_errors(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = tuple(e["loc"])
        # A section that may also be `false` (privacy.dp): pydantic tries both; a mapping given for it is meant
        # as the section, so the "should be False" alternative says nothing, and the class name is not a key.
        if isinstance(e.get("input"), dict) and any(str(p).startswith("literal[") for p in loc):
            continue
        loc = tuple(p for p in loc if not (isinstance(p, str) and p.endswith("Config") and p[:1].isupper()))
        key = ".".join(str(p) for p in loc) or "<recipe>"
        if e["type"] == "extra_forbidden":
            known = _known_keys(Recipe, loc[:-1])
            hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
            fix = f"did you mean {'.'.join(map(str, loc[:-1] + (hint[0],)))!r}? " if hint else ""
            problems.append(f"{key}: unknown key; {fix}known keys here: {', '.join(known)}")
        elif e["type"] == "value_error":
            # Cross-section checks arrive as one message holding several problems.
            msg = e["msg"].removeprefix("Value error, ")
            problems.extend(msg.split(_PROBLEM_SEP))
        else:
            problems.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return problems


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["federated.rounds=3", "model.name=tiny_cnn"]`` → a nested dict; values parsed as YAML."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError("overrides", [f"{item!r}: an override must look like section.key=value"])
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError("overrides", [f"{key}: {part} is not a section"])
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return nested


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _without(data: dict[str, Any], locations: list[tuple]) -> dict[str, Any]:
    """``data`` with the keys at ``locations`` removed (their defaults apply); a list item removes its list."""
    import copy

    data = copy.deepcopy(data)
    for loc in locations:
        keys = [k for k in loc if isinstance(k, str)]
        node: object = data  # a dict, or whatever the recipe holds at that key
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and keys:
            node.pop(keys[-1], None)
    return data


def recipe_from_dict(data: dict[str, Any], source: str = "<dict>") -> Recipe:
    """Validate a recipe. Every problem is reported at once: when fields fail, the cross-section and
    registry checks still run, on the recipe with those fields at their defaults."""
    data = _drop_deprecated(data, source)
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        problems = _format_errors(err)
        failed = [tuple(e["loc"]) for e in err.errors() if e["loc"]]
        if failed:
            try:
                Recipe.model_validate(_without(data, failed))
            except ValidationError as again:
                problems += [p for p in _format_errors(again) if p not in problems]
        raise RecipeError(source, problems) from None


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Load a YAML recipe (or the defaults when ``path`` is None) and apply ``key=value`` overrides."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise RecipeError(source, ["file not found; recipes live under recipes/ (e.g. recipes/quickstart.yaml)"])
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise RecipeError(source, [f"not valid YAML: {exc}"]) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise RecipeError(source, ["the top level must be a mapping of sections (data:, model:, ...)"])
        data = loaded
    if overrides:
        data = _deep_merge(data, parse_overrides(overrides))
    return recipe_from_dict(data, source)
