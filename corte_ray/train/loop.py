"""The adaptation loop: one screen, top to bottom, the same under every engine.

`train(cfg, ctx)` builds the student (and EMA teacher / metric head when the method needs them), reads target
images with the black box's stored answer, runs the method's step, and owns backward, optimiser steps, the EMA
update, evaluation, checkpoints and TensorBoard. The engine only supplies the context (context.py): rank,
device, all-reduce, where checkpoints go, how metrics are reported. No Ray import here.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset as TorchDataset, Sampler

from ..config import Config
from ..data.datasets import Dataset, open_dataset
from ..data.transforms import resize_image, resize_map
from ..errors import ConfigError, InputError
from ..methods.steps import Models, build_method, METHODS
from ..models import build_model

log = logging.getLogger(__name__)
from ..data.labels import IGNORE  # noqa: E402,F401 - the one ignore index (255)


# ------------------------------------------------------------------------------------------------ data
class TargetTrainSet(TorchDataset):
    """Target images joined with the black box's stored answer (or ground truth for `oracle`)."""

    def __init__(self, dataset: Dataset, store=None, resize: tuple[int, int] | None = None,
                 with_labels: bool = False, cache: bool = False) -> None:
        self.dataset, self.store, self.resize, self.with_labels = dataset, store, resize, with_labels
        # Decoded samples by index: PNG/JPEG decoding and the label-store lookup cost more than a training step
        # of a small student on CPU, and every image is read once per epoch.
        self._cache: dict[int, dict[str, np.ndarray]] | None = {} if cache else None
        if store is not None:
            missing = [s.key for s in dataset.samples if s.key not in store]
            if missing:
                raise InputError(store.root, f"{len(missing)} of {len(dataset)} images have no labels in the store "
                                             f"(first: {missing[0]}); rerun `corte-ray label` to complete it")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if self._cache is not None:
            if i not in self._cache:
                self._cache[i] = self._read(i)
            return self._cache[i]
        return self._read(i)

    def _read(self, i: int) -> dict[str, np.ndarray]:
        sample = self.dataset[i]
        img = self.dataset.read_image(sample)
        out: dict[str, np.ndarray] = {}
        if self.with_labels:
            out["label"] = self.dataset.read_label(sample, img.shape[:2])
        if self.store is not None:
            box = self.store.get(sample.key)
            out["box_top1"], out["box_p1"] = box.top1, box.p1
            if box.rc is not None:
                out["box_rc"] = box.rc
        size = self.resize or img.shape[:2]
        img = resize_image(img, size)
        out = {k: resize_map(v, size) for k, v in out.items()}   # the store may hold another resolution
        out["image"] = np.ascontiguousarray(img.transpose(2, 0, 1))
        return out


class ResumableSampler(Sampler[int]):
    """Image indices, epoch after epoch: epoch e is the first `keep` items (default: all n) of a permutation drawn
    from (seed, e); iteration starts `skip` items into epoch `start_epoch`.

    `sample_order` makes `keep` a whole number of batches, so no batch straddles two epochs: batch k of epoch e
    is fixed by (seed, e, k) alone, and a run resumed at any step sees exactly the batches it would have seen.
    Iterating has no side effects: every `iter()` starts again at (start_epoch, skip).
    """

    def __init__(self, n: int, seed: int, start_epoch: int = 0, skip: int = 0, keep: int | None = None) -> None:
        keep = n if keep is None else keep
        if not 0 < keep <= n or not 0 <= skip < keep:
            raise ValueError(f"ResumableSampler: need 0 < keep={keep} <= n={n} and 0 <= skip={skip} < keep")
        self.n, self.seed, self.start_epoch, self.skip, self.keep = n, seed, start_epoch, skip, keep

    def __iter__(self):
        epoch, skip = self.start_epoch, self.skip
        while True:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            yield from torch.randperm(self.n, generator=g)[skip:self.keep].tolist()
            epoch, skip = epoch + 1, 0

    def __len__(self) -> int:  # infinite in practice; DataLoader only needs it for len(loader)
        return 2 ** 62


def sample_order(n: int, batch_size: int, seed: int, rank: int, start_step: int) -> ResumableSampler:
    """Image indices in training order from `start_step` on, a pure function of (seed, rank, step).

    An epoch is the first n // batch_size whole batches of a fresh permutation; its n % batch_size left-over
    images sit that epoch out (the next permutation gives them their turn). So step s reads batch
    s % per_epoch of epoch s // per_epoch, whether the run got there in one go or resumed at any step.
    (When batch_size divides n this is the plain permutation-per-epoch order of earlier versions.)"""
    per_epoch = max(1, n // batch_size)
    return ResumableSampler(n, seed * 7919 + rank, start_epoch=start_step // per_epoch,
                            skip=(start_step % per_epoch) * batch_size, keep=min(n, per_epoch * batch_size))


def local_batches(data: TargetTrainSet, cfg: Config, rank: int, start_step: int):
    """Batches for one process: a DataLoader over `sample_order` (workers decode in parallel when asked)."""
    sampler = sample_order(len(data), cfg.data.batch_size, cfg.train.seed, rank, start_step)
    # Its own generator: a DataLoader without one draws its worker base seed from the global RNG when it is
    # iterated, which would put a resumed run's global RNG one draw away from the uninterrupted run's.
    loader = DataLoader(data, batch_size=cfg.data.batch_size, sampler=sampler, collate_fn=_collate,
                        num_workers=cfg.data.loader_workers, drop_last=True,
                        persistent_workers=cfg.data.loader_workers > 0,
                        generator=torch.Generator().manual_seed(cfg.train.seed * 7919 + rank))
    return iter(loader)


def _collate(items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    keys = items[0].keys()
    shapes = {it["image"].shape for it in items}
    if len(shapes) > 1:
        raise ConfigError(f"data.resize: images of different sizes {sorted(shapes)} in one batch; set data.resize=[H, W]")
    return {k: torch.from_numpy(np.stack([it[k] for it in items])) for k in keys}


def to_device_batch(batch: dict[str, torch.Tensor], device: torch.device, channels_last: bool) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in batch.items():
        v = v.to(device, non_blocking=True)
        if k == "image":
            v = v.float().div_(255.0)
            if channels_last:
                v = v.contiguous(memory_format=torch.channels_last)
        elif k in ("box_top1", "label"):
            v = v.long()
        else:
            v = v.float()
        out[k] = v
    return out


# ------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict_train_ids(model: nn.Module, img: np.ndarray, device: torch.device, resize: tuple[int, int] | None = None,
                      out_size: tuple[int, int] | None = None, amp: bool = False) -> np.ndarray:
    """One HxWx3 uint8 image -> HxW uint8 train ids: predicted at `resize` (default: the image's size), logits
    up-sampled bilinearly to `out_size` (default: the image's size) before the arg-max."""
    x = torch.from_numpy(np.ascontiguousarray(resize_image(img, resize or img.shape[:2]).transpose(2, 0, 1)))
    x = x[None].to(device).float() / 255.0
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
        logits = model(x)
    logits = torch.nn.functional.interpolate(logits.float(), size=tuple(out_size or img.shape[:2]), mode="bilinear",
                                             align_corners=False)
    return logits.argmax(1)[0].to(torch.uint8).cpu().numpy()


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset: Dataset, classes: tuple[int, ...], num_classes: int, device: torch.device,
                   resize: tuple[int, int] | None, ctx, max_images: int | None = None, amp: bool = True,
                   shard: bool = True) -> dict:
    """mIoU from one confusion matrix over the split, all-reduced across ranks (each rank takes every
    world_size-th image). Predictions are made at the working resolution and up-sampled to the label's."""
    from ..evaluation import confusion_matrix, result_from_confusion

    model.eval()
    samples = dataset.samples[:max_images] if max_images else dataset.samples
    mine = samples[ctx.rank::ctx.world_size] if shard else samples
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    use_amp = amp and device.type == "cuda"
    for sample in mine:
        img = dataset.read_image(sample)
        label = dataset.read_label(sample, img.shape[:2])
        pred = predict_train_ids(model, img, device, resize=resize, out_size=label.shape, amp=use_amp)
        conf += confusion_matrix(pred, label, num_classes)
    total = torch.from_numpy(conf).to(device)
    if shard:
        ctx.all_reduce_(total)
    res = result_from_confusion(total.cpu().numpy(), classes, dataset.label_space.class_names, len(samples))
    return {"miou": res.miou, "per_class": res.per_class, "num_images": res.num_images}


@torch.no_grad()
def prediction_overlays(model: nn.Module, dataset: Dataset, device: torch.device, resize: tuple[int, int] | None,
                        n: int = 4) -> torch.Tensor:
    """A (3, H, W) uint8 grid for TensorBoard: per val image, the image | ground truth | prediction blended 50 %
    with the class colours."""
    model.eval()
    rows = []
    for sample in dataset.samples[:n]:
        raw = dataset.read_image(sample)
        img = resize_image(raw, resize or raw.shape[:2])
        gt = resize_map(dataset.read_label(sample), img.shape[:2])
        pred = predict_train_ids(model, img, device)
        space = dataset.label_space
        blend = [(0.5 * img + 0.5 * space.colorize(m)).astype(np.uint8) for m in (gt, pred)]
        rows.append(np.concatenate([img] + blend, axis=1))
    return torch.from_numpy(np.concatenate(rows, axis=0)).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------------------------------------- progress
class ProgressReporter:
    """One log line every `every_s` seconds (step/total, images/s, ETA, latest val mIoU) and the same numbers in
    RUN/progress.json, which a driver running several runs side by side (`corte-ray demo`) polls: worker logs of
    Ray tasks and Train workers do not reach the driver's console."""

    def __init__(self, run_dir: Path, name: str, total: int, start_step: int, every_s: float) -> None:
        self.path, self.name, self.total, self.every_s = run_dir / "progress.json", name, total, every_s
        self.t0 = self.t_last = time.perf_counter()
        self.start_step, self.images = start_step, 0

    def update(self, step: int, images: int, val_miou: float | None) -> None:
        self.images += images
        now = time.perf_counter()
        if self.every_s <= 0 or now - self.t_last < self.every_s:
            return
        self.t_last = now
        self._write(step, val_miou, done=False)

    def finish(self, step: int, val_miou: float | None) -> None:
        self._write(step, val_miou, done=True)

    def _write(self, step: int, val_miou: float | None, done: bool) -> None:
        from ..io_utils import write_json_atomic

        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        rate = (step - self.start_step) / elapsed
        eta = (self.total - step) / rate if rate > 0 else None
        state = {"name": self.name, "step": step, "total": self.total, "images_per_s": round(self.images / elapsed, 1),
                 "eta_s": None if eta is None else round(eta, 1), "val_miou": val_miou, "done": done,
                 "elapsed_s": round(elapsed, 1)}
        write_json_atomic(self.path, state)
        if not done:
            log.info("%s", format_progress(state))


def format_progress(state: dict) -> str:
    """`corte 120/400 45 img/s ETA 1m20s val 35.21` from a progress.json state."""
    eta = state.get("eta_s")
    eta_txt = "-" if eta is None else (f"{int(eta) // 60}m{int(eta) % 60:02d}s" if eta >= 60 else f"{int(eta)}s")
    val = state.get("val_miou")
    return (f"{state['name']} {state['step']}/{state['total']} {state['images_per_s']:.0f} img/s ETA {eta_txt}"
            + (f" val {val:.2f}" if val is not None else ""))


# ------------------------------------------------------------------------------------------------ models
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
    checkpoint: Path | None
    models: Models | None = None   # in-process runs only (not sent back from Ray workers)


def train(cfg: Config, ctx, store=None) -> TrainResult:
    """Run (or resume) one adaptation; returns the last metrics. `store` is an open LabelStore (None = oracle)."""
    from ..models import ClassProxies, EMATeacher, MetricHead

    device = ctx.device
    tcfg = cfg.train
    if tcfg.cpu_threads:
        # OpenMP threads spin while waiting: more threads than free cores slows CPU training 10x or more.
        torch.set_num_threads(tcfg.cpu_threads)
    # Models are built under the same seed on every rank (replicas must start identical: the teacher is a copy,
    # the metric head is not in DDP); per-rank randomness (dropout) is seeded after.
    torch.manual_seed(tcfg.seed)
    method_cls = METHODS.get(cfg.method)
    channels_last = tcfg.channels_last and device.type == "cuda"
    use_amp = tcfg.amp and device.type == "cuda"

    # ---- data
    train_set = open_dataset(cfg.data.dataset, Path(cfg.data.root), split=cfg.data.train_split, city=cfg.data.city,
                             labels_dir=cfg.data.labels_dir, label_space=cfg.data.label_space)
    val_set = None
    if cfg.data.val_split:
        val_set = open_dataset(cfg.data.dataset, Path(cfg.data.root), split=cfg.data.val_split, city=cfg.data.city,
                               labels_dir=cfg.data.labels_dir, label_space=cfg.data.label_space)
    if method_cls.needs_box_labels and store is None:
        raise ConfigError(f"method {cfg.method} needs black-box labels: set blackbox.label_store or blackbox.spec")
    if method_cls.needs_source_weights and not cfg.model.weights:
        raise ConfigError(f"model.weights: method {cfg.method} starts student and teacher from the white-box source "
                          f"model; pass --source-checkpoint CKPT (or model.weights=CKPT)")
    # Ground truth of the training images, where it exists, only feeds the pseudo-label diagnostics
    # (accuracy of what the box and the teacher label); no method but `oracle` trains on it.
    diagnose = tcfg.label_diagnostics and all(s.label is not None for s in train_set.samples)
    data = TargetTrainSet(train_set, store if method_cls.needs_box_labels else None, cfg.data.resize,
                          with_labels=method_cls.needs_ground_truth or diagnose, cache=cfg.data.cache_images)

    # ---- models and optimisers
    student = build_model(cfg.model.student, cfg.model.num_classes, cfg.model.pretrained, cfg.model.weights).to(device)
    if channels_last:
        student = student.to(memory_format=torch.channels_last)
    metric_head = proxies = None
    metric_params: list[nn.Parameter] = []
    if method_cls.uses_metric:
        metric_head = MetricHead(student.feature_dim, embed_dim=cfg.stvm.embed_dim).to(device)
        proxies = ClassProxies(cfg.model.num_classes, cfg.stvm.embed_dim).to(device)
        metric_params = list(metric_head.parameters()) + list(proxies.parameters())
    wrapped = ctx.wrap_model(student)   # DDP broadcasts rank 0's weights: copy the teacher after this
    teacher = EMATeacher(student, cfg.ema.momentum) if method_cls.uses_teacher else None
    # ema.start=copy: the teacher becomes a copy of the student when the CoRTe warm-up ends (docs/methods.md).
    teacher_copy_step = math.floor(cfg.corte.warmup * tcfg.iterations) if cfg.ema.start == "copy" else None
    # The ramp is for a teacher that starts as an untrained student; one copied from given weights (stvm's
    # white-box source model) is trained already and averages at the constant m from the first step.
    ramp = cfg.ema.start == "ramp" and not cfg.model.weights
    torch.manual_seed(tcfg.seed + ctx.rank)
    opt = torch.optim.AdamW(student.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    metric_opt = torch.optim.AdamW(metric_params, lr=cfg.stvm.metric_lr) if metric_params else None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: poly_lr(s, tcfg.iterations, tcfg.lr_warmup))
    # tau_c over the split being trained on (its rows' own statistics), not over whatever else the store holds.
    means = (torch.from_numpy(store.class_mean_rc(keys=[s.key for s in train_set.samples]))
             if store is not None and method_cls.needs_box_labels else None)
    method = build_method(cfg, means, device, reduce=ctx.all_reduce_, seed=tcfg.seed * 1000 + ctx.rank)
    method.class_names = tuple(train_set.label_space.class_names)
    models = Models(student=wrapped, teacher=teacher, metric_head=metric_head, proxies=proxies)

    # ---- resume
    # Randomness is per rank: torch's global RNG (seeded seed+rank, CUDA's with it) and the method's generator
    # (seeded seed*1000+rank). A checkpoint holds every rank's, in "rng_ranks" (a list indexed by rank). Rank 0
    # alone writes checkpoints, so with several ranks every rank's state is gathered (a collective all ranks
    # join, in step) just before each checkpoint.
    def own_rng() -> dict:
        own = {"torch": torch.get_rng_state(), "generator": method.state_dict()["generator"]}
        if torch.cuda.is_available():
            own["cuda"] = torch.cuda.get_rng_state_all()
        return own

    gathered: dict = {"step": None, "rows": []}   # every rank's own_rng(), serialised, after the last step

    def gather_rng(done: int) -> None:
        """A collective: each rank writes its serialised state into its row of a zero tensor, then a sum."""
        import io

        buf = io.BytesIO()
        torch.save(own_rng(), buf)
        blob = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        lengths = torch.zeros(ctx.world_size, dtype=torch.int64, device=device)
        lengths[ctx.rank] = blob.numel()
        lengths = ctx.all_reduce_(lengths).tolist()
        rows = torch.zeros(ctx.world_size, max(lengths), dtype=torch.uint8, device=device)
        rows[ctx.rank, :blob.numel()] = blob.to(device)
        rows = ctx.all_reduce_(rows).cpu()
        gathered.update(step=done, rows=[rows[r, :n] for r, n in enumerate(lengths)])

    def rng_states(done: int) -> list[dict]:
        """Every rank's RNG state, indexed by rank (rank 0: `own_rng()` now; the others: the last gather)."""
        import io

        if ctx.world_size == 1:
            return [own_rng()]
        if gathered["step"] != done:   # on_step not called before this checkpoint: keep what is known
            log.warning("checkpoint at step %d holds only rank 0's RNG state; other ranks will resume from it", done)
            return [own_rng()]
        return [own_rng()] + [torch.load(io.BytesIO(row.numpy().tobytes()), weights_only=True)
                              for row in gathered["rows"][1:]]

    step, best = 0, -1.0
    state, ckpt_path = ctx.load_latest_checkpoint(device)
    if state is not None:
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if teacher is not None:
            teacher.load_state_dict(state["teacher"])
        if metric_head is not None:
            metric_head.load_state_dict(state["metric_head"])
            proxies.load_state_dict(state["proxies"])
            metric_opt.load_state_dict(state["metric_optimizer"])
        # RNG states must be CPU ByteTensors; the checkpoint was loaded onto `device`.
        method_state = {**state["method"], "generator": state["method"]["generator"].cpu()}
        torch_rng = state["torch_rng"].cpu()
        rows = state.get("rng_ranks") or []   # absent from older checkpoints: every rank takes rank 0's state
        if len(rows) not in (0, ctx.world_size):
            log.warning("checkpoint holds the RNG states of %d ranks, this run has %d", len(rows), ctx.world_size)
        if ctx.rank < len(rows):
            mine = rows[ctx.rank]
            method_state["generator"], torch_rng = mine["generator"].cpu(), mine["torch"].cpu()
            cuda = mine.get("cuda")   # absent when the checkpoint was written without CUDA
            if cuda and torch.cuda.is_available():
                torch.cuda.set_rng_state_all([t.cpu() for t in cuda[:torch.cuda.device_count()]])
        method.load_state_dict(method_state)
        torch.set_rng_state(torch_rng)
        step, best = int(state["step"]), float(state["best_miou"])
        log.info("resumed from %s at step %d", ckpt_path, step)
        ctx.on_resumed(step, {"student": student.state_dict(), "method": method.state_dict(),
                              "torch_rng": torch.get_rng_state(),
                              **({"teacher": teacher.state_dict()} if teacher is not None else {})})

    if len(data) < cfg.data.batch_size:
        raise InputError(train_set.root, f"{len(data)} training images, fewer than data.batch_size="
                                         f"{cfg.data.batch_size}")
    # The engine decides how batches arrive (a DataLoader here, a Ray Data shard under Ray Train); the
    # order of images is always `sample_order`, a function of the seed, the rank and the step.
    batches = ctx.batches(data, cfg, step)

    writer = None
    if ctx.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(Path(ctx.run_dir) / "tensorboard"))
    val_classes = val_set.label_space.eval_classes() if val_set is not None else ()
    scorer = None
    if tcfg.score_images:
        # Model selection without target labels (corte-ray tune): scores of the student on training images,
        # from the box's stored answers; no randomness of training is drawn, so the run is the same without it.
        from ..tune.score import SelectionScorer

        scorer = SelectionScorer(train_set, store, cfg.data.resize, tcfg.score_images, cfg.model.num_classes)

    def run_eval() -> dict:
        if val_set is None:
            return {}
        res = evaluate_model(student, val_set, val_classes, cfg.model.num_classes, device, cfg.data.resize, ctx,
                             max_images=cfg.data.val_max_images, amp=tcfg.amp)
        student.train()
        return res

    def checkpoint_state() -> dict:
        state = {"step": step, "best_miou": best, "config": cfg.to_dict(), "arch": cfg.model.student,
                 "student": student.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "method": method.state_dict(), "torch_rng": torch.get_rng_state(),   # rank 0's, as before
                 "rng_ranks": rng_states(step)}
        if teacher is not None:
            state["teacher"] = teacher.state_dict()
        if metric_head is not None:
            state.update(metric_head=metric_head.state_dict(), proxies=proxies.state_dict(),
                         metric_optimizer=metric_opt.state_dict())
        return state

    student.train()
    metrics: dict = {}
    last_ckpt: Path | None = None
    t_window, imgs_window = time.perf_counter(), 0
    window: dict[str, list[float]] = {}   # diagnostics (Python floats) averaged over each logging window
    progress = ProgressReporter(Path(ctx.run_dir), cfg.method, tcfg.iterations, step, tcfg.progress_every_s) \
        if ctx.is_main else None
    last_val: float | None = best if best >= 0 else None
    while step < tcfg.iterations:
        batch = to_device_batch(next(batches), device, channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = method.step(models, batch, step, tcfg.iterations)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower train.lr or check the labels")
        opt.zero_grad(set_to_none=True)
        if metric_opt is not None:
            metric_opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if metric_opt is not None:
            # The metric head is not in DDP (it trains on detached teacher features): average its gradients here.
            average_across_ranks([p.grad for p in metric_params if p.grad is not None], ctx)
            metric_opt.step()
        sched.step()
        # DDP averages gradients but not BatchNorm running statistics: average them, so every rank's student,
        # and so its EMA teacher (which averages buffers too), stays identical.
        average_across_ranks([b for b in student.buffers() if b.is_floating_point()], ctx)
        if metric_head is not None:
            average_across_ranks([b for b in metric_head.buffers() if b.is_floating_point()], ctx)
        if teacher is not None:
            # Every rank updates its teacher from the same student weights: teachers stay identical.
            if teacher_copy_step is not None and step + 1 == teacher_copy_step:
                teacher.reset(student)
            else:
                teacher.update(student, step=step if ramp else None)
        step += 1
        ctx.on_step(step)
        imgs_window += batch["image"].shape[0] * ctx.world_size
        for k, v in out.items():
            if isinstance(v, float):
                window.setdefault(k, []).append(v)
        if progress is not None:
            progress.update(step, batch["image"].shape[0] * ctx.world_size, last_val)

        if writer is not None and (step % tcfg.log_every == 0 or step == tcfg.iterations):
            # .item() calls are CPU-GPU sync points: only on logging steps.
            elapsed = time.perf_counter() - t_window
            writer.add_scalar("train/images_per_s", imgs_window / max(elapsed, 1e-9), step)
            writer.add_scalar("train/lr", sched.get_last_lr()[0], step)
            for k, v in out.items():
                if torch.is_tensor(v):
                    writer.add_scalar(k if "/" in k else f"train/{k}", float(v.detach()), step)
            for k, vs in window.items():
                writer.add_scalar(k if "/" in k else f"train/{k}", sum(vs) / len(vs), step)
            t_window, imgs_window, window = time.perf_counter(), 0, {}

        eval_due = tcfg.eval_every and step % tcfg.eval_every == 0
        ckpt_due = tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0
        if eval_due or ckpt_due or step == tcfg.iterations:
            metrics = {"step": step, **{k: float(v.detach() if torch.is_tensor(v) else v) for k, v in out.items()}}
            if eval_due or step == tcfg.iterations:
                res = run_eval()
                if res:
                    metrics["val_miou"] = last_val = res["miou"]
                    metrics.update({f"val_iou/{k}": v for k, v in res["per_class"].items() if v is not None})
                    if writer is not None:
                        writer.add_scalar("val/miou", res["miou"], step)
                        for k, v in res["per_class"].items():
                            if v is not None:
                                writer.add_scalar(f"val_iou/{k}", v, step)
                        writer.add_image("val/predictions", prediction_overlays(student, val_set, device,
                                                                                 cfg.data.resize), step)
                        student.train()
                if scorer is not None:
                    scores = scorer.score(student, teacher, device, ctx)
                    student.train()
                    metrics.update(scores)
                    if writer is not None:
                        for k, v in scores.items():
                            writer.add_scalar(k if "/" in k else f"unsup/{k}", v, step)
            is_best = metrics.get("val_miou", -1.0) > best
            if is_best:
                best = metrics["val_miou"]
            metrics["best_val_miou"] = best
            if ctx.world_size > 1:
                gather_rng(step)   # every rank, before rank 0 writes the checkpoint
            last_ckpt = ctx.save_checkpoint(checkpoint_state(), step, is_best) if ctx.is_main else None
            ctx.report(metrics, last_ckpt)
            if writer is not None:
                writer.flush()
            log.info("step %d/%d loss %.4f%s", step, tcfg.iterations, loss.item(),
                     f" val mIoU {metrics['val_miou']:.2f}" if "val_miou" in metrics else "")
    if writer is not None:
        writer.close()
    if progress is not None:
        progress.finish(step, last_val)
    return TrainResult(step=step, metrics=metrics, checkpoint=last_ckpt, models=models)
