"""The EMA teacher is a trained student when it first labels anything (docs/methods.md, "Teacher start"), and
STvM starts from the white-box source model or not at all."""

from __future__ import annotations

import pytest
import torch

from corte_ray.cli import main
from corte_ray.config import load_config
from corte_ray.export import export_model
from corte_ray.models import EMATeacher, build_model, build_source_model
from corte_ray.train.context import LocalContext
from corte_ray.train.loop import train


def test_ramp_momentum():
    t = EMATeacher(torch.nn.Linear(2, 2), momentum=0.99)
    assert t.momentum_at(0) == 0.0                       # the first update copies the student
    assert t.momentum_at(9) == pytest.approx(0.9)
    assert t.momentum_at(10_000) == 0.99                 # capped at m
    assert t.momentum_at(None) == 0.99


@pytest.fixture(scope="module")
def store(tiny_bench, tmp_path_factory):
    work = tmp_path_factory.mktemp("box")
    torch.manual_seed(0)
    box = work / "box.pt"
    export_model(build_source_model("deeplabv3_resnet18", num_classes=19).eval(), box, example_size=(64, 96),
                 meta={"arch": "deeplabv3_resnet18"})
    assert main(["-q", "label", "--engine", "local", "--dataset", "synth", "--root", str(tiny_bench),
                 "--blackbox", f"file:{box}", "--out", str(work / "labels"), "--device", "cpu"]) == 0
    from corte_ray.blackbox.store import LabelStore

    return LabelStore(work / "labels")


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


@pytest.mark.parametrize("start", ["ramp", "copy", "init"])
def test_teacher_is_a_trained_student_when_refinement_begins(start, tiny_bench, store, tmp_path):
    """Train up to the step where refinement starts; the teacher must then sit near the student it averages, far
    from the random initial weights. `init` (constant m from a copy of the initial student, the old behaviour)
    fails that, which is what makes the test able to fail."""
    refine_at = 12
    cfg = load_config(None, [
        "method=corte", "model.student=mobilenetv3_small_lraspp", "data.dataset=synth", f"data.root={tiny_bench}",
        "data.batch_size=4", "data.crop_size=[48,64]", "data.val_split=", "train.device=cpu", "train.lr=5e-3",
        "train.lr_warmup=1", f"train.iterations={refine_at}", "train.eval_every=0", "train.checkpoint_every=0",
        "corte.warmup=0.5", "corte.refine_start=1.0", "ema.momentum=0.999", f"ema.start={start}",
        "train.progress_every_s=0"])
    result = train(cfg, LocalContext(tmp_path, torch.device("cpu")), store)
    torch.manual_seed(cfg.train.seed)                     # the loop builds the student under this seed
    init = _flat(build_model(cfg.model.student, 19))
    student, teacher = _flat(result.models.student), _flat(result.models.teacher.module)
    moved = (student - init).norm()
    to_student, to_init = (teacher - student).norm() / moved, (teacher - init).norm() / moved
    if start == "init":
        assert to_init < 0.05, (to_init, to_student)      # still the random initial weights
    else:
        assert to_student < 0.5 < to_init, (to_init, to_student)


def test_stvm_refuses_to_start_without_source_weights(tiny_bench, tmp_path, capsys):
    run = tmp_path / "stvm"
    code = main(["-q", "adapt", "--engine", "local", "--out", str(run), "--method", "stvm", "--dataset", "synth",
                 "--root", str(tiny_bench), "--device", "cpu"])
    assert code != 0
    err = capsys.readouterr().err
    assert "model.weights" in err and "--source-checkpoint" in err
    assert not (run / "config.yaml").exists()             # nothing left behind to block the corrected command


def test_stvm_starts_from_the_source_checkpoint_without_a_label_store(tiny_bench, tmp_path):
    """`--source-checkpoint` sets the architecture and the weights; no black box or label store is needed, and
    the student at step 0 is the source model."""
    src = tmp_path / "source"
    assert main(["-q", "train-source", "--out", str(src), "--dataset", "synth", "--root", str(tiny_bench),
                 "--arch", "mobilenetv3_small_lraspp", "--model-file", str(tmp_path / "box.pt"), "train.device=cpu",
                 "data.train_split=source", "data.val_split=", "data.batch_size=4", "data.crop_size=[48,64]",
                 "train.iterations=2", "train.checkpoint_every=2", "train.eval_every=0"]) == 0
    ckpt = sorted(src.glob("checkpoints/step_*/checkpoint.pt"))[-1]
    run = tmp_path / "stvm"
    assert main(["-q", "adapt", "--engine", "local", "--out", str(run), "--method", "stvm", "--dataset", "synth",
                 "--root", str(tiny_bench), "--source-checkpoint", str(ckpt), "--device", "cpu",
                 "data.batch_size=4", "data.crop_size=[48,64]", "train.iterations=1", "train.lr=1e-12",
                 "train.lr_warmup=0", "train.eval_every=0", "train.checkpoint_every=1"]) == 0
    saved = load_config(run / "config.yaml")
    assert saved.model.student == "mobilenetv3_small_lraspp" and saved.model.weights == str(ckpt)
    assert not (run / "labels").exists()
    source = torch.load(ckpt, weights_only=True)["student"]
    after = torch.load(sorted(run.glob("checkpoints/step_*/checkpoint.pt"))[-1], weights_only=True)["teacher"]
    # lr ~ 0: one step leaves the weights where the source model put them (BN statistics move; weights do not).
    key = next(k for k in source if k.endswith("conv_stem.weight"))
    assert torch.allclose(after[f"module.{key}"], source[key], atol=1e-6)
