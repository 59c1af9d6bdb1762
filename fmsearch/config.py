"""TrainConfig: one training configuration, each parameter declared once on its field.

It imports no torch, so that `fmsearch --help` and a refused flag answer without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fmsearch.errors import ConfigError
from fmsearch.params import check, flag, param, parameters

ARCHITECTURE_NAMES = ("adaptive", "plain")  # models.ARCHITECTURES builds each
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("none", "step", "cosine")
UNLABELED = ("skip", "pseudo", "distill", "vat")
VIEWS = ("weak", "strong")  # semi.weak_augment, semi.strong_augment
DISTILL_ON = ("unlabeled", "labeled")  # the images distill's soft-target batches draw from
# How distill's teachers (and a warm start's control) train: the fixed labels-only control recipe, or
# the student's own optimizer, lr, dropout, weight decay, schedule and augmentation (teachers.recipe)
TEACHER_RECIPES = ("control", "student")
MONITORS = ("val_loss", "val_accuracy")
# The meaning of training: raise it with any change to the code that makes the same TrainConfig learn
# something else (an objective's arithmetic, the teacher recipe, augmentation, the split). A study's
# fingerprint records it, so trials of two versions never mix; the teachers' cache key includes it.
#   1 (2026-12-03): the first recorded; studies made before it cannot prove which they ran.
TRAINING_VERSION = 1
# How a run executes, never what it learns: chosen per machine by speed.choose unless set.
SETTINGS = ("amp", "channels_last", "compile", "eval_batch_size", "threads")
SWITCHES = ("amp", "channels_last", "compile")  # the on/off SETTINGS; `make bench` forces each alone
NO_PATIENCE = "--no-patience"  # `fmsearch train`'s flag for patience None: never stop early
# What a reproducing command always states, default or not: how long a run lasts and what stops it.
ALWAYS_STATED = ("epochs", "batch_size", "patience", "monitor")


@dataclass(frozen=True)
class TrainConfig:
    """One training configuration. Each field declares its parameter once (params.param): its type,
    default, valid values and help. Study files, `fmsearch train`'s flags and this check derive from it.
    """

    arch: str = param("plain", "architecture", choices=ARCHITECTURE_NAMES)
    lr: float = param(1e-3, "learning rate", low=0.0, low_open=True)
    dropout: float = param(
        0.25, "dropout probability before the last layer", low=0.0, high=1.0, high_open=True
    )
    epochs: int = param(10, "most epochs; early stopping or pruning may end sooner", low=1, study=False)
    batch_size: int = param(64, "images per batch", low=1, study=False)
    optimizer: str = param("adam", "adam, or sgd with momentum 0.9", choices=OPTIMIZERS)
    schedule: str = param(
        "none", "lr schedule: none, step (lr/10 after epochs 3 and 7), cosine", choices=SCHEDULES
    )
    weight_decay: float = param(0.0, "L2 penalty the optimizer adds to the gradient", low=0.0)
    patience: int | None = param(
        3, "early-stopping patience, epochs without a better monitored value", low=1, study=False
    )
    monitor: str = param("val_loss", "picks the best epoch and drives early stopping", choices=MONITORS)
    seed: int = param(0, "model init, batch order, augmentation, labeled subset", low=0, high=2**32 - 1)
    labeled_fraction: float = param(
        1.0, "share of the training pool that keeps its labels", low=0.0, low_open=True, high=1.0
    )
    labeled_count: int | None = param(None, "labeled images; overrides labeled_fraction", low=1)
    unlabeled: str = param("skip", "what an unlabeled batch does", choices=UNLABELED, semi=True)
    tau: float = param(
        0.95, "pseudo: confidence a pseudo-label needs", low=0.0, high=1.0, objectives=("pseudo",)
    )
    lambda_u: float = param(
        1.0, "weight of the unlabeled loss", low=0.0, objectives=("pseudo", "distill", "vat")
    )
    debias: bool = param(
        True,
        "pseudo: logit-adjust the unlabeled loss by the pseudo-labels' class mix",
        objectives=("pseudo",),
    )
    warmup_epochs: int = param(
        0, "pseudo: labeled-only epochs before unlabeled batches count", low=0, objectives=("pseudo",)
    )
    teachers: int = param(
        5, "distill: labels-only teachers, each on its own seed", low=1, objectives=("distill",), recipe=True
    )
    teacher_epochs: int = param(
        30,
        "distill: most epochs of each teacher; pseudo: of the control it warm-starts from",
        low=1,
        objectives=("distill", "pseudo"),
        recipe=True,
    )
    teacher_recipe: str = param(
        "control",
        "distill: teachers train as the labels-only control (adam 1e-3) or as the student (its optimizer, "
        "lr, dropout, weight decay, schedule, augmentation): then teacher 0 is the labels-only run of "
        "the same configuration",
        choices=TEACHER_RECIPES,
        objectives=("distill", "pseudo"),
        recipe=True,
    )
    warm_start: bool = param(
        False,
        "pseudo: start from the labels-only control (distill's teacher 0, cached), not from scratch",
        objectives=("pseudo",),
        recipe=True,
    )
    temperature: float = param(
        1.0,
        "distill: softmax temperature of the targets",
        low=0.0,
        low_open=True,
        objectives=("distill",),
        recipe=True,
    )
    tta: bool = param(
        True,
        "distill: average each flip-trained teacher over the image and its mirror",
        objectives=("distill",),
        recipe=True,
    )
    align: bool = param(
        True,
        "distill: rescale the targets to the pool's even class mix",
        objectives=("distill",),
        recipe=True,
    )
    student_view: str = param(
        "weak",
        "distill: the student's view of an unlabeled image, weak (shift, flip) or strong (+ warp, contrast)",
        choices=VIEWS,
        objectives=("distill",),
    )
    mixup: float = param(
        0.0,
        "distill: Beta(a, a) mixup of unlabeled images and their soft targets; 0: none",
        low=0.0,
        objectives=("distill",),
    )
    distill_on: str = param(
        "unlabeled",
        "distill: the images its soft targets are learnt on; labeled: the ablation with no unlabeled image",
        choices=DISTILL_ON,
        objectives=("distill",),
    )
    rounds: int = param(
        1,
        "distill: students in a row, each taught by the one before it (Noisy Student); 1: the teachers only",
        low=1,
        objectives=("distill",),
        recipe=True,
    )
    vat_eps: float = param(
        4.0,  # the small texture task's best: 2 lost to skip with entropy minimisation (test_semi)
        "vat: L2 size of the perturbation, [0, 1] pixel units",
        low=0.0,
        low_open=True,
        objectives=("vat",),
    )
    vat_xi: float = param(
        0.1, "vat: finite-difference step of the power iteration", low=0.0, low_open=True, objectives=("vat",)
    )
    entropy_weight: float = param(1.0, "vat: weight of entropy minimisation", low=0.0, objectives=("vat",))
    augment: bool = param(False, "weak shift/flip augmentation of labeled batches")
    nesterov: bool = param(False, "sgd: Nesterov momentum (FixMatch's optimizer)")
    ema: float = param(
        0.0,
        "decay per step of a moving average of the weights, scored each epoch; 0: none",
        low=0.0,
        high=1.0,
        high_open=True,
    )
    keep_ema: bool = param(
        False, "validate, pick and keep the moving average of the weights instead of the live weights"
    )
    # How a run executes, never what it learns: unset (None), each is chosen by timing on this machine
    # (speed.choose); set, it is forced.
    amp: bool | None = param(None, "bf16 autocast in training and evaluation")
    channels_last: bool | None = param(None, "channels_last memory format for the model and its inputs")
    compile: bool | None = param(None, "torch.compile the training model")
    eval_batch_size: int | None = param(None, "images per forward pass when scoring", low=1)
    threads: int | None = param(None, "torch CPU threads", low=1)

    def __post_init__(self) -> None:
        check(self)
        if self.keep_ema and self.ema == 0:
            raise ConfigError("keep_ema keeps the moving average of the weights: set ema too, e.g. 0.999")

    def objective_settings(self) -> dict[str, Any]:
        """The fields that the chosen `unlabeled` objective reads: its constructor's keyword arguments.

        The teacher recipe's fields (`recipe`) shape distill's targets, and teachers.build reads them.
        """
        return {
            p.name: getattr(self, p.name)
            for p in parameters(TrainConfig).values()
            if self.unlabeled in p.objectives and not p.recipe
        }


def train_flags(config: dict[str, Any]) -> list[str]:
    """The `fmsearch train` flags that rebuild `config` (a TrainConfig as a dict, as a trial records it).

    Each field that differs from its default gets its flag, and ALWAYS_STATED fields get theirs
    whatever their value; a field only other unlabeled objectives read (distill's mixup on a skip run)
    and the execution SETTINGS, left to the machine that runs the command, get none.
    Raises ConfigError for a key TrainConfig does not have (a config of another fmsearch version).
    """
    declared = parameters(TrainConfig)
    unknown = sorted(set(config) - set(declared))
    if unknown:
        raise ConfigError(f"{unknown[0]} is not a TrainConfig field of this fmsearch version")
    flags = []
    for name, p in declared.items():
        if name not in config or name in SETTINGS:
            continue
        if p.objectives and config.get("unlabeled", declared["unlabeled"].default) not in p.objectives:
            continue
        value = config[name]
        if value == p.default and name not in ALWAYS_STATED:
            continue
        if name == "patience" and value is None:
            flags.append(NO_PATIENCE)
        elif p.type is bool:
            flags.append(flag(name) if value else "--no-" + flag(name).removeprefix("--"))
        elif value is not None:
            flags += [flag(name), repr(value) if isinstance(value, float) else str(value)]
    return flags
