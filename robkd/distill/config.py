"""Training configuration: every hyperparameter of the papers, with their defaults.

Defaults follow the papers (KDIGA: Shao et al.; ARD: Goldblum et al.), scaled
per dataset for the threat model:

==================  ===========  ==============  =====
dataset             eps (Linf)   step (eps/4)    steps
==================  ===========  ==============  =====
cifar10/cifar100    8/255        2/255           10
fashion-mnist       0.1          0.025           10
mnist               0.3          0.075           10
others              dataset default radius, eps/4, 10
==================  ===========  ==============  =====

The later methods (RSLAD, IAD, AdaAD and the IGDM add-on) use the papers' defaults:
``alpha`` 5/6 for RSLAD and 1 otherwise; IAD ``iad_beta`` 0.1 and ``iad_warmup`` 0.3 of the run (the
code's 60 of 200 epochs); IGDM ``lambda_igdm`` 20 ramped linearly over the run's optimizer steps (``igdm`` switches it on
for ard/rslad/adaad).

Fast-ARD's free step defaults to ``eps`` (free adversarial training); it makes
``ceil(epochs / replays)`` passes over the data.

``cache_teacher`` after :class:`robkd.distill.Trainer` set-up is the *effective*
value (whether the teacher cache is used), not the value asked for.

``device`` (``cpu``, ``cuda``, ``cuda:N``, ``mps``) is where the training computes;
it does not change the data order, augmentation or attack random starts (drawn on
the CPU from the seeded generators) and may change when a run is resumed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from robkd.errors import UsageError
from robkd.utils.validate import check_int, check_number

TEACHER_METHODS = ("st", "at", "trades")
STUDENT_METHODS = ("kd", "ard", "fast-ard", "kdiga", "kdiga-ardc", "kdiga-arda", "rslad", "iad", "adaad")
METHODS = TEACHER_METHODS + STUDENT_METHODS
ADVERSARIAL_METHODS = ("at", "trades", "ard", "fast-ard", "kdiga-ardc", "kdiga-arda", "rslad", "iad", "adaad")
IGA_METHODS = ("kdiga", "kdiga-ardc", "kdiga-arda")
#: the methods IGDM (``igdm=True``) adds its term to
IGDM_METHODS = ("ard", "rslad", "adaad")
#: methods whose KL terms carry no temperature (their papers' losses): ``temperature`` must stay 1
NO_TEMPERATURE_METHODS = ("rslad", "adaad")
#: ``alpha`` (weight of the adversarial term) per method when not given: RSLAD's 5/6, else 1 (ARD, IAD, AdaAD)
ALPHA_DEFAULT = {"rslad": 5.0 / 6.0}
SCHEDULES = ("multistep", "cosine", "constant")
AUGMENTS = ("auto", "none", "crop", "crop-flip", "flip")
SELECTS = ("val-robust", "last")
#: the IGA conventions (see :mod:`robkd.distill.losses`)
IGA_FORMS = ("per-sample", "reference")

#: IGA coefficient defaults per form (see :mod:`robkd.distill.losses`).
IGA_DEFAULT_LAMBDA = {"per-sample": 1.0, "reference": 1000.0}


@dataclasses.dataclass
class TrainConfig:
    """All options of one training run. ``None`` means "the documented default for this method/dataset".

    Objectives (S student, T teacher, tau temperature, batchmean KL, mean CE):

    * ``st``: CE(S(x), y); ``at``: CE(S(x_adv), y) (PGD on CE, uniform start);
    * ``trades``: CE(S(x), y) + beta * KL(S(x) || S(x_adv)) (inner max of the KL from x + 0.001 N(0,1));
    * ``kd``: lambda_ce CE(S(x), y) + lambda_kl tau^2 KL(T(x)/tau || S(x)/tau);
    * ``ard``/``fast-ard``: alpha tau^2 KL(T(x)/tau || S(x_adv)/tau) + (1 - alpha) CE(S(x), y);
    * ``kdiga``: KD + lambda_iga IGA(x);
    * ``kdiga-ardc``: lambda_ce CE(S(x)) + lambda_kl tau^2 KL(T(x)/tau || S(x_adv)/tau) + lambda_iga IGA(x);
    * ``kdiga-arda``: lambda_ce CE(S(x)) + lambda_kl tau^2 KL(T(x_adv)/tau || S(x_adv)/tau) + lambda_iga IGA(x_adv);
    * ``rslad``: alpha KL(T(x) || S(x_adv)) + (1 - alpha) KL(T(x) || S(x)), x_adv maximising KL(T(x) || S(x + d));
    * ``iad``: ARD + alpha mean_i (1 - w_i) KL(S(x_i) || S(x_adv,i)), w_i = p_T(y_i | x_adv,i)^iad_beta, after warm-up;
    * ``adaad``: alpha KL(T(x_adv) || S(x_adv)) + (1 - alpha) KL(T(x) || S(x)), x_adv maximising KL(T(x + d) || S(x + d));
    * ``igdm=True`` (ard/rslad/adaad): + lambda_igdm * (step / steps) * KL(softmax(T(x+d) - T(x-d)) || softmax(S(x+d) - S(x-d))),
      d = x_adv - x.

    ``eps_warmup`` (adversarial methods): over that fraction of the run's optimizer steps the training attack's
    radius and step grow linearly, ``eps * min(1, (k + 1) / K)`` at step ``k`` of ``K = round(eps_warmup * steps)``
    (the usual cure for PGD-AT from scratch that stays at the constant predictor); validation and model selection
    always use the full ``eps``.

    IGA(x) is ``mean_i ||g_s,i - g_t,i||_2`` of per-sample CE input gradients
    (``iga_form="per-sample"``, default, ``lambda_iga=1``) or the reference
    code's ``(1/B^2) sqrt(sum_i ||g_s,i - g_t,i||^2)`` (``iga_form="reference"``,
    ``lambda_iga`` = the reference code's gamma, default 1000).
    """

    method: str = "st"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    schedule: str = "multistep"
    milestones: tuple[float, ...] = (0.5, 0.75)
    lr_gamma: float = 0.1
    seed: int = 0
    lambda_ce: float = 0.5
    lambda_kl: float = 0.5
    lambda_iga: float | None = None
    iga_form: str = "per-sample"
    temperature: float | None = None
    alpha: float | None = None
    beta: float = 6.0
    iad_beta: float = 0.1
    iad_warmup: float = 0.3
    igdm: bool = False
    lambda_igdm: float = 20.0
    norm: str = "Linf"
    eps: float | None = None
    step_size: float | None = None
    steps: int = 10
    eps_warmup: float = 0.0
    replays: int = 4
    augment: str = "auto"
    val_fraction: float = 0.1
    val_n: int = 1000
    val_steps: int = 10
    select: str = "val-robust"
    attack_train_mode: bool = False
    cache_teacher: bool | None = None
    checkpoint_every: int = 0
    train_n: int | None = None
    device: str = "cpu"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        """Build from keyword options; an unknown key is a :class:`UsageError`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UsageError(f"unknown training option(s) {unknown}; known: {sorted(names)}")
        d = dict(d)
        if "milestones" in d and d["milestones"] is not None:
            d["milestones"] = tuple(float(v) for v in d["milestones"])
        return cls(**{k: v for k, v in d.items() if v is not None or k in ("lambda_iga", "temperature", "eps", "step_size", "cache_teacher", "train_n", "alpha")})

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict."""
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @property
    def uses_teacher(self) -> bool:
        return self.method in STUDENT_METHODS

    @property
    def passes(self) -> int:
        """Passes over the data: ``epochs``, or ``ceil(epochs / replays)`` for Fast-ARD.

        Rounded up, so Fast-ARD's budget (passes x replays) is never below the
        ``epochs`` asked for (e.g. 10 epochs with m=4 make 3 passes, 12 replayed epochs).
        """
        if self.method == "fast-ard":
            return max(1, math.ceil(self.epochs / self.replays))
        return self.epochs

    def eps_scale(self, step: int, total_steps: int) -> float:
        """The factor of the training radius at optimizer step ``step`` (0-based) of ``total_steps``:
        ``min(1, (step + 1) / K)`` with ``K = max(1, round(eps_warmup * total_steps))``, 1 without a warm-up."""
        if not self.eps_warmup:
            return 1.0
        k = max(1, int(math.floor(float(self.eps_warmup) * total_steps + 0.5)))
        return min(1.0, (step + 1) / k)

    def resolve(self, default_eps: float | None, dataset: str | None) -> "TrainConfig":
        """Validate and fill the method/dataset defaults; returns a new config."""
        c = dataclasses.replace(self)
        if c.method not in METHODS:
            raise UsageError(f"unknown method {c.method!r}; choose one of {', '.join(METHODS)}")
        check_int(c.epochs, "epochs", 1)
        check_int(c.batch_size, "batch_size", 1)
        check_int(c.steps, "steps", 0)
        check_int(c.replays, "replays", 1)
        check_int(c.val_n, "val_n", 0)
        check_int(c.val_steps, "val_steps", 0)
        check_int(c.checkpoint_every, "checkpoint_every", 0)
        check_int(c.seed, "seed", 0)
        if c.train_n is not None:
            check_int(c.train_n, "train_n", 1)
        for name in ("lr", "momentum", "weight_decay", "lr_gamma", "lambda_ce", "lambda_kl", "beta", "iad_beta", "lambda_igdm"):
            check_number(getattr(c, name), name, 0.0)
        if c.lr <= 0:
            raise UsageError("lr must be > 0")
        if c.alpha is None:
            c.alpha = ALPHA_DEFAULT.get(c.method, 1.0)
        check_number(c.alpha, "alpha", 0.0)
        if c.alpha > 1:
            raise UsageError(f"alpha must be in [0, 1], got {c.alpha}")
        check_number(c.iad_warmup, "iad_warmup", 0.0)
        if c.iad_warmup > 1:
            raise UsageError(f"iad_warmup is a fraction of the run in [0, 1], got {c.iad_warmup}")
        check_number(c.eps_warmup, "eps_warmup", 0.0)
        if c.eps_warmup > 1:
            raise UsageError(f"eps_warmup is a fraction of the run in [0, 1], got {c.eps_warmup}")
        if c.eps_warmup > 0 and c.method not in ADVERSARIAL_METHODS:
            raise UsageError(f"eps_warmup ramps the radius of the training attack; {c.method} trains without one "
                             f"(adversarial methods: {', '.join(ADVERSARIAL_METHODS)})")
        if not isinstance(c.igdm, bool):
            raise UsageError(f"igdm must be true or false, got {c.igdm!r}")
        if c.igdm and c.method not in IGDM_METHODS:
            raise UsageError(f"IGDM (--igdm) is an add-on term for {', '.join(IGDM_METHODS)}, not {c.method}")
        if c.schedule not in SCHEDULES:
            raise UsageError(f"unknown schedule {c.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if any(not (0 < m < 1) for m in c.milestones):
            raise UsageError(f"milestones are fractions of the run in (0, 1), got {list(c.milestones)}")
        if c.augment not in AUGMENTS:
            raise UsageError(f"unknown augmentation {c.augment!r}; choose one of {', '.join(AUGMENTS)}")
        if c.select not in SELECTS:
            raise UsageError(f"unknown --select {c.select!r}; choose one of {', '.join(SELECTS)}")
        if not 0.0 < c.val_fraction < 1.0:
            raise UsageError(f"val_fraction must be in (0, 1), got {c.val_fraction}")
        if c.select == "val-robust" and (c.val_n == 0 or c.val_steps == 0):
            raise UsageError("--select val-robust needs a validation attack: val_n > 0 and val_steps > 0 (or use --select last)")
        from robkd.types import Norm

        c.norm = Norm.parse(c.norm).value
        if c.iga_form not in IGA_FORMS:
            raise UsageError(f"unknown IGA form {c.iga_form!r}; choose one of {', '.join(IGA_FORMS)}")
        if c.lambda_iga is None:
            c.lambda_iga = IGA_DEFAULT_LAMBDA[c.iga_form]
        check_number(c.lambda_iga, "lambda_iga", 0.0)
        if c.temperature is None:
            # the ARD paper: 30 on CIFAR-10 (also robkd's default elsewhere), 5 on CIFAR-100
            ard_tau = 5.0 if dataset and str(dataset).lower().replace("-", "").startswith("cifar100") else 30.0
            c.temperature = ard_tau if c.method in ("ard", "fast-ard") else 1.0
        check_number(c.temperature, "temperature", 0.0)
        if c.temperature <= 0:
            raise UsageError("temperature must be > 0")
        if c.method in NO_TEMPERATURE_METHODS and c.temperature != 1.0:
            raise UsageError(f"{c.method} has no temperature (its paper's KL terms use tau = 1): drop --temperature")
        if c.eps is None:
            needs_eps = c.method in ADVERSARIAL_METHODS or (c.val_n > 0 and c.val_steps > 0)
            if default_eps is None and needs_eps:
                raise UsageError(f"no default radius for dataset {dataset!r}: pass --eps")
            c.eps = float(default_eps) if default_eps is not None else 0.0
        check_number(c.eps, "eps", 0.0)
        if c.step_size is None:
            c.step_size = c.eps if c.method == "fast-ard" else c.eps / 4.0
        check_number(c.step_size, "step_size", 0.0)
        if c.method in ADVERSARIAL_METHODS and c.method != "fast-ard" and c.steps == 0:
            raise UsageError(f"method {c.method} needs steps >= 1 for its training attack")
        c.device = _device_name(c.device)
        return c


def _device_name(device: Any) -> str:
    """``device`` as a lower-case string (a ``torch.device`` is accepted); availability is checked by the trainer."""
    if device is None:
        return "cpu"
    if not isinstance(device, str) and type(device).__name__ == "device":  # a torch.device
        device = str(device)
    if not isinstance(device, str) or not device.strip():
        raise UsageError(f"device must be cpu, cuda, cuda:N or mps, got {device!r}")
    return device.strip().lower()
