"""The unsupervised selection scores: they never read the target labels, a student that copies the box on its
reliable pixels scores 100 there, they are the same however many ranks share the work, and scoring inside the
loop changes nothing the run trains."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from corte_ray.tune.score import CANDIDATES, SELECTED, SelectionScorer


@pytest.fixture(scope="module")
def store(tiny_bench, tmp_path_factory):
    from corte_ray.blackbox import open_blackbox
    from corte_ray.blackbox.store import LabelStore, label_dataset_local
    from corte_ray.data.datasets import open_dataset
    from tests.tune_helpers import export_tiny_box

    work = tmp_path_factory.mktemp("score")
    box = export_tiny_box(work / "box.pt")
    label_dataset_local(open_dataset("synth", tiny_bench, split="train"), open_blackbox(f"file:{box}", device="cpu"),
                        work / "labels")
    return LabelStore(work / "labels")


def _unlabelled(tiny_bench):
    from corte_ray.data.datasets import open_dataset

    ds = open_dataset("synth", tiny_bench, split="train")
    return dataclasses.replace(ds, samples=[dataclasses.replace(s, label=None) for s in ds.samples])


class BoxCopy(nn.Module):
    """A 'student' that answers the box's stored top-1 for each image (looked up by its pixels)."""

    def __init__(self, scorer: SelectionScorer, num_classes: int) -> None:
        super().__init__()
        self.answers = {item["image"].tobytes(): torch.from_numpy(item["box_top1"].astype("int64"))
                        for item in scorer.items}
        self.num_classes = num_classes

    def forward(self, x):
        key = (x[0] * 255).round().to(torch.uint8).numpy().tobytes()
        top1 = self.answers.get(key, torch.zeros(x.shape[-2:], dtype=torch.long))
        return torch.nn.functional.one_hot(top1, self.num_classes).permute(2, 0, 1)[None].float() * 10


def test_scores_need_no_labels_and_reward_box_agreement(tiny_bench, store):
    from corte_ray.models import build_model

    scorer = SelectionScorer(_unlabelled(tiny_bench), store, None, 6, 19)   # no label path at all
    assert len(scorer.items) == 6
    torch.manual_seed(0)
    student = build_model("mobilenetv3_small_lraspp", 19)
    scores = scorer.score(student, None, torch.device("cpu"))
    assert set(scores) == {f"unsup/{c}" for c in CANDIDATES} | {"unsupervised"}
    assert scores["unsupervised"] == scores[f"unsup/{SELECTED}"]
    assert all(0.0 <= v <= 100.0 for v in scores.values())
    assert scores == scorer.score(student, None, torch.device("cpu"))     # fixed views: same model, same score
    copy = scorer.score(BoxCopy(scorer, 19), None, torch.device("cpu"))
    assert copy["unsup/agree_reliable"] == pytest.approx(100.0) and copy["unsup/agree_all"] == pytest.approx(100.0)
    assert copy["unsup/class_dist"] == pytest.approx(100.0)
    assert scores["unsup/agree_reliable"] < 100.0


def test_scoring_in_the_loop_changes_no_training(tiny_bench, store, tmp_path):
    """train.score_images adds scores to the reports; losses and val mIoU are those of the same run without it."""
    from corte_ray.config import load_config
    from corte_ray.train.context import LocalContext
    from corte_ray.train.loop import train

    lines = {}
    for n in (0, 4):
        cfg = load_config(None, ["data.dataset=synth", f"data.root={tiny_bench}", f"blackbox.label_store={store.root}",
                                 "model.student=mobilenetv3_small_lraspp", "data.batch_size=2",
                                 "data.crop_size=[48,64]", "train.iterations=4", "train.eval_every=2",
                                 "train.checkpoint_every=2", "data.val_max_images=2", "ema.momentum=0.9",
                                 "corte.warmup=0.25", "corte.refine_start=0.5", "train.lr_warmup=1",
                                 f"train.score_images={n}", "scaling.engine=local"])
        run = tmp_path / f"run{n}"
        run.mkdir()
        train(cfg, LocalContext(run, torch.device("cpu")), store)
        lines[n] = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(lines[0], lines[4]):
        assert "unsupervised" not in a and "unsupervised" in b
        assert {k: v for k, v in b.items() if not k.startswith("unsup")} == a


def test_without_a_box_the_score_falls_back_to_consistency(tiny_bench):
    """STvM is source-free: no label store, so only the box-free candidates, and `unsupervised` = consistency."""
    from corte_ray.models import build_model
    from corte_ray.tune.score import FALLBACK

    scorer = SelectionScorer(_unlabelled(tiny_bench), None, None, 3, 19)
    torch.manual_seed(0)
    scores = scorer.score(build_model("mobilenetv3_small_lraspp", 19), None, torch.device("cpu"))
    assert set(scores) == {"unsup/consistency", "unsup/neg_entropy", "unsupervised"}
    assert scores["unsupervised"] == scores[f"unsup/{FALLBACK}"]
