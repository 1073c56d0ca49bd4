"""The Trainer: SGD + a real LR schedule, augmentation, validation-based selection,
atomic checkpoints with every RNG state, exact resume, progress bar and epoch log;
checks before training (labels, weights and outputs of both models) and a stop on divergence.

The pieces live beside it: :mod:`~robkd.distill.checks` (checks before training),
:mod:`~robkd.distill.divergence` (checks of every step), :mod:`~robkd.distill.state` (loop state,
checkpoints, resume), :mod:`~robkd.distill.rng`, :mod:`~robkd.distill.augment` and
:mod:`~robkd.distill.evaluate`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

from robkd.data.core import ImageData
from robkd.distill import objectives as O
from robkd.distill.augment import augment_batch, resolve_augment
from robkd.distill.checks import check_input_shape, check_models, finite_or_none
from robkd.distill.config import IGA_METHODS, STUDENT_METHODS, TrainConfig
from robkd.distill.device import resolve_device
from robkd.distill.divergence import DivergenceGuard
from robkd.distill.evaluate import evaluate_robust
from robkd.distill.state import Best, Checkpointer, LoopState, TrainLog, check_resumable, load_train_state, to_cpu
from robkd.errors import DataError, UsageError
from robkd.models.identity import model_sha256
from robkd.utils.io import atomic_write_text, remove_stale_temps

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Run:
    """The objects of one :meth:`Trainer.fit` call besides the models."""

    dctx: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    data_gen: torch.Generator
    attack_gen: torch.Generator
    checkpoint: Checkpointer
    loop: LoopState
    finished: bool = False  # resumed from the state of a finished run
    # set by Trainer._arm: the teacher cache, the objectives' context, the objective (None for fast-ard), the step checks
    cache: O.TeacherCache | None = None
    ctx: O.StepContext | None = None
    objective: O.Objective | None = None
    guard: DivergenceGuard | None = None


class Trainer:
    """Train ``student`` with ``config.method`` on ``train_data``, validating on ``val_data``.

    * SGD (momentum, weight decay) with a ``torch.optim.lr_scheduler`` schedule
      stepped once per pass: ``multistep`` (MultiStepLR at ``milestones``
      fractions of the run, factor ``lr_gamma``), ``cosine`` (CosineAnnealingLR)
      or ``constant``;
    * model selection on the validation robust accuracy (PGD-``val_steps`` at
      the training radius on ``val_n`` validation samples, never the test set),
      or the last epoch;
    * an atomic checkpoint (``state_path``) after every epoch and every
      ``checkpoint_every`` steps, holding model, optimizer, scheduler, every RNG
      state, the epoch's data order and position; :meth:`fit` with
      ``resume=True`` continues from it and, on CPU with the same seed, ends with
      the same weights as an uninterrupted run; it refuses other options, another
      teacher (:func:`robkd.models.identity.model_sha256`) or another dataset name; it also refuses a state
      holding NaN/inf weights, and deletes the temporary files a killed write of
      the state or the log left beside them (on a fresh start too);
    * before training (at construction): labels within the models' classes,
      finite weights of student and teacher, float ``(B, K)`` outputs of both
      on a first training batch with one class count, and finite teacher outputs
      (:class:`robkd.errors.ModelRuntimeError`, :class:`robkd.errors.DataError`...);
    * divergence: a NaN/inf loss (checked before its backward pass) or NaN/inf
      student weights (after every optimizer step) stop training with
      :class:`TrainingDivergedError` (or a ModelRuntimeError when the teacher's
      outputs are the cause); no non-finite state is ever saved, the last good
      training state stays on disk, and the epoch log stays strict JSON;
    * ``config.cache_teacher`` holds the effective value: whether the teacher
      cache is used (never for ``kdiga-arda``, whose teacher sees ``x_adv``);
    * the teacher is frozen: eval mode and ``requires_grad_(False)`` on its
      parameters (the passed module is modified in place);
    * under ``torchrun`` (``WORLD_SIZE`` > 1) the student trains in
      DistributedDataParallel: every rank draws the same global batches and
      augmentation, takes its contiguous part of each batch, and scales its loss
      so that the averaged gradient is the global batch mean's; the teacher is
      replicated (eval mode) on every rank; rank 0 alone writes checkpoints and
      logs; a checkpoint holds global state, so it resumes with any number of
      processes (see docs/distributed.md);
    * ``config.device`` is where student, teacher (both moved there in place),
      batches, training attacks, the teacher cache, validation and the Fast-ARD
      perturbation live (``cuda:LOCAL_RANK`` and nccl under ``torchrun``); the
      data order, augmentation and attack random starts are drawn on the CPU from
      the seeded generators, so the same seed gives the same batches on any
      device; checkpoints hold CPU copies, so a state saved on one device
      resumes on another.
    """

    def __init__(
        self,
        student: torch.nn.Module,
        config: TrainConfig,
        train_data: ImageData,
        val_data: ImageData | None = None,
        teacher: torch.nn.Module | None = None,
        *,
        dataset: str | None = None,
        default_eps: float | None = None,
        state_path: str | Path | None = None,
        log_path: str | Path | None = None,
        show_progress: bool = True,
    ) -> None:
        if not isinstance(config, TrainConfig):
            raise UsageError("config must be a TrainConfig")
        self.config = config.resolve(default_eps, dataset)
        c = self.config
        self.device = resolve_device(c.device)  # an unavailable device fails here, before any training
        if c.uses_teacher and teacher is None:
            raise UsageError(f"method {c.method} distils from a teacher: give one")
        if not c.uses_teacher and teacher is not None:
            raise UsageError(f"method {c.method} trains without a teacher; drop the teacher (distillation methods: {', '.join(STUDENT_METHODS)})")
        if len(train_data) == 0:
            raise DataError("the training set is empty")
        check_input_shape(student, train_data, "student")
        if teacher is not None:
            check_input_shape(teacher, train_data, "teacher")
        check_models(student, teacher, train_data, val_data, c.batch_size)
        self.student = student
        self.teacher = teacher
        self.train_data = train_data
        if val_data is not None and c.val_n > 0 and len(val_data) > 0:
            from robkd.data import eval_subset

            self.val_data = eval_subset(val_data, c.val_n, seed=c.seed)  # a fixed seeded subset of val_n samples
        else:
            self.val_data = None
        if c.select == "val-robust" and self.val_data is None:
            raise UsageError("--select val-robust needs a validation split")
        self.dataset = dataset
        self.augment = resolve_augment(c.augment, dataset)
        self.state_path = Path(state_path) if state_path else None
        self.log_path = Path(log_path) if log_path else None
        self.show_progress = show_progress
        if c.cache_teacher and self.augment != "none":
            raise UsageError("the teacher cache is valid only without augmentation: use --augment none or --no-cache-teacher")
        # teacher values on clean inputs are constant when the inputs are not augmented
        self.use_cache = (teacher is not None and self.augment == "none" and c.cache_teacher is not False
                          and c.method != "kdiga-arda")
        if c.cache_teacher and not self.use_cache:
            why = "kdiga-arda evaluates the teacher at x_adv" if c.method == "kdiga-arda" else "there is no teacher"
            log.warning("--cache-teacher has no effect here (%s): training without the teacher cache", why)
        # the config (and so the log and the provenance) records whether the cache is really used
        self.config = dataclasses.replace(c, cache_teacher=self.use_cache)
        self._identity: dict[str, Any] | None = None

    # ------------------------------------------------------------------ setup
    def _build_optim(self, steps_total: int) -> tuple[torch.optim.Optimizer, Any]:
        """SGD and its schedule, stepped once per pass (``steps_total`` passes)."""
        c = self.config
        opt = torch.optim.SGD(self.student.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        if c.schedule == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps_total)
        elif c.schedule == "multistep":
            # duplicates are kept: on a short run two fractions can land on the same epoch, and
            # MultiStepLR then applies gamma once per milestone there instead of losing a decay
            ms = sorted(max(1, int(round(f * steps_total))) for f in c.milestones)
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=ms, gamma=c.lr_gamma)
        else:
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[], gamma=1.0)
        return opt, sched

    def identity(self) -> dict[str, Any]:
        """What a resumed run must share with the saved one besides the options: teacher and dataset.

        ``teacher_sha256`` is the teacher's :func:`robkd.models.identity.model_sha256` (the audit's
        ``weights_sha256``), ``None`` without a teacher.
        """
        if self._identity is None:
            self._identity = {"teacher_sha256": model_sha256(self.teacher) if self.teacher is not None else None,
                              "dataset": self.dataset}
        return self._identity

    def _start(self) -> Any:
        """The distributed context; refuses what does not split across processes; freezes and places the models."""
        from robkd.distributed import init_from_env

        c = self.config
        dctx = init_from_env(c.device)
        self.device = dctx.device
        if dctx.distributed:
            if c.method == "fast-ard":
                raise UsageError("fast-ard carries its perturbation across batches in one process; "
                                 "train it without torchrun (DDP supports every other method)")
            if c.method in IGA_METHODS and c.iga_form == "reference":
                raise UsageError("--iga-form reference takes one norm over the whole batch, which does not split across "
                                 "processes: use --iga-form per-sample (the default) under torchrun")
            if c.batch_size < dctx.world_size:
                raise UsageError(f"--batch-size {c.batch_size} is smaller than the {dctx.world_size} processes")
        if self.teacher is not None:  # frozen
            self.teacher.eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.student.to(self.device)
        if self.teacher is not None:
            self.teacher.to(self.device)
        return dctx

    def _log(self, loop: LoopState, finished: bool) -> TrainLog:
        """The :class:`TrainLog` of ``loop`` (a finished run selects the best or the last epoch)."""
        c = self.config
        selected = loop.best.epoch if (not finished or c.select == "val-robust") else len(loop.records)
        return TrainLog(loop.records, c.to_dict(), finished, selected, loop.global_step)

    # ------------------------------------------------------------------ main loop
    def fit(self, *, resume: bool = False, max_steps: int | None = None) -> TrainLog:
        """Train; with ``resume`` continue from ``state_path`` when it exists.

        ``max_steps`` stops (after checkpointing) once this call has done that
        many batches: used to simulate a kill. Returns the :class:`TrainLog`
        (``finished`` False when stopped early).
        """
        c = self.config
        if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
            raise UsageError(f"max_steps must be a positive integer, got {max_steps!r}")
        if max_steps is not None and self.state_path is None:
            raise UsageError("stopping early (max_steps) needs a state_path to checkpoint to")
        run = self._prepare(resume)
        if run.finished:
            self._finalise(run.loop.best)
            return self._log(run.loop, True)
        self._arm(run)
        loop, passes, nb = run.loop, c.passes, self._batches()
        done = 0  # batches of this call
        from robkd.utils.progress import progress_bar, rate_text

        with progress_bar(transient=True, rate_unit="img") as prog:
            while loop.epoch < passes:
                if loop.perm is None:
                    loop.start_pass(torch.randperm(len(self.train_data), generator=run.data_gen))
                task = (prog.add_task(f"{c.method} epoch {loop.epoch + 1}/{passes}", total=nb, completed=loop.step, rate="")
                        if self.show_progress and run.dctx.is_main else None)
                self.student.train()
                t0, imgs = time.perf_counter(), 0
                while loop.step < nb:
                    terms, n_imgs = self._train_batch(run)
                    done += 1
                    imgs += n_imgs
                    if task is not None:
                        desc = " ".join(f"{k}={v:.3f}" for k, v in terms.items())
                        prog.update(task, advance=1, rate=rate_text(imgs, time.perf_counter() - t0, "img"),
                                    description=f"{c.method} {loop.epoch + 1}/{passes} {desc} lr={run.optimizer.param_groups[0]['lr']:.3g}")
                    stop = max_steps is not None and done >= max_steps
                    if loop.step < nb and ((c.checkpoint_every and loop.global_step % c.checkpoint_every == 0) or stop):
                        loop.epoch_time += time.perf_counter() - t0
                        t0, imgs = time.perf_counter(), 0
                        run.checkpoint.save(loop)
                        if stop:
                            return self._log(loop, False)
                loop.epoch_time += time.perf_counter() - t0
                if task is not None:
                    prog.remove_task(task)
                self._end_pass(run)
                self._write_log(loop.records)
                run.checkpoint.save(loop, finished=loop.epoch >= passes)
                if max_steps is not None and done >= max_steps and loop.epoch < passes:
                    return self._log(loop, False)
        self._finalise(loop.best)
        self._write_log(loop.records)
        from robkd.distributed import barrier

        barrier(run.dctx)  # the final checkpoint and log exist before any rank goes on
        return self._log(loop, True)

    def _batches(self) -> int:
        """Batches per pass (the last one may be short)."""
        return (len(self.train_data) + self.config.batch_size - 1) // self.config.batch_size

    def _prepare(self, resume: bool) -> _Run:
        """Devices, seeded generators, optimizer and schedule, and the loop state (from the training state with
        ``resume``; stale temporary files of killed writes removed first)."""
        c = self.config
        dctx = self._start()
        torch.manual_seed(c.seed)
        data_gen = torch.Generator().manual_seed(c.seed)
        attack_gen = torch.Generator().manual_seed(c.seed + 1)
        opt, sched = self._build_optim(c.passes)
        ckpt = Checkpointer(self.state_path, config=c.to_dict(), identity=self.identity() if self.state_path else {},
                            model=self.student, optimizer=opt, scheduler=sched, data_gen=data_gen,
                            attack_gen=attack_gen, device=self.device, dctx=dctx)
        run = _Run(dctx, opt, sched, data_gen, attack_gen, ckpt, LoopState())
        if dctx.is_main:  # a kill during an atomic write leaves its temporary file beside the target
            for target in (self.state_path, self.log_path):
                if target is not None:
                    remove_stale_temps(target)
        if resume and self.state_path is not None and self.state_path.exists():
            st = load_train_state(self.state_path)  # global state: every rank reads the same file
            check_resumable(st, self.state_path, config=c.to_dict(), identity=self.identity())
            run.loop = ckpt.restore(st)
            run.finished = bool(st["finished"])
            log.info("resuming %s from epoch %d, step %d (%s)", c.method, run.loop.epoch + 1, run.loop.step, self.state_path)
        elif resume:
            log.info("no training state at %s: starting from scratch", self.state_path)
        return run

    def _arm(self, run: _Run) -> None:
        """The teacher cache, the objectives' context (the student in DDP under torchrun), objective and step checks."""
        from robkd.distributed import ddp as D

        c = self.config
        if self.use_cache and run.loop.epoch < c.passes:
            run.cache = O.TeacherCache(self.teacher, self.train_data, grads=c.method in IGA_METHODS, device=self.device)
        from robkd.distill.recent_objectives import objective_for

        run.ctx = O.StepContext(D.wrap(self.student, run.dctx), self.teacher, c, run.attack_gen, run.cache, passes=c.passes)
        run.objective = None if c.method == "fast-ard" else objective_for(c)
        run.guard = DivergenceGuard(method=c.method, student=self.student, ctx=run.ctx, optimizer=run.optimizer,
                                    loop=run.loop, checkpoint=run.checkpoint, passes=c.passes, batches=self._batches(),
                                    dctx=run.dctx)

    def _train_batch(self, run: _Run) -> tuple[dict[str, float], int]:
        """One optimizer step (Fast-ARD: ``replays`` steps) on the next batch of the pass; returns its loss terms
        and the number of images this process trained on (under torchrun its contiguous part of the global batch)."""
        from robkd.distributed import ddp as D

        c, loop, dctx = self.config, run.loop, run.dctx
        idx = loop.perm[loop.step * c.batch_size : (loop.step + 1) * c.batch_size]
        x = augment_batch(self.train_data.float_x(idx), self.augment, run.data_gen)  # drawn on the CPU
        y = self.train_data.y[idx]
        weight = len(idx)  # samples this process contributes to the epoch's averages
        scale = 1.0
        if dctx.distributed:  # this rank's contiguous part of the global batch
            a, b = D.local_part(idx, dctx)
            weight, scale = b - a, D.loss_scale(b - a, len(idx), dctx)
            if b == a:  # a short last batch left nothing here: one sample with zero weight keeps DDP in step
                a, b = 0, 1
            run.ctx.batch_part = (a, b, len(idx))
            x, y, idx = x[a:b], y[a:b], idx[a:b]
        x, y = x.to(self.device), y.to(self.device)
        cidx = idx if run.cache is not None else None
        total = c.passes * self._batches()
        run.ctx.epoch = loop.epoch  # IAD's warm-up
        run.ctx.progress = (loop.global_step + 1) / total  # IGDM's ramp
        run.ctx.eps_scale = c.eps_scale(loop.global_step, total)  # --eps-warmup
        if run.objective is None:
            loop.delta, terms = self._fast_ard_batch(run.ctx, run.optimizer, x, y, cidx, loop.delta,
                                                     run.guard.check_loss, run.guard.check_weights)
        else:
            loss, terms = run.objective(run.ctx, x, y, cidx)
            run.guard.check_loss(loss, x, cidx)
            if dctx.distributed:
                loss = loss * scale
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            run.optimizer.step()
            run.guard.check_weights()
        loop.add_step(terms, weight)
        return terms, len(idx)

    def _end_pass(self, run: _Run) -> None:
        """End of a pass: BatchNorm statistics shared, schedule step, validation, selection and the epoch record."""
        from robkd.distributed import ddp as D

        c, loop = self.config, run.loop
        D.average_buffers(self.student, run.dctx)  # BatchNorm statistics: one model on every rank
        lr_used = run.optimizer.param_groups[0]["lr"]
        run.scheduler.step()
        sums = D.sum_across_ranks(loop.sums, run.dctx)  # global averages over every rank's samples
        rec: dict[str, Any] = {"epoch": loop.epoch + 1, "lr": lr_used, "steps": loop.global_step}
        cnt = max(1.0, sums.get("_n", 1.0))
        rec.update({k: v / cnt for k, v in sums.items() if k != "_n"})
        rec["loss"] = sum(v for k, v in rec.items() if k not in ("epoch", "lr", "steps"))
        if c.eps_warmup:  # the training radius of the pass's last step
            rec["train_eps"] = c.eps * c.eps_scale(loop.global_step - 1, c.passes * self._batches())
        rec["train_seconds"] = round(loop.epoch_time, 3)
        n = len(self.train_data) * (c.replays if c.method == "fast-ard" else 1)
        rec["images_per_s"] = round(n / max(loop.epoch_time, 1e-9), 1)
        if self.val_data is not None:
            vc, vr = evaluate_robust(self.student, self.val_data, norm=c.norm, eps=c.eps, steps=c.val_steps,
                                     step_size=c.eps / 4.0, seed=c.seed + 12345)
            rec["val_clean"], rec["val_robust"] = vc, vr
            if c.select == "val-robust" and (vr, vc) > (loop.best.robust, loop.best.clean):
                loop.best = Best(loop.epoch + 1, vr, vc, to_cpu(self.student.state_dict()))
        log.info("%s epoch %d/%d: %s", c.method, loop.epoch + 1, c.passes,
                 ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items() if k != "epoch"))
        loop.end_pass(rec)

    def _fast_ard_batch(self, ctx: O.StepContext, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                        cidx: torch.Tensor | None, delta: torch.Tensor | None,
                        check_loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], None] | None = None,
                        check_weights: Callable[[], None] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """m replays of one minibatch, the perturbation carried across replays and batches.

        ``check_loss(loss, x, cidx)`` runs before each backward pass and ``check_weights()`` after each step."""
        c = self.config
        b = x.shape[0]
        if delta is None or delta.shape[1:] != x.shape[1:] or delta.shape[0] < b:
            full = torch.zeros((max(b, c.batch_size),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
            if delta is not None and delta.shape[1:] == x.shape[1:]:
                full[: delta.shape[0]] = delta[: full.shape[0]].to(x.device)
            delta = full
        delta = delta.to(x.device)
        d = delta[:b]
        agg: dict[str, float] = {}
        t_logits = ctx.teacher_logits(x, cidx)  # clean x: the same in every replay
        for _ in range(c.replays):
            loss, terms, x_in = O.fast_ard_replay(ctx, x, y, cidx, d, t_logits)
            if check_loss is not None:
                check_loss(loss, x, cidx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            d = O.fast_ard_update_delta(ctx, x, x_in)
            opt.step()
            if check_weights is not None:
                check_weights()
            for k, v in terms.items():
                agg[k] = agg.get(k, 0.0) + v / c.replays
        delta = delta.clone()
        delta[:b] = d
        return delta, agg

    def _finalise(self, best: Best) -> None:
        """The selected weights (with ``val-robust``) in the student, in eval mode."""
        if self.config.select == "val-robust" and best.state:
            self.student.load_state_dict(best.state)
        self.student.eval()

    def _write_log(self, records: list[dict[str, Any]]) -> None:
        """The epoch log, one strict-JSON record per line (rank 0 writes it atomically)."""
        from robkd.distributed import current

        if self.log_path is None or not current().is_main:
            return
        atomic_write_text(self.log_path, "".join(json.dumps(finite_or_none(r), sort_keys=True, allow_nan=False) + "\n"
                                                 for r in records))
