"""Evaluation metrics: pure functions from scores to numbers, shared by every evaluation path.

Zero-shot classification (top-k accuracy, mean per-class recall, mean average precision) and
image-text retrieval (recall@k) are defined as clip_benchmark defines them, so that a number from
clip_pl equals the one clip_benchmark prints for the same features. Where clip_benchmark leaves the
order of equal scores to the sort's implementation, these functions rank equal scores by index (a
stable sort), so a result never depends on the device or on how the data was batched.

Counts are summed as integers and divided once in Python: exact fractions, not float32 means.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Rank given to a query whose true item has a NaN score: beyond any k.
_MISS = torch.iinfo(torch.int64).max


def accuracy(logits: torch.Tensor, labels: torch.Tensor, topk: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy as a fraction in [0, 1], keyed ``top1``, ``top5``...

    A sample is a top-k hit when its true class ranks among the k highest logits, equal logits
    ranking by class index (as a stable sort would), so ties never make the result depend on the
    device. With fewer classes than k, top-k is 1.0. Batch results weighted by batch size sum
    exactly to the accuracy over all batches.

    Args:
        logits: ``[N, C]`` class scores.
        labels: ``[N]`` integer class indices.
        topk: The k values to report.
    """
    if logits.shape[0] == 0:
        raise ValueError("accuracy of an empty batch is undefined")
    hits = topk_hits(logits, labels, topk).tolist()
    return {f"top{k}": h / len(labels) for k, h in zip(topk, hits)}


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, topk: Sequence[int] = (1, 5)) -> torch.Tensor:
    """How many samples are top-k hits (see ``accuracy``), per k: int64 ``[len(topk)]`` on the logits' device.

    Counts add up exactly over batches and ranks, which fractions in float would not.
    """
    ranks = true_class_ranks(logits, labels)
    return torch.stack([(ranks < k).sum() for k in topk])


def true_class_ranks(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Rank of each sample's true class among its logits, 0 for the best: int64 ``[N]``.

    Equal logits rank by class index (as a stable sort would); a NaN logit for the true class
    ranks beyond any k, so a diverged model scores zero rather than perfect.
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [N, C] and labels [N], got {tuple(logits.shape)} and {tuple(labels.shape)}")
    labels = labels.to(device=logits.device, dtype=torch.long)
    true_score = logits.gather(1, labels[:, None])
    class_index = torch.arange(logits.shape[1], device=logits.device)
    ahead = (logits > true_score) | ((logits == true_score) & (class_index < labels[:, None]))
    return ahead.sum(dim=1).masked_fill(true_score.isnan().squeeze(1), _MISS)


def mean_per_class_recall(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 recall of each class, averaged over the classes that have samples (balanced accuracy).

    clip_benchmark's ``mean_per_class_recall`` (scikit-learn's ``balanced_accuracy_score`` of the
    argmax): a class without samples has no recall and is left out of the mean rather than counted
    as 0. Equal logits go to the lower class index, as ``argmax`` does.

    Args:
        logits: ``[N, C]`` class scores.
        labels: ``[N]`` integer class indices.
    """
    if logits.shape[0] == 0:
        raise ValueError("mean per-class recall of an empty set is undefined")
    return _mean_per_class_recall(true_class_ranks(logits, labels), labels, logits.shape[1])


def _mean_per_class_recall(ranks: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    labels = labels.to(device=ranks.device, dtype=torch.long)
    samples = torch.bincount(labels, minlength=num_classes)
    correct = torch.bincount(labels, weights=(ranks == 0).double(), minlength=num_classes)
    present = samples > 0
    return (correct[present] / samples[present]).mean().item()


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, topk: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """``accuracy`` and ``mean_per_class_recall`` from one ranking of the true classes."""
    if logits.shape[0] == 0:
        raise ValueError("accuracy of an empty set is undefined")
    ranks = true_class_ranks(logits, labels)
    metrics = {f"top{k}": (ranks < k).sum().item() / len(labels) for k in topk}
    metrics["mean_per_class_recall"] = _mean_per_class_recall(ranks, labels, logits.shape[1])
    return metrics


def average_precision_per_class(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Average precision of each class of a multi-label set: float64 ``[C]``.

    Per class, the samples are ranked by descending score (equal scores by sample index, NaN
    last) and the precision at the rank of each positive is averaged over the positives. As in
    clip_benchmark, a class without positives gets 0, and counts as 0 in the mean.

    Args:
        scores: ``[N, C]`` class scores.
        targets: ``[N, C]`` multi-hot labels, 1 where the class is present and 0 elsewhere.
    """
    if scores.dim() != 2 or targets.shape != scores.shape:
        raise ValueError(
            f"expected scores [N, C] and targets of the same shape, got {tuple(scores.shape)} and "
            f"{tuple(targets.shape)}"
        )
    if scores.shape[0] == 0:
        raise ValueError("average precision of an empty set is undefined")
    truth = targets.to(scores.device)
    if not ((truth == 0) | (truth == 1)).all():
        raise ValueError("multi-label targets must be 0 or 1 per class")
    order = torch.sort(scores.float().nan_to_num(nan=float("-inf")), dim=0, descending=True, stable=True).indices
    truth = truth.double().gather(0, order)
    rank = torch.arange(1, scores.shape[0] + 1, device=scores.device, dtype=torch.float64)[:, None]
    precision_at_positives = (truth.cumsum(0) / rank * truth).sum(0)
    return precision_at_positives / truth.sum(0).clamp(min=1)


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """The mean over classes of ``average_precision_per_class`` (clip_benchmark's ``mean_average_precision``)."""
    return average_precision_per_class(scores, targets).mean().item()


def _ranks(queries: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Rank of the best positive key of each query when keys are sorted by descending score.

    Ties are broken by key index (a stable sort), so ranks do not depend on the chunking or the
    device. Only ``chunk_size x K`` scores exist at a time.

    Args:
        queries: ``[Q, D]``.
        keys: ``[K, D]``.
        positives: ``[Q, P]`` indices of each query's positive keys in ascending order, padded with -1.
        chunk_size: Queries per block.
    """
    ranks = []
    for start in range(0, queries.shape[0], chunk_size):
        scores = queries[start : start + chunk_size] @ keys.T
        candidates = positives[start : start + chunk_size]
        candidate_scores = scores.gather(1, candidates.clamp(min=0)).masked_fill(candidates < 0, float("-inf"))
        # argmax returns the first maximum: among equally scored positives the lowest index, as a stable sort would.
        best = candidate_scores.argmax(dim=1, keepdim=True)
        target, target_score = candidates.gather(1, best), candidate_scores.gather(1, best)
        rank = (scores > target_score).sum(dim=1)
        # Keys scoring exactly as much as the target come first when their index is lower. Such ties
        # are rare with real features, so only the rows that have them pay for the index comparison.
        tied = (scores == target_score).sum(dim=1) > 1
        if tied.any():
            key_index = torch.arange(keys.shape[0], device=keys.device)
            earlier = (scores[tied] == target_score[tied]) & (key_index < target[tied])
            rank[tied] += earlier.sum(dim=1)
        # A NaN score compares false with everything and would rank first: count it as a miss, so a
        # diverged model shows zero recall instead of perfect recall.
        ranks.append(rank.masked_fill(target_score.isnan().squeeze(1), _MISS))
    return torch.cat(ranks)


def _group_indices(group_of: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``[num_groups, max group size]`` member indices of each group in ascending order, padded with -1."""
    order = torch.sort(group_of, stable=True).indices  # stable: members stay in ascending index order
    counts = torch.bincount(group_of, minlength=num_groups)
    starts = torch.cumsum(counts, dim=0) - counts
    sorted_groups = group_of[order]
    position = torch.arange(len(group_of), device=group_of.device) - starts[sorted_groups]
    table = torch.full((num_groups, int(counts.max())), -1, dtype=torch.long, device=group_of.device)
    table[sorted_groups, position] = order
    return table


def retrieval_recall(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 256,
    text_to_image_index: torch.Tensor | None = None,
) -> dict[str, float]:
    """Image-to-text and text-to-image recall@k as fractions in [0, 1].

    Scores are dot products, i.e. cosine similarities for normalized features. An image query is a
    hit at k when any of its captions ranks in the top k; a caption query when its image does.
    Equal scores rank by index, so results are deterministic.

    Args:
        image_features: ``[N, D]`` image embeddings.
        text_features: ``[M, D]`` caption embeddings.
        ks: The k values to report.
        chunk_size: Queries scored at once; peak memory is about ``chunk_size x max(N, M)`` scores.
        text_to_image_index: ``[M]`` index of the image each caption describes. ``None`` means
            one caption per image, caption ``i`` describing image ``i``.

    Returns:
        ``{"image_to_text_R@1": ..., "text_to_image_R@1": ..., ...}``.
    """
    n_images, n_texts = image_features.shape[0], text_features.shape[0]
    if image_features.dim() != 2 or text_features.dim() != 2 or image_features.shape[1] != text_features.shape[1]:
        raise ValueError(
            f"expected features [N, D] and [M, D], got {tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    device = image_features.device
    if text_to_image_index is None:
        if n_images != n_texts:
            raise ValueError(
                f"{n_images} images but {n_texts} captions: pass text_to_image_index to say which image each caption"
                " belongs to"
            )
        text_to_image_index = torch.arange(n_texts)
    text_to_image_index = text_to_image_index.to(device=device, dtype=torch.long)
    if text_to_image_index.shape != (n_texts,):
        raise ValueError(f"text_to_image_index must have one entry per caption ({n_texts})")
    if n_texts == 0 or text_to_image_index.min() < 0 or text_to_image_index.max() >= n_images:
        raise ValueError(f"text_to_image_index must hold image indices in [0, {n_images})")
    if torch.bincount(text_to_image_index, minlength=n_images).min() == 0:
        raise ValueError("every image needs at least one caption for image-to-text recall")
    # Comparing float32 scores keeps the ranking identical to a float32 reference whatever the
    # features' training precision was.
    images, texts = image_features.float(), text_features.to(device).float()
    image_ranks = _ranks(images, texts, _group_indices(text_to_image_index, n_images), chunk_size)
    text_ranks = _ranks(texts, images, text_to_image_index[:, None], chunk_size)
    metrics = {}
    for name, ranks in (("image_to_text", image_ranks), ("text_to_image", text_ranks)):
        for k in ks:
            # Integer counts divided in Python: exact fractions, not float32 means.
            metrics[f"{name}_R@{k}"] = (ranks < k).sum().item() / len(ranks)
    return metrics
