"""The local engine through its real interfaces: label -> adapt -> checkpoints, metrics, TensorBoard;
an interrupted run resumed with --resume ends bit-identical to an uninterrupted one; export parity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from corte_ray.cli import main
from corte_ray.config import load_config
from corte_ray.models import build_source_model
from corte_ray.export import export_model


@pytest.fixture(scope="module")
def box_and_store(tiny_bench, tmp_path_factory):
    """A (random, untrained) source model behind the black-box interface, and its label store."""
    work = tmp_path_factory.mktemp("box")
    torch.manual_seed(0)
    model = build_source_model("deeplabv3_resnet18", num_classes=19).eval()
    box = work / "box.pt"
    export_model(model, box, example_size=(64, 96), meta={"arch": "deeplabv3_resnet18"})
    store = work / "labels"
    assert main(["-q", "label", "--engine", "local", "--dataset", "synth", "--root", str(tiny_bench), "--blackbox", f"file:{box}",
                 "--out", str(store), "--device", "cpu"]) == 0
    return box, store


def _adapt(run: Path, bench: Path, store: Path, *extra: str) -> int:
    return main(["-q", "adapt", "--engine", "local", "--out", str(run), "--method", "corte", "--dataset", "synth",
                 "--root", str(bench),
                 "--label-store", str(store), "--student", "mobilenetv3_small_lraspp", "--device", "cpu",
                 "data.batch_size=4", "data.crop_size=[48,64]", "train.lr_warmup=1", "train.eval_every=3",
                 "train.checkpoint_every=3", "corte.warmup=0.2", "corte.refine_start=0.4", "ema.momentum=0.9",
                 *extra])


def test_interrupted_then_resumed_equals_uninterrupted(tiny_bench, box_and_store, tmp_path):
    _, store = box_and_store
    full, part = tmp_path / "full", tmp_path / "part"
    assert _adapt(full, tiny_bench, store, "train.iterations=6") == 0
    # The same run, but with a schedule that stops at step 3 checkpointed...
    assert _adapt(part, tiny_bench, store, "train.iterations=6", "train.checkpoint_every=3") == 0
    ck = sorted((part / "checkpoints").glob("step_*"))
    assert [p.name for p in ck] == ["step_0000003", "step_0000006"]
    import shutil

    shutil.rmtree(ck[-1])                    # ... killed before it wrote step 6
    assert main(["-q", "adapt", "--out", str(part), "--resume"]) == 0
    a = torch.load(full / "checkpoints" / "step_0000006" / "checkpoint.pt", weights_only=True)
    b = torch.load(part / "checkpoints" / "step_0000006" / "checkpoint.pt", weights_only=True)
    for key in ("student", "teacher"):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), f"{key}.{name} differs after resume"
    assert a["method"]["teacher_thresholds"]["mean"].tolist() == b["method"]["teacher_thresholds"]["mean"].tolist()
    lines = [json.loads(l) for l in (full / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [3, 6] and all(0 <= l["val_miou"] <= 100 for l in lines)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(full / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()
    assert {"val/miou", "train/lr", "train/images_per_s", "train/loss", "labels/kept_box", "labels/filled"} <= set(tags["scalars"])
    assert any(t.startswith("val_iou/") for t in tags["scalars"]) and "val/predictions" in tags["images"]
    assert (full / "config.yaml").exists() and load_config(full / "config.yaml").method == "corte"


def test_new_run_refuses_an_existing_run_dir(tiny_bench, box_and_store, tmp_path, capsys):
    _, store = box_and_store
    run = tmp_path / "run"
    assert _adapt(run, tiny_bench, store, "train.iterations=1") == 0
    capsys.readouterr()
    assert _adapt(run, tiny_bench, store, "train.iterations=1") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(run) in err and "--resume" in err


def test_missing_label_store_and_bad_key_are_one_line_errors(tiny_bench, tmp_path, capsys):
    assert _adapt(tmp_path / "r1", tiny_bench, tmp_path / "nostore", "train.iterations=1") == 2
    err = capsys.readouterr().err.strip()
    assert "nostore" in err and err.count("\n") == 0
    assert _adapt(tmp_path / "r2", tiny_bench, tmp_path / "nostore", "corte.rc_scal=1") == 2
    assert "corte.rc_scal: unknown config key (did you mean corte.rc_scale?)" in capsys.readouterr().err


def test_export_checkpoint_cli_parity(tiny_bench, box_and_store, tmp_path, capsys):
    _, store = box_and_store
    run = tmp_path / "run"
    assert _adapt(run, tiny_bench, store, "train.iterations=2", "train.checkpoint_every=2") == 0
    ckpt = run / "checkpoints" / "step_0000002" / "checkpoint.pt"
    for fmt, name in (("torchscript", "student.pt"), ("onnx", "student.onnx")):
        assert main(["export", str(ckpt), "--format", fmt, "--out", str(tmp_path / name)]) == 0
        assert "max |diff|" in capsys.readouterr().out


def test_store_refuses_answers_of_another_kind(tmp_path):
    from corte_ray.blackbox.store import LabelStoreWriter, encode_answer
    from corte_ray.errors import InputError
    import numpy as np

    w = LabelStoreWriter(tmp_path / "s", {"answer_kind": "topk", "k": 2, "num_classes": 3})
    hard_row = encode_answer("img1", "hard", 3, hard=np.zeros((2, 2), np.uint8))
    with pytest.raises(InputError, match="answered hard labels for 'img1'"):
        w.write_part([hard_row])
    assert not list((tmp_path / "s" / "parts").glob("*.parquet"))


def test_budget_needs_the_ray_engine(tiny_bench, box_and_store, tmp_path, capsys):
    box, _ = box_and_store
    assert main(["label", "--engine", "local", "--budget", "3", "--dataset", "synth", "--root", str(tiny_bench),
                 "--blackbox", f"file:{box}", "--out", str(tmp_path / "s")]) == 2
    assert "--budget" in capsys.readouterr().err
