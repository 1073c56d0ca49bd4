"""``robkd train``: train a model (teacher or distilled student) from scratch."""

from __future__ import annotations

import argparse
from typing import Any

from robkd.distill.config import AUGMENTS, IGA_FORMS, SCHEDULES, SELECTS, STUDENT_METHODS, TEACHER_METHODS, TrainConfig

#: the defaults of every option: TrainConfig's (torch is not imported for --help)
DEFAULTS = TrainConfig()

OBJECTIVES_HELP = """objectives (S student, T teacher, tau temperature; KL batchmean, CE batch mean):
  st          CE(S(x), y)
  at          CE(S(x_adv), y), x_adv = PGD on CE (uniform start)          [Madry]
  trades      CE(S(x), y) + beta*KL(S(x) || S(x_adv)), inner max from x+0.001*N(0,1)
  kd          l_ce*CE(S(x), y) + l_kl*tau^2*KL(T(x)/tau || S(x)/tau)    [Hinton]
  ard         alpha*tau^2*KL(T(x)/tau || S(x_adv)/tau) + (1-alpha)*CE(S(x), y)
  fast-ard    ARD with free adversarial training: each batch replayed m times, the
              perturbation kept across replays and batches and stepped by eps*sign of the
              input gradient of the training loss (same backward pass); ceil(epochs/m) passes
              over the data (rounded up: never less than the epochs asked for)
  kdiga       KD + l_iga*IGA(x)
  kdiga-ardc  l_ce*CE(S(x)) + l_kl*tau^2*KL(T(x)/tau || S(x_adv)/tau) + l_iga*IGA(x)
  kdiga-arda  l_ce*CE(S(x)) + l_kl*tau^2*KL(T(x_adv)/tau || S(x_adv)/tau) + l_iga*IGA(x_adv)
  rslad       alpha*KL(T(x) || S(x_adv)) + (1-alpha)*KL(T(x) || S(x)), alpha 5/6; x_adv maximises
              KL(T(x) || S(x+d)) from x+0.001*N(0,1)                     [Zi et al. 2021]
  iad         ARD + alpha*mean_i (1-w_i)*KL(S(x_i) || S(x_adv,i)), w_i = p_T(y_i|x_adv,i)^iad_beta,
              switched on after --iad-warmup of the run; tau 1       [IAD-I, Zhu et al. 2022]
  adaad       alpha*KL(T(x_adv) || S(x_adv)) + (1-alpha)*KL(T(x) || S(x)), alpha 1; x_adv maximises
              KL(T(x+d) || S(x+d)), the teacher queried at every step   [Huang et al. 2023]
  --igdm      (ard, rslad, adaad) + lambda_igdm*(step/steps)*KL(softmax(T(x+d)-T(x-d)) ||
              softmax(S(x+d)-S(x-d))), d = x_adv - x                   [IGDM, ICLR 2024]
  KL(P || Q): target P first, batchmean (sum over classes, mean over the batch), never / classes.

IGA convention: --iga-form per-sample (default): IGA = mean_i ||g_s,i - g_t,i||_2 of
per-sample input gradients of CE (independent of the batch size), default
--lambda-iga 1. --iga-form reference: the KDIGA reference code's effective term
(gamma/B^2)*sqrt(sum_i ||g_s,i - g_t,i||^2) (batch-mean gradients, one norm over the
batch, coefficient gamma/B); --lambda-iga is then gamma, default 1000 (the paper's
10^3/B). For equal per-sample differences d the reference term is gamma*d/B^1.5.

Per-dataset defaults (Linf): fashion-mnist eps 0.1, cifar10/100 eps 8/255, mnist 0.3;
step eps/4 and 10 steps (Fast-ARD: step eps). Augmentation 'auto': random crop (pad 4)
+ horizontal flip for CIFAR, none for Fashion-MNIST/MNIST ('crop' pads 2 px on 28x28).

Divergence: a NaN/inf loss or weight stops training with exit 2 and one line saying where; no model
is saved, the last good training state is kept (--state), nothing non-finite is written: lower --lr.
"""


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Every training hyperparameter (shared by ``train`` and ``repair``); defaults = the papers' (:class:`TrainConfig`)."""
    d = DEFAULTS
    g = p.add_argument_group("schedule")
    g.add_argument("--epochs", type=int, default=d.epochs,
                   help=f"training epochs (Fast-ARD runs ceil(epochs/m) passes, rounded up) (default: {d.epochs})")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help=f"batch size (default: {d.batch_size})")
    g.add_argument("--lr", type=float, default=d.lr, help=f"initial SGD learning rate (default: {d.lr:g})")
    g.add_argument("--momentum", type=float, default=d.momentum, help=f"SGD momentum (default: {d.momentum:g})")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help=f"weight decay (default: {d.weight_decay:g}, KDIGA/ARD papers on CIFAR-10)")
    g.add_argument("--schedule", choices=SCHEDULES, default=d.schedule,
                   help=f"LR schedule, torch.optim.lr_scheduler, stepped per epoch (default: {d.schedule})")
    milestones = ",".join(f"{m:g}" for m in d.milestones)
    g.add_argument("--milestones", default=milestones,
                   help=f"MultiStepLR milestones as fractions of the run (default: {milestones} = epochs 100,150 of 200)")
    g.add_argument("--lr-gamma", type=float, default=d.lr_gamma, help=f"LR factor at each milestone (default: {d.lr_gamma:g})")
    g.add_argument("--augment", choices=AUGMENTS, default=d.augment,
                   help=f"augmentation (default: {d.augment} = crop+flip for CIFAR, none for Fashion-MNIST/MNIST)")
    g.add_argument("--train-n", type=int, help="train on a seeded subset of this many samples")
    o = p.add_argument_group("objective")
    o.add_argument("--lambda-ce", type=float, default=d.lambda_ce, help=f"CE weight for kd/kdiga* (default: {d.lambda_ce:g}, KDIGA paper)")
    o.add_argument("--lambda-kl", type=float, default=d.lambda_kl, help=f"KL weight for kd/kdiga* (default: {d.lambda_kl:g}, KDIGA paper)")
    o.add_argument("--lambda-iga", type=float, help="IGA weight (default: 1 for --iga-form per-sample, 1000 = gamma for reference)")
    o.add_argument("--iga-form", choices=IGA_FORMS, default=d.iga_form,
                   help=f"IGA convention (default: {d.iga_form}, mean_i ||g_s,i - g_t,i||_2; see below)")
    o.add_argument("--temperature", type=float, help="distillation temperature tau (default for ard/fast-ard: 5 on CIFAR-100, else 30 (ARD paper, CIFAR-10); 1 otherwise)")
    o.add_argument("--alpha", type=float, default=d.alpha,
                   help="weight of the adversarial term of ard/fast-ard/iad/rslad/adaad (default: 5/6 for rslad, RSLAD paper; "
                        "1 otherwise: ARD, IAD, AdaAD papers)")
    o.add_argument("--iad-beta", type=float, default=d.iad_beta,
                   help=f"IAD: exponent of the teacher's confidence p_T(y|x_adv)^beta (default: {d.iad_beta:g}, IAD paper)")
    o.add_argument("--iad-warmup", type=float, default=d.iad_warmup,
                   help=f"IAD: fraction of the run before the introspection starts (default: {d.iad_warmup:g} = epoch 60 of 200)")
    o.add_argument("--igdm", action="store_true", help="add the IGDM term to ard, rslad or adaad")
    o.add_argument("--lambda-igdm", type=float, default=d.lambda_igdm,
                   help=f"IGDM weight, ramped linearly over the run's optimizer steps (default: {d.lambda_igdm:g}, IGDM paper)")
    o.add_argument("--beta", type=float, default=d.beta, help=f"TRADES beta (default: {d.beta:g})")
    o.add_argument("--replays", "-m", type=int, default=d.replays, help=f"Fast-ARD minibatch replays m (default: {d.replays})")
    a = p.add_argument_group("training attack")
    a.add_argument("--norm", default=d.norm, help=f"threat model norm, Linf or L2 (default: {d.norm})")
    a.add_argument("--eps", help="training radius (default: the dataset's: 0.1 fashion-mnist, 8/255 cifar, 0.3 mnist)")
    a.add_argument("--step-size", help="attack step (default: eps/4; Fast-ARD: eps)")
    a.add_argument("--steps", type=int, default=d.steps, help=f"attack steps (default: {d.steps})")
    a.add_argument("--eps-warmup", type=float, default=d.eps_warmup,
                   help="fraction of the run over which the training radius and step grow linearly from eps/K to eps "
                        "(K = that many optimizer steps; validation keeps eps). PGD-AT from scratch that stays at "
                        "chance level (a constant predictor) usually trains with 0.1-0.3. Default: 0, no warm-up")
    a.add_argument("--attack-train-mode", action="store_true",
                   help="run the training attack with the student in train mode (ARD reference behaviour; updates BatchNorm statistics). Default: eval mode")
    v = p.add_argument_group("validation and selection")
    v.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help=f"validation split carved from the training data (default: {d.val_fraction:g})")
    v.add_argument("--val-n", type=int, default=d.val_n, help=f"validation samples evaluated per epoch (default: {d.val_n}; 0 = none)")
    v.add_argument("--val-steps", type=int, default=d.val_steps,
                   help=f"PGD steps of the validation attack at the training radius (default: {d.val_steps})")
    v.add_argument("--select", choices=SELECTS, default=d.select,
                   help=f"keep the epoch of best validation robust accuracy, or the last (default: {d.select})")
    r = p.add_argument_group("checkpointing")
    r.add_argument("--state", help="training-state file (default: OUT.state.pt)")
    r.add_argument("--log", "--log-file", dest="log",
                   help="per-epoch JSON-lines log (default: OUT.log.jsonl); under torchrun write --log-file (torchrun takes --log for its own --log-dir)")
    r.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="also checkpoint every N steps (default: only per epoch)")
    r.add_argument("--resume", action="store_true", help="continue from the training-state file if it exists (refuses other options, another teacher or another dataset)")
    c = r.add_mutually_exclusive_group()
    c.add_argument("--cache-teacher", dest="cache_teacher", action="store_true", default=None,
                   help="cache the teacher's logits/input gradients on the clean training set (default: on when inputs are not "
                        "augmented; never for kdiga-arda, whose teacher sees x_adv; the provenance records whether it was used)")
    c.add_argument("--no-cache-teacher", dest="cache_teacher", action="store_false")
    from robkd.cli.common import add_device_arg

    add_device_arg(p, what="trains (student, teacher, attacks, teacher cache and validation; data order, augmentation "
                           "and attack random starts are drawn on the CPU, so a seed gives the same batches on any device)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of initialisation, data order, attacks and split (default: {d.seed})")
    p.add_argument("--data", default="fashion-mnist", help="training dataset (default: fashion-mnist)")
    p.add_argument("--data-dir", help="directory holding the dataset files")


def hparams_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`robkd.distill.TrainConfig` fields from parsed flags (one flag per field; ``method`` and
    ``epochs`` are arguments of :func:`robkd.distill.train` / :func:`robkd.distill.repair` themselves)."""
    import dataclasses

    from robkd.types import parse_radius
    from robkd.utils.validate import parse_floats

    hp = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name not in ("method", "epochs")}
    hp["milestones"] = None if args.milestones is None else tuple(parse_floats(args.milestones, "--milestones"))
    for name in ("eps", "step_size"):
        hp[name] = parse_radius(hp[name]) if hp[name] is not None else None
    return hp


def parse_arch_kwargs(text: str | None) -> dict[str, Any]:
    """``'{"width": 2}'`` -> dict; raises UsageError."""
    if not text:
        return {}
    import json

    from robkd.errors import UsageError

    try:
        d = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"bad --arch-kwargs {text!r}: expected a JSON object, e.g. '{{\"width\": 2}}'") from exc
    if not isinstance(d, dict):
        raise UsageError(f"bad --arch-kwargs {text!r}: expected a JSON object")
    return d


def register(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "train", help="train a teacher (st, at, trades) or a distilled student from scratch",
        description="Train a model from scratch and save a self-describing robkd checkpoint.",
        epilog=OBJECTIVES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--method", required=True, choices=TEACHER_METHODS + STUDENT_METHODS, help="training objective (see below)")
    p.add_argument("--arch", required=True, help="architecture: robkd:<name>, timm:<name> or module.path:Factory")
    p.add_argument("--arch-kwargs", help="JSON keyword arguments of the architecture, e.g. '{\"width\": 2}'")
    p.add_argument("--teacher", help="teacher model file (distillation methods)")
    p.add_argument("--out", required=True, help="output checkpoint path")
    add_train_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging

    from robkd.distill import train

    res = train(
        args.method, args.arch, args.data, args.epochs, args.out, teacher=args.teacher,
        arch_kwargs=parse_arch_kwargs(args.arch_kwargs), data_dir=args.data_dir, state_path=args.state,
        log_path=args.log, resume=args.resume, **hparams_from_args(args),
    )
    sel = res.log.selected_epoch
    chosen = res.log.records[sel - 1] if sel and 0 < sel <= len(res.log.records) else {}
    logging.getLogger("robkd").info(
        "saved %s (selected epoch %s, val clean %s, val robust %s)", res.checkpoint, sel,
        chosen.get("val_clean"), chosen.get("val_robust"),
    )
    return 0
