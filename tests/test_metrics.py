"""clip_pl.evaluation.metrics against hand-computed cases: ties, classes without samples, several captions per image."""

import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from clip_pl.evaluation.metrics import (
    accuracy,
    average_precision_per_class,
    classification_metrics,
    mean_average_precision,
    mean_per_class_recall,
    retrieval_recall,
)


def test_topk_ties_rank_the_lower_class_first():
    logits = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [3.0, 1.0, 3.0]])
    # Sample 0: class 0 ties with its class 1 and comes first. Sample 1: class 1 ties with its
    # class 2. Sample 2: its class 0 ties with class 2 and wins.
    assert accuracy(logits, torch.tensor([1, 2, 0]), topk=(1, 2)) == {"top1": 1 / 3, "top2": 1.0}


def test_mean_per_class_recall_leaves_out_a_class_without_samples():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    predicted = torch.tensor([0, 3, 1, 1, 0, 2])  # class 3 is predicted but has no sample
    logits = torch.nn.functional.one_hot(predicted, 4).float()
    # Recall 1/2, 2/3 and 1 for classes 0-2; class 3 has none.
    assert mean_per_class_recall(logits, labels) == pytest.approx((1 / 2 + 2 / 3 + 1) / 3, abs=1e-12)
    assert mean_per_class_recall(logits, labels) == pytest.approx(balanced_accuracy_score(labels, predicted), abs=1e-12)
    # Equal logits predict the lower class, as argmax does: here class 0, wrong for label 1.
    assert mean_per_class_recall(torch.zeros(2, 3), torch.tensor([0, 1])) == 0.5


def test_average_precision_by_hand():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.8, 0.2, 0.5], [0.7, 0.3, 0.1], [0.6, 0.4, 0.0]])
    targets = torch.tensor([[1, 0, 0], [0, 0, 1], [1, 0, 0], [0, 0, 0]])
    ap = average_precision_per_class(scores, targets)
    # Class 0: positives at ranks 1 and 3, precisions 1 and 2/3. Class 1: no positive, 0 (as
    # clip_benchmark counts it). Class 2: samples 0 and 1 tie at 0.5; sample 0 ranks first, so
    # its positive (sample 1) is at rank 2, precision 1/2.
    torch.testing.assert_close(ap, torch.tensor([(1 + 2 / 3) / 2, 0.0, 0.5], dtype=torch.float64))
    assert mean_average_precision(scores, targets) == pytest.approx(((1 + 2 / 3) / 2 + 0.5) / 3, abs=1e-12)
    with pytest.raises(ValueError, match="0 or 1"):
        average_precision_per_class(scores, targets * 2)


def test_average_precision_equals_clip_benchmark_without_ties():
    zeroshot_classification = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(50, 7, generator=generator)
    targets = (torch.rand(50, 7, generator=generator) < 0.3).long()
    targets[:, 3] = 0
    theirs = zeroshot_classification.average_precision_per_class(scores, targets)
    torch.testing.assert_close(average_precision_per_class(scores, targets).float(), theirs, rtol=0, atol=1e-6)


def test_an_image_is_a_hit_when_any_of_its_captions_is_in_the_top_k():
    e0, e1 = torch.eye(2)
    images = torch.stack([e0, e1])
    captions = torch.stack([e1, e0, e0])  # captions 0 and 1 describe image 0, caption 2 image 1
    recall = retrieval_recall(images, captions, ks=(1, 5), text_to_image_index=torch.tensor([0, 0, 1]))
    # Image 0: its caption 1 scores 1, tied with caption 2 (higher index): rank 0, a hit.
    # Image 1: caption 0 scores 1, caption 1 ties with its caption 2 and comes first: rank 2.
    # Captions: 0 misses image 0 (image 1 scores higher), 1 finds image 0, 2 misses image 1.
    assert recall == {
        "image_to_text_R@1": 0.5,
        "image_to_text_R@5": 1.0,
        "text_to_image_R@1": 1 / 3,
        "text_to_image_R@5": 1.0,
    }


def test_classification_metrics_equal_accuracy_and_mean_per_class_recall():
    generator = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(40, 7, generator=generator), torch.randint(0, 6, (40,), generator=generator)
    logits[3] = logits[3, 0]  # ties
    together = classification_metrics(logits, labels, (1, 5))
    assert together == {**accuracy(logits, labels, (1, 5)), "mean_per_class_recall": mean_per_class_recall(logits, labels)}
