"""The Cityscapes protocol against the official ``cityscapesscripts`` package: its label table
(ids, train ids, names) and its pixel-level evaluation on generated files in the official layout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

labels_mod = pytest.importorskip("cityscapesscripts.helpers.labels")
pytest.importorskip("PIL")

import uda_selftrain as ust  # noqa: E402
from uda_selftrain.datasets import (  # noqa: E402
    CITYSCAPES_CLASSES,
    CITYSCAPES_LABELID_TO_TRAINID,
    Cityscapes,
    lookup_table,
    map_labels,
)
from uda_selftrain.datasets.image_io import read_label, write_label, write_rgb  # noqa: E402


def test_label_map_matches_the_official_table():
    official = {lab.id: lab.trainId for lab in labels_mod.labels if lab.id >= 0}
    for label_id, train_id in official.items():
        ours = CITYSCAPES_LABELID_TO_TRAINID.get(label_id, 255)
        expected = train_id if 0 <= train_id < 255 else 255
        assert ours == expected, f"label id {label_id}: ours {ours}, official {expected}"
    assert set(CITYSCAPES_LABELID_TO_TRAINID) <= set(official)
    names = {lab.trainId: lab.name for lab in labels_mod.labels if 0 <= lab.trainId < 255}
    assert [names[t] for t in range(19)] == list(CITYSCAPES_CLASSES)


def _official_scores(pred_files, gt_files):
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as ev

    ev.args.evalInstLevelScore = False
    ev.args.evalPixelAccuracy = False
    ev.args.JSONOutput = False
    ev.args.quiet = True
    return ev.evaluateImgLists([str(p) for p in pred_files], [str(g) for g in gt_files], ev.args)


def test_miou_matches_the_official_pixel_level_evaluation(tmp_path):
    trainid_to_id = {t: i for i, t in CITYSCAPES_LABELID_TO_TRAINID.items()}
    g = np.random.default_rng(0)
    h, w, n = 32, 64, 3
    ignored_ids = [i for i in range(34) if i not in CITYSCAPES_LABELID_TO_TRAINID]
    gt_files, pred_files = [], []
    cm = ust.ConfusionMatrix(19, out_of_range="wrong")
    for k in range(n):
        # Ground truth in label ids: every train class in blocks, plus void / ignored ids.
        train = g.integers(0, 19, size=(h // 4, w // 4)).repeat(4, 0).repeat(4, 1)
        train[:4, :19] = np.arange(19)  # every class appears in the ground truth
        gt_ids = np.vectorize(trainid_to_id.get)(train).astype(np.uint8)
        gt_ids[g.random((h, w)) < 0.1] = g.choice(ignored_ids)
        # A prediction in train ids: right on ~60 % of the pixels, some predictions of void.
        pred_train = np.where(g.random((h, w)) < 0.6, train, g.integers(0, 19, size=(h, w)))
        pred_ids = np.vectorize(trainid_to_id.get)(pred_train).astype(np.uint8)
        void = g.random((h, w)) < 0.05
        pred_ids[void] = 0  # "unlabeled": a prediction no class gets credit for
        city, name = "city", f"city_{k:06d}_000019"
        gt = tmp_path / "gtFine" / "val" / city / f"{name}_gtFine_labelIds.png"
        gt.parent.mkdir(parents=True, exist_ok=True)
        write_label(gt, gt_ids)
        image = tmp_path / "leftImg8bit" / "val" / city / f"{name}_leftImg8bit.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        write_rgb(image, np.zeros((h, w, 3), np.uint8))
        pred = tmp_path / "pred" / f"{name}.png"
        pred.parent.mkdir(parents=True, exist_ok=True)
        write_label(pred, pred_ids)
        gt_files.append(gt)
        pred_files.append(pred)
    # Ours: the reader maps the official label ids to train ids; the prediction files are read
    # back the same way (a void prediction becomes 255, counted as a miss, as the official does).
    val = Cityscapes(tmp_path, "val")
    assert len(val) == n
    table = lookup_table(CITYSCAPES_LABELID_TO_TRAINID)
    for k in range(n):
        pred_train = torch.from_numpy(map_labels(read_label(pred_files[k]), table).astype(np.int64))
        cm.update(pred_train[None], val[k]["label"][None].long())
    ours = cm.scores("cityscapes19")
    official = _official_scores(pred_files, gt_files)
    for t, name in enumerate(CITYSCAPES_CLASSES):
        want = official["classScores"][name]
        assert not math.isnan(want)
        assert ours.iou[t] == pytest.approx(want, abs=1e-9), name
    assert ours.miou == pytest.approx(official["averageScoreClasses"], abs=1e-9)
