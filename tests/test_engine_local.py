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


def _batches(n: int, b: int, start: int, count: int, rank: int = 0) -> list[list[int]]:
    from corte_ray.train.loop import sample_order

    it = iter(sample_order(n, b, seed=3, rank=rank, start_step=start))
    return [[next(it) for _ in range(b)] for _ in range(count)]


@pytest.mark.parametrize("n, b", [(13, 4), (12, 5), (11, 4), (12, 4), (9, 9)])
def test_sample_order_resumed_at_any_step_continues_the_same_batches(n, b):
    from corte_ray.train.loop import sample_order

    per_epoch = n // b
    total = 3 * per_epoch + 2                       # into the fourth epoch
    full = _batches(n, b, 0, total)
    for s in range(1, total):                       # inside epochs and on their boundaries
        assert _batches(n, b, s, total - s) == full[s:], f"resumed at step {s}"
    for e in range(3):                              # an epoch: whole batches of distinct images
        epoch = sum(full[e * per_epoch:(e + 1) * per_epoch], [])
        assert len(set(epoch)) == len(epoch) == per_epoch * b
    assert _batches(n, b, 0, total, rank=1) != full  # each rank has its own order
    sampler = sample_order(n, b, seed=3, rank=0, start_step=2)
    assert [next(iter(sampler)) for _ in range(2)] == [full[2][0]] * 2   # iterating again starts again


def test_local_batches_resumed_at_any_step_continues_the_same_batches():
    """The DataLoader path (drop_last over an endless sampler) with 13 images in batches of 4."""
    import numpy as np

    from corte_ray.train.loop import local_batches

    class Indices(torch.utils.data.Dataset):
        def __len__(self):
            return 13

        def __getitem__(self, i):
            return {"image": np.full((3, 1, 1), i, dtype=np.uint8)}

    cfg = load_config(None, ["data.batch_size=4", "train.seed=3"])

    def run(start: int, count: int) -> list[list[int]]:
        it = local_batches(Indices(), cfg, 0, start)
        return [next(it)["image"][:, 0, 0, 0].tolist() for _ in range(count)]

    full = run(0, 11)
    assert full == _batches(13, 4, 0, 11)
    for s in (2, 3, 4, 6, 9):
        assert run(s, 11 - s) == full[s:], f"resumed at step {s}"


def test_interrupted_then_resumed_equals_uninterrupted(tiny_bench, box_and_store, tmp_path):
    from corte_ray.data.datasets import open_dataset
    from corte_ray.pipeline import adapt
    from tests.engine_hooks import Killed, TestHooks

    _, store = box_and_store
    # Batches of 5 from 12 images: every epoch has a remainder, as real data sets do (Cityscapes: 2975 % 8 = 7),
    # and the step-3 checkpoint falls inside the second epoch.
    batch = 5
    assert len(open_dataset("synth", tiny_bench, split="train")) % batch != 0
    run_args = (f"data.batch_size={batch}", "train.iterations=6", "train.checkpoint_every=3")
    full, part = tmp_path / "full", tmp_path / "part"
    assert _adapt(full, tiny_bench, store, *run_args) == 0

    # The same run, killed after step 4 (checkpointed at step 3)...
    with pytest.raises(Killed):
        adapt(load_config(full / "config.yaml"), part, hooks=TestHooks(raise_at=4))   # the CLI's resolved config
    assert [p.name for p in (part / "checkpoints").glob("step_*")] == ["step_0000003"]
    # ... and resumed: it must run steps 4..6 only (a run that ignored its checkpoint would end with the same
    # weights, having started again at step 1).
    ran: list[int] = []
    adapt(None, part, resume=True, hooks=TestHooks(steps=ran))
    assert ran == [4, 5, 6]
    assert [json.loads(l)["step"] for l in (part / "metrics.jsonl").read_text().splitlines()] == [3, 6]
    a = torch.load(full / "checkpoints" / "step_0000006" / "checkpoint.pt", weights_only=True)
    b = torch.load(part / "checkpoints" / "step_0000006" / "checkpoint.pt", weights_only=True)
    for key in ("student", "teacher"):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), f"{key}.{name} differs after resume"
    assert a["method"]["teacher_thresholds"]["mean"].tolist() == b["method"]["teacher_thresholds"]["mean"].tolist()
    assert len(a["rng_ranks"]) == len(b["rng_ranks"]) == 1
    best = torch.load(full / "checkpoints" / "best" / "checkpoint.pt", weights_only=True)   # a real path
    assert best["best_miou"] == max(json.loads(l)["val_miou"] for l in (full / "metrics.jsonl").read_text().splitlines())
    for key in ("torch", "generator"):
        assert torch.equal(a["rng_ranks"][0][key], b["rng_ranks"][0][key]), f"RNG {key} differs after resume"
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
    from corte_ray.blackbox.store import LabelStoreWriter, encode_store_row
    from corte_ray.errors import InputError
    import numpy as np

    w = LabelStoreWriter(tmp_path / "s", {"answer_kind": "topk", "k": 2, "num_classes": 3})
    hard_row = encode_store_row("img1", "hard", 3, hard=np.zeros((2, 2), np.uint8))
    with pytest.raises(InputError, match="answered hard labels for 'img1'"):
        w.write_part([hard_row])
    assert not list((tmp_path / "s" / "parts").glob("*.parquet"))


def test_budget_needs_the_ray_engine(tiny_bench, box_and_store, tmp_path, capsys):
    box, _ = box_and_store
    assert main(["label", "--engine", "local", "--budget", "3", "--dataset", "synth", "--root", str(tiny_bench),
                 "--blackbox", f"file:{box}", "--out", str(tmp_path / "s")]) == 2
    assert "--budget" in capsys.readouterr().err


def test_teacher_errors_benchmark_reads_a_runs_checkpoint(tiny_bench, box_and_store, tmp_path):
    # benchmarks/teacher_errors.py, as a user runs it, on a real run's checkpoint: its pixel shares partition the
    # labelled pixels, and the model's overall accuracy is their pixel-weighted mean (the parts are measured apart).
    import subprocess
    import sys

    box, store = box_and_store
    run = tmp_path / "run"
    assert _adapt(run, tiny_bench, store, "train.iterations=3") == 0
    out = tmp_path / "te.json"
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "teacher_errors.py"), "--run", str(run),
                           "--checkpoint", "step_0000003", "--root", str(tiny_bench), "--store", str(store),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "R2CP kept, box wrong" in proc.stdout and "command: python benchmarks/teacher_errors.py" in proc.stdout
    r = json.loads(out.read_text())
    assert r["step"] == 3 and r["model"] == "teacher" and r["teacher_scale"] == 1.0   # the run's beta
    parts = ("kept_right", "kept_wrong", "dropped")
    assert abs(sum(r["pixel_share"][k] for k in parts) - 100.0) < 1e-6
    mixed = sum(r["pixel_share"][k] * r["model_accuracy"][k] for k in parts) / 100.0
    assert abs(mixed - r["model_accuracy"]["all"]) < 1e-6
    missing = subprocess.run([sys.executable, str(root / "benchmarks" / "teacher_errors.py"), "--run", str(run),
                              "--checkpoint", "step_9", "--root", str(tiny_bench), "--store", str(store)],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "no checkpoint at" in missing.stderr
    # --beta sets the override bar: at 0 every contradiction of a kept label counts as confident.
    loose = subprocess.run([sys.executable, str(root / "benchmarks" / "teacher_errors.py"), "--run", str(run),
                            "--checkpoint", "step_0000003", "--root", str(tiny_bench), "--store", str(store),
                            "--beta", "0", "--out", str(tmp_path / "te0.json")], capture_output=True, text=True,
                           timeout=300)
    assert loose.returncode == 0, loose.stderr
    r0 = json.loads((tmp_path / "te0.json").read_text())
    assert r0["teacher_scale"] == 0.0
    assert r0["override"]["confident only"]["pixel_share"] >= r["override"]["confident only"]["pixel_share"]


def test_label_rules_benchmark_matches_the_store_it_reads(tiny_bench, tmp_path):
    # benchmarks/label_rules.py, as a user runs it: its R2CP and raw rows equal the kept share and accuracy counted
    # here directly from the label store and the ground truth, and a stricter rule keeps fewer pixels.
    import subprocess
    import sys

    import numpy as np

    from corte_ray.blackbox.store import LabelStore
    from corte_ray.data.datasets import open_dataset

    # A random model's probabilities are near uniform (rc quantises to 0, every rule keeps every pixel): scale its
    # logits so that its rc spreads and the rules differ.
    class Sharp(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return 40.0 * self.inner(x)

    torch.manual_seed(1)
    box = tmp_path / "sharp.pt"
    export_model(Sharp(build_source_model("deeplabv3_resnet18", num_classes=19).eval()), box, example_size=(64, 96),
                 meta={"arch": "deeplabv3_resnet18"})
    store_dir = tmp_path / "labels"
    assert main(["-q", "label", "--engine", "local", "--dataset", "synth", "--root", str(tiny_bench), "--blackbox",
                 f"file:{box}", "--out", str(store_dir), "--device", "cpu"]) == 0
    out = tmp_path / "lr.json"
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "label_rules.py"), "--root", str(tiny_bench),
                           "--store", str(store_dir), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "command: python benchmarks/label_rules.py" in proc.stdout
    r = json.loads(out.read_text())["rules"]
    store = LabelStore(store_dir)
    means = store.class_mean_rc()
    tau = np.where(np.isnan(means), 1.0, means)
    ds = open_dataset("synth", tiny_bench, split="train")
    valid = kept = kept_right = raw_right = dropped_top2 = 0
    for sample in ds.samples:
        gt = ds.read_label(sample).astype(np.int64)
        box = store.get(sample.key)
        v = gt != 255
        k = v & (box.rc >= tau[box.top1.astype(np.int64)])
        valid += int(v.sum())
        kept += int(k.sum())
        kept_right += int((k & (box.top1 == gt)).sum())
        raw_right += int((v & (box.top1 == gt)).sum())
        dropped_top2 += int((v & ~k & ((box.top1 == gt) | (box.top2 == gt))).sum())
    r2cp, raw = r["R2CP, rc >= tau_c (corte)"], r["raw top-1 (distill)"]
    assert abs(r2cp["kept_share"] - 100.0 * kept / valid) < 1e-9
    assert abs(r2cp["accuracy"] - 100.0 * kept_right / kept) < 1e-9
    assert raw["kept_share"] == 100.0 and abs(raw["accuracy"] - 100.0 * raw_right / valid) < 1e-9
    assert 0 < r2cp["kept_share"] < 100 and r["rc >= 1.25 tau_c"]["kept_share"] < r2cp["kept_share"]
    # What the dropped pixels hold: their share, the box's top-1 accuracy there, the truth in its top 2.
    d = json.loads(out.read_text())["r2cp_dropped"]
    dropped, dropped_right = valid - kept, raw_right - kept_right
    assert abs(d["share"] - 100.0 * dropped / valid) < 1e-9
    assert abs(d["top1_accuracy"] - 100.0 * dropped_right / dropped) < 1e-9
    assert abs(d["top2_holds_truth"] - 100.0 * dropped_top2 / dropped) < 1e-9
    assert d["top2_holds_truth"] >= d["top1_accuracy"]
    assert f"R2CP drops {d['share']:.1f}% of the pixels" in proc.stdout


def test_rounds_relabel_with_the_student_and_resume_where_they_stopped(tiny_bench, box_and_store, tmp_path):
    # `adapt --rounds 2`: round 1 trains on the box's labels in RUN/rounds/1, its final student (exported to
    # RUN/rounds/1/student.pt) labels the target images into RUN/rounds/labels_2, and the last round continues that
    # student on those labels in RUN itself. A run killed in round 2 resumes there: round 1 is not trained again,
    # the images are not labelled again, and the final weights are the uninterrupted run's.
    import numpy as np

    from corte_ray.blackbox.store import LabelStore
    from corte_ray.export import load_model_file
    from corte_ray.pipeline import adapt
    from tests.engine_hooks import Killed, TestHooks

    _, store = box_and_store
    args = ("train.rounds=2", "train.iterations=3", "train.checkpoint_every=1")
    full = tmp_path / "full"
    assert _adapt(full, tiny_bench, store, *args) == 0
    assert (full / "rounds" / "1" / "checkpoints" / "step_0000003").is_dir()
    relabelled = LabelStore(full / "rounds" / "labels_2")
    box_store = LabelStore(store)
    keys = box_store.keys()
    assert sorted(relabelled.keys()) == sorted(keys)
    # The new labels are the round-1 student's answers, not the box's.
    student = load_model_file(full / "rounds" / "1" / "student.pt")
    from corte_ray.data.datasets import open_dataset

    ds = open_dataset("synth", tiny_bench, split="train")
    sample = ds.samples[0]
    image = torch.from_numpy(ds.read_image(sample)).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        top1 = student(image).argmax(1)[0].numpy()
    assert np.array_equal(relabelled.get(sample.key).top1, top1)
    assert not all(np.array_equal(relabelled.get(k).top1, box_store.get(k).top1) for k in keys)
    final = torch.load(full / "checkpoints" / "step_0000003" / "checkpoint.pt", weights_only=True)
    assert final["config"]["blackbox"]["label_store"] == str(full / "rounds" / "labels_2")
    # Round 2 starts warm from round 1's final student, at train.round_lr_scale x lr.
    user = load_config(full / "config.yaml")
    assert final["config"]["model"]["weights"] == str(full / "rounds" / "1" / "checkpoints" / "step_0000003" /
                                                      "checkpoint.pt")
    assert final["config"]["train"]["lr"] == pytest.approx(user.train.round_lr_scale * user.train.lr)

    class KillInRound2(TestHooks):
        def on_step(self, ctx, step):
            super().on_step(ctx, step)
            if Path(str(ctx.run_dir)) == part and step == 2:
                raise Killed

    part = tmp_path / "part"
    with pytest.raises(Killed):
        adapt(load_config(full / "config.yaml"), part, hooks=KillInRound2())
    label_parts = sorted(p.name for p in (part / "rounds" / "labels_2").rglob("*.parquet"))
    assert label_parts and [p.name for p in (part / "checkpoints").glob("step_*")] == ["step_0000001"]
    ran: list[int] = []
    adapt(None, part, resume=True, hooks=TestHooks(steps=ran))
    assert ran == [2, 3]   # neither round 1 (3 steps) nor round 2's checkpointed first step runs again
    assert sorted(p.name for p in (part / "rounds" / "labels_2").rglob("*.parquet")) == label_parts
    resumed = torch.load(part / "checkpoints" / "step_0000003" / "checkpoint.pt", weights_only=True)
    for key in ("student", "teacher"):
        for name, t in final[key].items():
            assert torch.equal(t, resumed[key][name]), f"{key}.{name} differs after resume"


def test_round_config_warm_fresh_and_length(tmp_path):
    from corte_ray.pipeline import round_config

    cfg = load_config(None, ["train.lr=0.01", "train.iterations=300", "train.round_iterations=100",
                             "train.rounds=3", "model.weights=init.pt"])
    first = round_config(cfg, 1, tmp_path / "labels")
    assert (first.train.lr, first.train.iterations, first.model.weights, first.train.rounds) == \
        (0.01, 300, "init.pt", 1)
    assert first.blackbox.label_store == str(tmp_path / "labels") and first.blackbox.spec == ""
    warm = round_config(cfg, 2, tmp_path / "labels_2", tmp_path / "prev.pt")
    assert (warm.train.lr, warm.train.iterations, warm.model.weights) == \
        (pytest.approx(0.002), 100, str(tmp_path / "prev.pt"))
    fresh = round_config(load_config(None, ["train.round_start=fresh", "train.rounds=2"]), 2, tmp_path, "prev.pt")
    assert fresh.model.weights is None


def test_rounds_need_a_method_trained_on_box_labels(tiny_bench, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["-q", "adapt", "--engine", "local", "--out", str(run), "--method", "oracle", "--dataset", "synth",
                 "--root", str(tiny_bench), "--rounds", "2", "--device", "cpu"]) != 0
    assert "train.rounds: method oracle does not train on black-box labels" in capsys.readouterr().err
    assert not (run / "config.yaml").exists()
