"""Bad input and faults outside the black box's wire: each feeds one and asserts the one-line error naming the
file, the recovery, or the exact store contents (issue 11)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from corte_ray.blackbox import LocalBlackBox
from corte_ray.blackbox.store import LabelStore, LabelStoreWriter, label_dataset_local
from corte_ray.cli import main
from corte_ray.data.datasets import open_dataset
from corte_ray.errors import CorteError, InputError
from corte_ray.export import export_model
from corte_ray.io_utils import append_line
from tests.tiny_net import TinySegNet

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hard_box") / "box.pt"
    return export_model(TinySegNet().eval(), path, example_size=(16, 24), meta={"arch": "tiny"})


def one_line_error(capsys, command: str) -> str:
    """The error line of a failed command (log lines before it are fine; a traceback is not)."""
    out = capsys.readouterr().err.strip()
    assert "Traceback" not in out, out
    err = out.splitlines()[-1]
    assert err.startswith(f"corte-ray {command}: error:"), out
    return err


def image_folder(root: Path, n: int, size=(16, 16), seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(root / f"img{i:03d}.png")
    return root


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("kind", ["binary", "directory"])
def test_a_binary_or_directory_config_is_a_one_line_error(tmp_path, capsys, kind):
    path = tmp_path / "cfg.yaml"
    if kind == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    else:
        path.mkdir()
    assert main(["adapt", "--out", str(tmp_path / "run"), "--engine", "local", "--config", str(path)]) == 2
    err = one_line_error(capsys, "adapt")
    assert str(path) in err and ("not text" in err or "is a directory" in err)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------- unwritable out
def test_an_out_that_cannot_be_written_is_a_one_line_error(tiny_bench, tmp_path, capsys, model_file):
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    from corte_ray.config import Config

    cfg = Config(method="distill")
    cfg.model.num_classes = 19
    from corte_ray.models import build_model

    model = build_model(cfg.model.student, 19)
    torch.save({"config": cfg.to_dict(), "student": model.state_dict(), "step": 0}, ckpt_dir / "checkpoint.pt")
    cases = [
        ("predict", ["predict", str(ckpt_dir), "--dataset", "synth", "--root", str(tiny_bench), "--split", "val",
                     "--out", str(blocker / "preds"), "--device", "cpu"]),
        ("export", ["export", str(ckpt_dir), "--out", str(blocker / "m.pt"), "--size", "32x32"]),
    ]
    preds = tmp_path / "preds"
    preds.mkdir()
    for n in range(4):   # an all-zero prediction per val image: evaluate runs, then cannot write its JSON
        sample = open_dataset("synth", tiny_bench, split="val").samples[n]
        Image.fromarray(np.zeros((64, 96), np.uint8)).save(preds / sample.pred_name)
    cases.append(("evaluate", ["evaluate", "--dataset", "synth", "--root", str(tiny_bench), "--predictions",
                               str(preds), "--json", str(blocker / "r.json")]))
    for command, argv in cases:
        assert main(argv) == 2, command
        err = one_line_error(capsys, command)
        assert str(blocker) in err and "cannot write" in err, err


# ------------------------------------------------------------------------------------- checkpoints
def _write_run(tiny_bench, out: Path, iterations: int) -> list[str]:
    return ["adapt", "--out", str(out), "--engine", "local", "--method", "oracle", "--dataset", "synth", "--root",
            str(tiny_bench), "train.iterations=" + str(iterations), "train.checkpoint_every=2", "train.eval_every=0",
            "train.keep_checkpoints=3", "data.batch_size=2", "data.crop_size=[32,32]", "data.val_split=",
            "model.student=mobilenetv3_lraspp", "train.progress_every_s=0", "train.device=cpu"]


def test_resume_skips_a_truncated_newest_checkpoint(tiny_bench, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_write_run(tiny_bench, out, 4)) == 0
    newest = out / "checkpoints" / "step_0000004" / "checkpoint.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 3])      # a copy cut short
    config = out / "config.yaml"
    config.write_text(config.read_text().replace("iterations: 4", "iterations: 6"))
    capsys.readouterr()
    assert main(["adapt", "--out", str(out), "--resume"]) == 0
    log = capsys.readouterr().err   # the CLI logs to stderr
    assert f"{newest}: damaged checkpoint skipped" in log
    assert "resumed from " + str(out / "checkpoints" / "step_0000002" / "checkpoint.pt") in log
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 4, 6]   # the first run's 2 and 4, then 4 again from step 2, and 6


def test_a_failed_new_run_leaves_no_run_behind(tiny_bench, tmp_path, capsys):
    out = tmp_path / "run"
    argv = _write_run(tiny_bench, out, 2)
    bad = list(argv)
    bad[bad.index("--root") + 1] = str(tmp_path / "missing")
    assert main(bad) == 2
    assert str(tmp_path / "missing") in one_line_error(capsys, "adapt")
    assert not (out / "config.yaml").exists()
    assert main(argv) == 0      # the corrected command is not refused


def test_a_failure_after_the_run_dir_exists_undoes_its_config(tiny_bench, tmp_path, capsys):
    out = tmp_path / "run"
    argv = _write_run(tiny_bench, out, 2) + ["data.batch_size=64"]   # more than the 12 images: fails in train()
    assert main(argv) == 2
    assert "fewer than data.batch_size" in one_line_error(capsys, "adapt")
    assert not (out / "config.yaml").exists()
    assert main(argv[:-1]) == 0


# ---------------------------------------------------------------------------------------- metrics log
def test_append_line_cuts_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo')   # what a kill in the middle of a buffered write leaves
    append_line(path, json.dumps({"step": 3}))
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 3]


def test_a_killed_writer_never_leaves_a_torn_metrics_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    code = (f"import json, sys; sys.path.insert(0, {str(REPO)!r}); from corte_ray.io_utils import append_line\n"
            f"i = 0\nwhile True:\n    append_line({str(path)!r}, json.dumps({{'step': i, 'pad': 'x' * 300}})); i += 1\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    time.sleep(1.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lines = path.read_text().splitlines()
    assert len(lines) > 3 and path.read_bytes().endswith(b"\n")
    assert [json.loads(line)["step"] for line in lines] == list(range(len(lines)))


# ------------------------------------------------------------------------------------- label store
def label_folder(tmp_path, model_file, n=10, **options):
    folder = image_folder(tmp_path / "images", n)
    dataset = open_dataset("folder", folder, split="train")
    with LocalBlackBox(model_file, answer="probs", device="cpu") as box:
        return dataset, label_dataset_local(dataset, box, tmp_path / "store", batch_size=3, **options)


def test_one_part_per_batch(tmp_path, model_file):
    _, doc = label_folder(tmp_path, model_file, n=10)
    parts = sorted((tmp_path / "store" / "parts").glob("*.parquet"))
    assert len(parts) == 4 and doc["run"]["labelled"] == 10   # 3 + 3 + 3 + 1: a kill loses one batch at most


class CountingBox(LocalBlackBox):
    """Counts the images it is asked about; dies (as a kill would) after `die_after` batches."""

    def __init__(self, *args, die_after: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.asked, self.batches, self.die_after = [], 0, die_after

    def query(self, images):
        if self.die_after is not None and self.batches == self.die_after:
            raise KeyboardInterrupt
        self.batches += 1
        self.asked.append(len(images))
        return super().query(images)


def test_an_interrupted_local_labelling_job_loses_at_most_one_batch(tmp_path, model_file):
    folder = image_folder(tmp_path / "images", 10)
    dataset = open_dataset("folder", folder, split="train")
    with CountingBox(model_file, device="cpu", die_after=2) as box, pytest.raises(KeyboardInterrupt):
        label_dataset_local(dataset, box, tmp_path / "store", batch_size=3)
    with CountingBox(model_file, device="cpu") as box:
        label_dataset_local(dataset, box, tmp_path / "store", batch_size=3)
        assert sum(box.asked) == 4        # the 6 answers of the first run were kept: nothing asked twice
    store = LabelStore(tmp_path / "store")
    assert len(store) == store.row_count() == 10


def test_label_skip_bad_skips_and_counts(tmp_path, model_file, capsys):
    folder = image_folder(tmp_path / "images", 5)
    (folder / "img002.png").write_bytes(b"\x89PNG not really")
    argv = ["label", "--engine", "local", "--dataset", "folder", "--root", str(folder), "--out",
            str(tmp_path / "store"), "--blackbox", f"file:{model_file}", "--device", "cpu"]
    assert main(argv) == 2
    assert "img002.png" in one_line_error(capsys, "label")
    assert main(argv + ["--skip-bad"]) == 0
    assert "4 images; 1 unreadable images skipped" in capsys.readouterr().out
    assert LabelStore(tmp_path / "store").keys() == ["img000", "img001", "img003", "img004"]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_part_is_named_moved_aside_and_relabelled(tmp_path, model_file, damage, caplog, capsys):
    dataset, _ = label_folder(tmp_path, model_file, n=7)
    store_dir = tmp_path / "store"
    before = {key: LabelStore(store_dir).get(key).top1.copy() for key in LabelStore(store_dir).keys()}
    part = next(p for p in sorted((store_dir / "parts").glob("*.parquet"))
                if len(json.loads((p.parent / (p.name + ".json")).read_text())["keys"]) == 3)
    data = bytearray(part.read_bytes())
    if damage == "truncate":
        part.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2] ^= 0xFF          # one flipped byte: Parquet itself may well read it back
        part.write_bytes(bytes(data))
    damaged_keys = json.loads((part.parent / (part.name + ".json")).read_text())["keys"]
    # Reading the store (what adapt does): one line naming the part.
    with pytest.raises(InputError, match="damaged label-store part") as err:
        LabelStore(store_dir)
    assert str(part) in str(err.value) and "\n" not in str(err.value)
    # The next label run moves it aside and relabels exactly its keys.
    with CountingBox(model_file, device="cpu") as box:
        doc = label_dataset_local(dataset, box, store_dir, batch_size=3)
        assert sum(box.asked) == len(damaged_keys) == 3
    assert doc["run"]["damaged_parts"] == 1 and (store_dir / "damaged" / part.name).exists()
    assert str(part) in caplog.text
    store = LabelStore(store_dir)
    assert len(store) == store.row_count() == 7
    for key, top1 in before.items():
        assert np.array_equal(store.get(key).top1, top1)


def test_a_store_refuses_rows_of_another_split_or_size(tmp_path, model_file):
    dataset, _ = label_folder(tmp_path, model_file, n=3)
    with LocalBlackBox(model_file, device="cpu") as box:
        with pytest.raises(InputError, match="existing store has resize=None, this job \\[16, 24\\]"):
            label_dataset_local(dataset, box, tmp_path / "store", resize=(16, 24))
        other = open_dataset("synth", Path(__file__).parent, split="train") if False else None  # noqa: F841
        meta = json.loads((tmp_path / "store" / "meta.json").read_text())
        with pytest.raises(InputError, match="existing store has split='train', this job 'val'"):
            LabelStoreWriter(tmp_path / "store", {**meta, "split": "val"})


def test_thresholds_are_over_the_split_trained_on(tmp_path, model_file):
    dataset, doc = label_folder(tmp_path, model_file, n=6)
    store = LabelStore(tmp_path / "store")
    whole = store.class_mean_rc()
    np.testing.assert_allclose(np.nan_to_num(whole, nan=-1), np.nan_to_num(store.class_mean_rc(store.keys()), nan=-1))
    part = store.class_mean_rc(["img000", "img001"])
    one = LabelStore(tmp_path / "store")
    sums = np.zeros_like(whole)
    counts = np.zeros_like(whole)
    import pyarrow.parquet as pq

    for p in (tmp_path / "store" / "parts").glob("*.parquet"):
        t = pq.read_table(p).to_pydict()
        for key, s, c in zip(t["key"], t["rc_sum"], t["rc_count"]):
            if key in ("img000", "img001"):
                sums += s
                counts += c
    expected = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    np.testing.assert_allclose(np.nan_to_num(part, nan=-1), np.nan_to_num(expected, nan=-1))
    assert not np.allclose(np.nan_to_num(part, nan=-1), np.nan_to_num(whole, nan=-1))
    assert len(one) == 6


def test_a_missing_reference_library_fails_loudly():
    from tests.conftest import require_reference

    with pytest.raises(pytest.fail.Exception, match="need the dev extra"):
        require_reference("no_such_reference_library")


def test_adapt_names_a_damaged_part_of_its_label_store(tmp_path, model_file, capsys):
    label_folder(tmp_path, model_file, n=4)
    part = sorted((tmp_path / "store" / "parts").glob("*.parquet"))[0]
    part.write_bytes(part.read_bytes()[:100])
    assert main(["adapt", "--out", str(tmp_path / "run"), "--engine", "local", "--dataset", "folder", "--root",
                 str(tmp_path / "images"), "--label-store", str(tmp_path / "store"), "data.val_split="]) == 2
    err = one_line_error(capsys, "adapt")
    assert str(part) in err and "damaged label-store part" in err
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_label_takes_the_client_timeout_and_retries_from_the_cli(tmp_path, model_file, capsys):
    from corte_ray.blackbox.faults import FaultInjectingServer

    image_folder(tmp_path / "images", 2)
    with FaultInjectingServer(model_file, device="cpu", latency=2.0) as srv:
        t0 = time.perf_counter()
        rc = main(["label", "--engine", "local", "--dataset", "folder", "--root", str(tmp_path / "images"),
                   "--out", str(tmp_path / "store"), "--blackbox", srv.url, "--timeout", "0.3",
                   "--max-retries", "1", "blackbox.token_env=null"])
        assert rc == 2 and time.perf_counter() - t0 < 2.0
    err = one_line_error(capsys, "label")
    assert "failed after 1 retries: no answer within 0.3 s" in err


def test_label_honours_train_cpu_threads(tmp_path, model_file):
    from corte_ray.config import load_config
    from corte_ray.pipeline import label

    folder = image_folder(tmp_path / "images", 2)
    cfg = load_config(None, ["data.dataset=folder", f"data.root={folder}", f"blackbox.spec=file:{model_file}",
                             "train.device=cpu", "train.cpu_threads=1"])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        label(cfg, tmp_path / "store", engine="local")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
