"""The EMA teacher of METHODS.md 1.2 / 2.1: an exponential moving average of the student's weights.

Shaped like timm's ModelEmaV3 and MIC's EMATeacher: its own module holding a frozen deep copy,
averaging parameters *and* float buffers (BatchNorm running statistics: a teacher with averaged
weights but stale statistics predicts badly), always in eval mode, never wrapped in DDP. Every worker
keeps its own teacher; they stay identical because DDP all-reduces the student they average.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .base import unwrap_model


class EMATeacher(nn.Module):
    def __init__(self, student: nn.Module, momentum: float = 0.999) -> None:
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        # `module`, as in timm: a checkpoint of the teacher loads into a bare model once the
        # "module." prefix is stripped (load_weights does).
        self.module = copy.deepcopy(unwrap_model(student))
        self.module.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "EMATeacher":
        # The teacher predicts pseudo-labels: dropout off and BN on running statistics, whatever the
        # training loop calls on its parent module.
        return super().train(False)

    @property
    def num_classes(self) -> int:
        return self.module.num_classes

    @property
    def feature_dim(self) -> int:
        return self.module.feature_dim

    def momentum_at(self, step: int | None) -> float:
        """The mean-teacher ramp m_t = min(m, 1 - 1/(t + 1)) (Mean Teacher, DACS, MIC) at optimiser step t
        (0-based); `None` = the constant m.

        With the ramp the teacher is the running average of the student's own recent weights from the first
        step, so it is a trained student (not the random initial weights) whenever it first labels anything."""
        if step is None:
            return self.momentum
        return min(self.momentum, 1.0 - 1.0 / (step + 1))

    @torch.no_grad()
    def reset(self, student: nn.Module) -> None:
        """Copy the student's weights and buffers into the teacher (momentum 0 for one update)."""
        self.update(student, momentum=0.0)

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float | None = None, step: int | None = None) -> None:
        """theta_T <- m * theta_T + (1 - m) * theta_S for float parameters and buffers; other buffers copied.

        m = `momentum` if given, else the ramp at `step` (see `momentum_at`), else the constant momentum."""
        m = momentum if momentum is not None else self.momentum_at(step)
        student = unwrap_model(student)
        student_tensors = dict(student.named_parameters())
        student_tensors.update(student.named_buffers())
        teacher_tensors = dict(self.module.named_parameters())
        teacher_tensors.update(self.module.named_buffers())
        if student_tensors.keys() != teacher_tensors.keys():
            differing = sorted(student_tensors.keys() ^ teacher_tensors.keys())
            raise ValueError(f"student and teacher differ in parameters/buffers: {differing[:5]}")
        for name, teacher_tensor in teacher_tensors.items():
            student_tensor = student_tensors[name].detach()
            if teacher_tensor.is_floating_point():
                # lerp_(s, w) = t + w (s - t) = (1 - w) t + w s, with w = 1 - m.
                teacher_tensor.lerp_(student_tensor.to(teacher_tensor.dtype), 1.0 - m)
            else:
                # Integer buffers (BN's num_batches_tracked) are counters, not weights: averaging them is meaningless.
                teacher_tensor.copy_(student_tensor)

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.module.forward_features(x)
