from __future__ import annotations

import numpy as np
import torch

from retinafm.tasks import make_task
from retinafm.tasks.multiclass import MulticlassTask


def test_task_basics_and_prediction_frame():
    task = make_task("multiclass", ["dr", "glaucoma", "normal"])
    assert isinstance(task, MulticlassTask) and task.num_outputs == 3
    probs = task.activate(torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]]))
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    frame = task.prediction_frame(["a.png", "b.png"], probs, np.array([0, 1]))
    assert list(frame.columns) == ["path", "prediction", "label", "prob_dr", "prob_glaucoma", "prob_normal"]
    assert list(frame["prediction"]) == ["dr", "normal"] and list(frame["label"]) == ["dr", "glaucoma"]


def test_best_checkpoint_rule_auroc_then_loss():
    task = make_task("multiclass", ["a", "b"])
    assert task.is_better({"auroc_macro": 0.8}, 1.0, None, float("inf"))
    assert task.is_better({"auroc_macro": 0.9}, 2.0, {"auroc_macro": 0.8}, 1.0)
    assert not task.is_better({"auroc_macro": 0.7}, 0.1, {"auroc_macro": 0.8}, 1.0)
    assert task.is_better({"auroc_macro": 0.8}, 0.5, {"auroc_macro": 0.8}, 1.0)  # tie → lower loss
    assert not task.is_better({"auroc_macro": 0.8}, 1.5, {"auroc_macro": 0.8}, 1.0)
    assert task.is_better({"auroc_macro": 0.6}, 1.0, {"auroc_macro": float("nan")}, 0.1)


def test_label_smoothing_loss():
    task = make_task("multiclass", ["a", "b", "c"])
    logits, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    expected = torch.nn.functional.cross_entropy(logits, target, label_smoothing=0.1)
    torch.testing.assert_close(task.train_loss(0.1)(logits, target), expected)
