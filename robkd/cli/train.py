"""``robkd train``: train a model (teacher or distilled student) from scratch."""

from __future__ import annotations

import argparse
from typing import Any

TEACHER_METHODS = ("st", "at", "trades")
STUDENT_METHODS = ("kd", "ard", "fast-ard", "kdiga", "kdiga-ardc", "kdiga-arda")

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
    """Every training hyperparameter (shared by ``train`` and ``repair``); defaults = the papers'."""
    g = p.add_argument_group("schedule")
    g.add_argument("--epochs", type=int, default=10, help="training epochs (Fast-ARD runs ceil(epochs/m) passes, rounded up) (default: 10)")
    g.add_argument("--batch-size", type=int, default=128, help="batch size (default: 128)")
    g.add_argument("--lr", type=float, default=0.1, help="initial SGD learning rate (default: 0.1)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    g.add_argument("--weight-decay", type=float, default=2e-4, help="weight decay (default: 2e-4, KDIGA/ARD papers on CIFAR-10)")
    g.add_argument("--schedule", choices=("multistep", "cosine", "constant"), default="multistep",
                   help="LR schedule, torch.optim.lr_scheduler, stepped per epoch (default: multistep)")
    g.add_argument("--milestones", default="0.5,0.75",
                   help="MultiStepLR milestones as fractions of the run (default: 0.5,0.75 = epochs 100,150 of 200)")
    g.add_argument("--lr-gamma", type=float, default=0.1, help="LR factor at each milestone (default: 0.1)")
    g.add_argument("--augment", choices=("auto", "none", "crop", "crop-flip", "flip"), default="auto",
                   help="augmentation (default: auto = crop+flip for CIFAR, none for Fashion-MNIST/MNIST)")
    g.add_argument("--train-n", type=int, help="train on a seeded subset of this many samples")
    o = p.add_argument_group("objective")
    o.add_argument("--lambda-ce", type=float, default=0.5, help="CE weight for kd/kdiga* (default: 0.5, KDIGA paper)")
    o.add_argument("--lambda-kl", type=float, default=0.5, help="KL weight for kd/kdiga* (default: 0.5, KDIGA paper)")
    o.add_argument("--lambda-iga", type=float, help="IGA weight (default: 1 for --iga-form per-sample, 1000 = gamma for reference)")
    o.add_argument("--iga-form", choices=("per-sample", "reference"), default="per-sample",
                   help="IGA convention (default: per-sample, mean_i ||g_s,i - g_t,i||_2; see below)")
    o.add_argument("--temperature", type=float, help="distillation temperature tau (default for ard/fast-ard: 5 on CIFAR-100, else 30 (ARD paper, CIFAR-10); 1 otherwise)")
    o.add_argument("--alpha", type=float, default=1.0, help="ARD weight of the KL term (default: 1, ARD paper)")
    o.add_argument("--beta", type=float, default=6.0, help="TRADES beta (default: 6)")
    o.add_argument("--replays", "-m", type=int, default=4, help="Fast-ARD minibatch replays m (default: 4)")
    a = p.add_argument_group("training attack")
    a.add_argument("--norm", default="Linf", help="threat model norm, Linf or L2 (default: Linf)")
    a.add_argument("--eps", help="training radius (default: the dataset's: 0.1 fashion-mnist, 8/255 cifar, 0.3 mnist)")
    a.add_argument("--step-size", help="attack step (default: eps/4; Fast-ARD: eps)")
    a.add_argument("--steps", type=int, default=10, help="attack steps (default: 10)")
    a.add_argument("--attack-train-mode", action="store_true",
                   help="run the training attack with the student in train mode (ARD reference behaviour; updates BatchNorm statistics). Default: eval mode")
    v = p.add_argument_group("validation and selection")
    v.add_argument("--val-fraction", type=float, default=0.1, help="validation split carved from the training data (default: 0.1)")
    v.add_argument("--val-n", type=int, default=1000, help="validation samples evaluated per epoch (default: 1000; 0 = none)")
    v.add_argument("--val-steps", type=int, default=10, help="PGD steps of the validation attack at the training radius (default: 10)")
    v.add_argument("--select", choices=("val-robust", "last"), default="val-robust",
                   help="keep the epoch of best validation robust accuracy, or the last (default: val-robust)")
    r = p.add_argument_group("checkpointing")
    r.add_argument("--state", help="training-state file (default: OUT.state.pt)")
    r.add_argument("--log", "--log-file", dest="log",
                   help="per-epoch JSON-lines log (default: OUT.log.jsonl); under torchrun write --log-file (torchrun takes --log for its own --log-dir)")
    r.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps (default: only per epoch)")
    r.add_argument("--resume", action="store_true", help="continue from the training-state file if it exists (refuses other options, another teacher or another dataset)")
    c = r.add_mutually_exclusive_group()
    c.add_argument("--cache-teacher", dest="cache_teacher", action="store_true", default=None,
                   help="cache the teacher's logits/input gradients on the clean training set (default: on when inputs are not "
                        "augmented; never for kdiga-arda, whose teacher sees x_adv; the provenance records whether it was used)")
    c.add_argument("--no-cache-teacher", dest="cache_teacher", action="store_false")
    from robkd.cli.common import add_device_arg

    add_device_arg(p, what="trains (student, teacher, attacks, teacher cache and validation; data order, augmentation "
                           "and attack random starts are drawn on the CPU, so a seed gives the same batches on any device)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order, attacks and split (default: 0)")
    p.add_argument("--data", default="fashion-mnist", help="training dataset (default: fashion-mnist)")
    p.add_argument("--data-dir", help="directory holding the dataset files")


def hparams_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`robkd.distill.TrainConfig` fields from parsed flags."""
    from robkd.cli.common import parse_floats
    from robkd.types import parse_radius

    return dict(
        batch_size=args.batch_size, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
        schedule=args.schedule, milestones=parse_floats(args.milestones, "--milestones"), lr_gamma=args.lr_gamma,
        augment=args.augment, train_n=args.train_n, lambda_ce=args.lambda_ce, lambda_kl=args.lambda_kl,
        lambda_iga=args.lambda_iga, iga_form=args.iga_form, temperature=args.temperature, alpha=args.alpha,
        beta=args.beta, replays=args.replays, norm=args.norm,
        eps=parse_radius(args.eps) if args.eps is not None else None,
        step_size=parse_radius(args.step_size) if args.step_size is not None else None,
        steps=args.steps, attack_train_mode=args.attack_train_mode, val_fraction=args.val_fraction,
        val_n=args.val_n, val_steps=args.val_steps, select=args.select, checkpoint_every=args.checkpoint_every,
        cache_teacher=args.cache_teacher, seed=args.seed, device=args.device,
    )


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
