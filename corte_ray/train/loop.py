"""The adaptation loop: `train(cfg, ctx)` reads top to bottom, the same under every engine.

It builds the student (and EMA teacher / metric head when the method needs them), resumes from the newest
checkpoint, runs the method's step, and owns backward, optimiser steps, the EMA update, evaluation, checkpoints
and TensorBoard. The engine only supplies the context (context.TrainContext): rank, device, all-reduce, batches,
where checkpoints go, how metrics are reported. No Ray import here. What it reads is in data.py, how it
evaluates in evaluation.py, the RNG a checkpoint carries in resume.py.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..config import Config
from ..data.datasets import Dataset, open_split
from ..errors import ConfigError, InputError
from ..methods.steps import Method, Models, build_method, METHODS
from ..models import build_model
from ..storage import StoragePath, as_path
from .context import TrainContext, TrainHooks
# Re-exported: callers import the loop's data, evaluation and progress helpers from here.
from .data import ResumableSampler, TargetTrainSet, local_batches, sample_order, to_device_batch  # noqa: F401
from .evaluation import evaluate_model, predict_train_ids, prediction_overlays  # noqa: F401
from .progress import ProgressReporter, format_progress  # noqa: F401
from .resume import RankRng, restore_rng

log = logging.getLogger(__name__)
from ..data.labels import IGNORE  # noqa: E402,F401 - the one ignore index (255)


def average_across_ranks(tensors: list[torch.Tensor], ctx) -> None:
    """In-place mean over ranks of every tensor (one flat all-reduce); nothing to do in one process."""
    if ctx.world_size == 1 or not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    ctx.all_reduce_(flat)
    flat /= ctx.world_size
    offset = 0
    for t in tensors:
        n = t.numel()
        t.detach().copy_(flat[offset:offset + n].view_as(t))
        offset += n


def poly_lr(step: int, total: int, warmup: int, power: float = 0.9) -> float:
    """Linear warm-up then polynomial decay: the schedule of DAFormer/DACS."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    return max(0.0, 1 - (step - warmup) / max(1, total - warmup)) ** power


@dataclass
class TrainResult:
    step: int
    metrics: dict
    checkpoint: StoragePath | None
    models: Models | None = None   # in-process runs only (not sent back from Ray workers)


@dataclass
class Run:
    """Everything one rank trains with: data, models, optimisers, the method."""

    train_set: Dataset
    val_set: Dataset | None
    data: TargetTrainSet
    student: nn.Module             # the bare student (its state_dict has no DDP prefix)
    models: Models                 # what the method step sees (student DDP-wrapped under several ranks)
    metric_params: list[nn.Parameter]
    opt: torch.optim.Optimizer
    metric_opt: torch.optim.Optimizer | None
    sched: torch.optim.lr_scheduler.LambdaLR
    method: Method
    teacher_copy_step: int | None  # ema.start=copy: the step whose end makes the teacher a copy of the student
    ramp: bool                     # the EMA momentum ramps from 0 (a teacher that starts untrained)

    @property
    def teacher(self):
        return self.models.teacher

    def checkpoint_state(self, cfg: Config, step: int, best: float, rng: RankRng) -> dict:
        m = self.models
        state = {"step": step, "best_miou": best, "config": cfg.to_dict(), "arch": cfg.model.student,
                 "student": self.student.state_dict(), "optimizer": self.opt.state_dict(),
                 "scheduler": self.sched.state_dict(), "method": self.method.state_dict(),
                 "torch_rng": torch.get_rng_state(),   # rank 0's, as before
                 "rng_ranks": rng.states(step)}
        if m.teacher is not None:
            state["teacher"] = m.teacher.state_dict()
        if m.metric_head is not None:
            state.update(metric_head=m.metric_head.state_dict(), proxies=m.proxies.state_dict(),
                         metric_optimizer=self.metric_opt.state_dict())
        return state

    def load_state(self, state: dict, ctx) -> tuple[int, float]:
        """Restore a checkpoint (weights, optimisers, schedule, method state, this rank's RNG); (step, best)."""
        m = self.models
        self.student.load_state_dict(state["student"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if m.teacher is not None:
            m.teacher.load_state_dict(state["teacher"])
        if m.metric_head is not None:
            m.metric_head.load_state_dict(state["metric_head"])
            m.proxies.load_state_dict(state["proxies"])
            self.metric_opt.load_state_dict(state["metric_optimizer"])
        restore_rng(state, self.method, ctx.rank, ctx.world_size)
        return int(state["step"]), float(state["best_miou"])


def build_run(cfg: Config, ctx, store) -> Run:
    """Open the data and build models, optimisers and method, in the one order that makes every rank's
    replicas and every resumed run's random draws what an uninterrupted run's are."""
    from ..models import ClassProxies, EMATeacher, MetricHead

    device, tcfg = ctx.device, cfg.train
    # Models are built under the same seed on every rank (replicas must start identical: the teacher is a copy,
    # the metric head is not in DDP); per-rank randomness (dropout) is seeded after.
    torch.manual_seed(tcfg.seed)
    method_cls = METHODS.get(cfg.method)
    d = cfg.data
    train_set = open_split(d, d.train_split)
    val_set = open_split(d, d.val_split) if d.val_split else None
    if method_cls.needs_box_labels and store is None:
        raise ConfigError(f"method {cfg.method} needs black-box labels: set blackbox.label_store or blackbox.spec")
    if method_cls.needs_source_weights and not cfg.model.weights:
        raise ConfigError(f"model.weights: method {cfg.method} starts student and teacher from the white-box source "
                          f"model; pass --source-checkpoint CKPT (or model.weights=CKPT)")
    # Ground truth of the training images, where it exists, only feeds the pseudo-label diagnostics
    # (accuracy of what the box and the teacher label); no method but `oracle` trains on it.
    diagnose = tcfg.label_diagnostics and all(s.label is not None for s in train_set.samples)
    data = TargetTrainSet(train_set, store if method_cls.needs_box_labels else None, d.resize,
                          with_labels=method_cls.needs_ground_truth or diagnose, cache=d.cache_images,
                          with_top2=method_cls.wants_box_top2(cfg))

    student = build_model(cfg.model.student, cfg.model.num_classes, cfg.model.pretrained, cfg.model.weights).to(device)
    if tcfg.channels_last and device.type == "cuda":
        student = student.to(memory_format=torch.channels_last)
    metric_head = proxies = None
    metric_params: list[nn.Parameter] = []
    if method_cls.uses_metric:
        metric_head = MetricHead(student.feature_dim, embed_dim=cfg.stvm.embed_dim).to(device)
        proxies = ClassProxies(cfg.model.num_classes, cfg.stvm.embed_dim).to(device)
        metric_params = list(metric_head.parameters()) + list(proxies.parameters())
    wrapped = ctx.wrap_model(student)   # DDP broadcasts rank 0's weights: copy the teacher after this
    teacher = EMATeacher(student, cfg.ema.momentum) if method_cls.uses_teacher else None
    torch.manual_seed(tcfg.seed + ctx.rank)
    opt = torch.optim.AdamW(student.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    metric_opt = torch.optim.AdamW(metric_params, lr=cfg.stvm.metric_lr) if metric_params else None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: poly_lr(s, tcfg.iterations, tcfg.lr_warmup))
    # tau_c over the split being trained on (its rows' own statistics), not over whatever else the store holds.
    means = (torch.from_numpy(store.class_mean_rc(keys=[s.key for s in train_set.samples]))
             if store is not None and method_cls.needs_box_labels else None)
    method = build_method(cfg, means, device, reduce=ctx.all_reduce_, seed=tcfg.seed * 1000 + ctx.rank)
    method.class_names = tuple(train_set.label_space.class_names)
    return Run(train_set=train_set, val_set=val_set, data=data, student=student,
               models=Models(student=wrapped, teacher=teacher, metric_head=metric_head, proxies=proxies),
               metric_params=metric_params, opt=opt, metric_opt=metric_opt, sched=sched, method=method,
               # ema.start=copy: the teacher becomes a copy of the student when the CoRTe warm-up ends.
               teacher_copy_step=math.floor(cfg.corte.warmup * tcfg.iterations) if cfg.ema.start == "copy" else None,
               # The ramp is for a teacher that starts as an untrained student; one copied from given weights
               # (stvm's white-box source model) is trained already and averages at the constant m from step 0.
               ramp=cfg.ema.start == "ramp" and not cfg.model.weights)


def optimiser_step(run: Run, ctx, loss: torch.Tensor, step: int) -> None:
    """backward, the optimisers, the schedule, the cross-rank averages and the EMA update of step `step`."""
    run.opt.zero_grad(set_to_none=True)
    if run.metric_opt is not None:
        run.metric_opt.zero_grad(set_to_none=True)
    loss.backward()
    run.opt.step()
    if run.metric_opt is not None:
        # The metric head is not in DDP (it trains on detached teacher features): average its gradients here.
        average_across_ranks([p.grad for p in run.metric_params if p.grad is not None], ctx)
        run.metric_opt.step()
    run.sched.step()
    # DDP averages gradients but not BatchNorm running statistics: average them, so every rank's student,
    # and so its EMA teacher (which averages buffers too), stays identical.
    average_across_ranks([b for b in run.student.buffers() if b.is_floating_point()], ctx)
    if run.models.metric_head is not None:
        average_across_ranks([b for b in run.models.metric_head.buffers() if b.is_floating_point()], ctx)
    if run.teacher is not None:
        # Every rank updates its teacher from the same student weights: teachers stay identical.
        if run.teacher_copy_step is not None and step + 1 == run.teacher_copy_step:
            run.teacher.reset(run.student)
        else:
            run.teacher.update(run.student, step=step if run.ramp else None)


def log_train_scalars(writer, out: dict, window: dict[str, list[float]], lr: float, images_per_s: float,
                      step: int) -> None:
    writer.add_scalar("train/images_per_s", images_per_s, step)
    writer.add_scalar("train/lr", lr, step)
    for k, v in out.items():
        if torch.is_tensor(v):   # .item() here is a CPU-GPU sync point: only on logging steps
            writer.add_scalar(k if "/" in k else f"train/{k}", float(v.detach()), step)
    for k, vs in window.items():
        writer.add_scalar(k if "/" in k else f"train/{k}", sum(vs) / len(vs), step)


def evaluate_step(run: Run, cfg: Config, ctx, writer, scorer, step: int, evaluate: bool) -> dict:
    """val mIoU (and per-class IoU) when `evaluate` and there is a val split; the label-free selection scores
    when a scorer is set; each also to TensorBoard."""
    metrics: dict = {}
    device = ctx.device
    if evaluate and run.val_set is not None:
        res = evaluate_model(run.student, run.val_set, run.val_set.label_space.eval_classes(), cfg.model.num_classes,
                             device, cfg.data.resize, ctx, max_images=cfg.data.val_max_images, amp=cfg.train.amp)
        run.student.train()
        metrics["val_miou"] = res["miou"]
        metrics.update({f"val_iou/{k}": v for k, v in res["per_class"].items() if v is not None})
        if writer is not None:
            writer.add_scalar("val/miou", res["miou"], step)
            for k, v in res["per_class"].items():
                if v is not None:
                    writer.add_scalar(f"val_iou/{k}", v, step)
            writer.add_image("val/predictions", prediction_overlays(run.student, run.val_set, device,
                                                                     cfg.data.resize), step)
            run.student.train()
    if scorer is not None:
        scores = scorer.score(run.student, run.teacher, device, ctx)
        run.student.train()
        metrics.update(scores)
        if writer is not None:
            for k, v in scores.items():
                writer.add_scalar(k if "/" in k else f"unsup/{k}", v, step)
    return metrics


def train(cfg: Config, ctx: TrainContext, store=None, hooks: TrainHooks | None = None) -> TrainResult:
    """Run (or resume) one adaptation; returns the last metrics. `store` is an open LabelStore (None = oracle);
    `hooks` let a test watch or break the run (the default does nothing)."""
    hooks = hooks or TrainHooks()
    device, tcfg = ctx.device, cfg.train
    if tcfg.cpu_threads:
        # OpenMP threads spin while waiting: more threads than free cores slows CPU training 10x or more.
        torch.set_num_threads(tcfg.cpu_threads)
    channels_last = tcfg.channels_last and device.type == "cuda"
    use_amp = tcfg.amp and device.type == "cuda"
    run = build_run(cfg, ctx, store)
    rng = RankRng(ctx, run.method)

    step, best = 0, -1.0
    state, ckpt_path = ctx.load_latest_checkpoint(device)
    if state is not None:
        step, best = run.load_state(state, ctx)
        log.info("resumed from %s at step %d", ckpt_path, step)
        hooks.on_resumed(ctx, step, {"student": run.student.state_dict(), "method": run.method.state_dict(),
                                     "torch_rng": torch.get_rng_state(),
                                     **({"teacher": run.teacher.state_dict()} if run.teacher is not None else {})})
    if len(run.data) < cfg.data.batch_size:
        raise InputError(run.train_set.root, f"{len(run.data)} training images, fewer than data.batch_size="
                                             f"{cfg.data.batch_size}")
    # The engine decides how batches arrive (a DataLoader here, a Ray Data shard under Ray Train); the
    # order of images is always `sample_order`, a function of the seed, the rank and the step.
    batches = ctx.batches(run.data, cfg, step)

    writer = progress = None
    if ctx.is_main:
        from torch.utils.tensorboard import SummaryWriter

        # Written locally; the engine copies it to the run's storage at every report.
        writer = SummaryWriter(str(ctx.tensorboard_dir))
        progress = ProgressReporter(as_path(ctx.run_dir), cfg.method, tcfg.iterations, step, tcfg.progress_every_s)
    scorer = None
    if tcfg.score_images:
        # Model selection without target labels (corte-ray tune): scores of the student on training images,
        # from the box's stored answers; no randomness of training is drawn, so the run is the same without it.
        from ..tune.score import SelectionScorer

        scorer = SelectionScorer(run.train_set, store, cfg.data.resize, tcfg.score_images, cfg.model.num_classes)

    run.student.train()
    metrics: dict = {}
    last_ckpt = None
    t_window, imgs_window = time.perf_counter(), 0
    window: dict[str, list[float]] = {}   # diagnostics (Python floats) averaged over each logging window
    last_val: float | None = best if best >= 0 else None
    while step < tcfg.iterations:
        batch = to_device_batch(next(batches), device, channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = run.method.step(run.models, batch, step, tcfg.iterations)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower train.lr or check the labels")
        optimiser_step(run, ctx, loss, step)
        step += 1
        hooks.on_step(ctx, step)
        imgs_window += batch["image"].shape[0] * ctx.world_size
        for k, v in out.items():
            if isinstance(v, float):
                window.setdefault(k, []).append(v)
        if progress is not None:
            progress.update(step, batch["image"].shape[0] * ctx.world_size, last_val)
        if writer is not None and (step % tcfg.log_every == 0 or step == tcfg.iterations):
            log_train_scalars(writer, out, window, run.sched.get_last_lr()[0],
                              imgs_window / max(time.perf_counter() - t_window, 1e-9), step)
            t_window, imgs_window, window = time.perf_counter(), 0, {}

        eval_due = tcfg.eval_every and step % tcfg.eval_every == 0
        ckpt_due = tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0
        if not (eval_due or ckpt_due or step == tcfg.iterations):
            continue
        metrics = {"step": step, **{k: float(v.detach() if torch.is_tensor(v) else v) for k, v in out.items()},
                   **evaluate_step(run, cfg, ctx, writer, scorer, step, evaluate=eval_due or step == tcfg.iterations)}
        last_val = metrics.get("val_miou", last_val)
        is_best = metrics.get("val_miou", -1.0) > best
        if is_best:
            best = metrics["val_miou"]
        metrics["best_val_miou"] = best
        if ctx.world_size > 1:
            rng.gather(step)   # every rank, before rank 0 writes the checkpoint
        last_ckpt = ctx.save_checkpoint(run.checkpoint_state(cfg, step, best, rng), step, is_best) \
            if ctx.is_main else None
        if writer is not None:
            writer.flush()   # before the report: the engine copies TensorBoard to the run's storage there
        ctx.report(metrics, last_ckpt)
        log.info("step %d/%d loss %.4f%s", step, tcfg.iterations, loss.item(),
                 f" val mIoU {metrics['val_miou']:.2f}" if "val_miou" in metrics else "")
    if writer is not None:
        writer.close()
    if progress is not None:
        progress.finish(step, last_val)
    result = TrainResult(step=step, metrics=metrics, checkpoint=last_ckpt, models=run.models)
    hooks.on_finished(ctx, result)
    return result
