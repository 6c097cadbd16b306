"""Shared set-up of the tune tests: a tiny box exported from a random source model, and the tiny sweep config."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml


def export_tiny_box(path: Path) -> Path:
    from corte_ray.export import export_model
    from corte_ray.models import build_source_model

    torch.manual_seed(0)
    export_model(build_source_model("deeplabv3_resnet18").eval(), path, example_size=(64, 96))
    return path


def write_tiny_config(path: Path, bench: Path, blackbox_spec: str, iterations: int = 8, eval_every: int = 2) -> Path:
    """A corte config small enough for a 4-trial sweep on 2 cores: 4 evaluations of 2 steps each."""
    cfg = {"method": "corte",
           "data": {"dataset": "synth", "root": str(bench), "batch_size": 2, "crop_size": [48, 64],
                    "val_max_images": 2},
           "model": {"student": "mobilenetv3_small_lraspp"},
           "blackbox": {"spec": blackbox_spec},
           "corte": {"warmup": 0.25, "refine_start": 0.5},
           "ema": {"momentum": 0.9},
           "train": {"iterations": iterations, "eval_every": eval_every, "lr_warmup": 1, "cpu_threads": 1,
                     "log_every": 2, "progress_every_s": 0.0, "score_images": 4},
           "scaling": {"cpus_per_worker": 0.5, "data_cpus": 0.25}}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def label_tiny_store(tmp_path: Path, bench: Path) -> Path:
    """A tiny TorchScript box exported under tmp_path and a label store of `bench`'s train split made with it."""
    from corte_ray.blackbox import open_blackbox
    from corte_ray.blackbox.store import label_dataset_local
    from corte_ray.data.datasets import open_dataset

    box = export_tiny_box(tmp_path / "box.pt")
    store = tmp_path / "labels"
    label_dataset_local(open_dataset("synth", bench, split="train"), open_blackbox(f"file:{box}", device="cpu"), store)
    return store
