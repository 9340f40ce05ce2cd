"""Contrastive losses over a batch split across ranks, exact in their gradients.

Each rank scores its own B rows against all N = W * B columns gathered with gradient, so memory is
O(B * N) per rank, never O(N^2). Each local loss is scaled so that the mean over ranks equals the
global-batch loss; with DDP averaging gradients and the gather summing the gradients of the
negatives (see ``distributed.all_gather_with_grad``), every parameter gets exactly the gradient of
the single-process loss on the global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clip_pl.distributed import all_gather_with_grad
from data_pipelines.ranks import rank_and_world_size


def _gather_pairs(image_features: torch.Tensor, text_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # One collective for both towers instead of two.
    dim = image_features.shape[1]
    both = all_gather_with_grad(torch.cat([image_features, text_features], dim=1))
    return both[:, :dim], both[:, dim:]


class ClipLoss(nn.Module):
    """Symmetric cross-entropy over ``logit_scale * cos(image, text)`` (CLIP).

    Inputs are L2-normalized features ``[B, D]`` of this rank's pairs and the logit multiplier
    (``exp`` already applied, as ``CLIP.forward`` returns it). ``gather=False`` scores this rank's
    batch alone (evaluation, where ranks hold batches of different sizes).
    """

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        *,
        gather: bool = True,
    ) -> torch.Tensor:
        rank = rank_and_world_size()[0] if gather else 0
        all_images, all_texts = (
            _gather_pairs(image_features, text_features) if gather else (image_features, text_features)
        )
        labels = torch.arange(image_features.shape[0], device=image_features.device) + rank * image_features.shape[0]
        logits_per_image = logit_scale * image_features @ all_texts.T
        logits_per_text = logit_scale * text_features @ all_images.T
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss (SigLIP): ``-mean_i sum_j log sigmoid(z_ij (t cos_ij + b))``.

    ``z_ij`` is +1 for matching pairs and -1 otherwise; the sum runs over all N texts and the mean
    over all N images, so the loss of a global batch is ``-1/N * sum_ij``.
    """

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        *,
        gather: bool = True,
    ) -> torch.Tensor:
        if logit_bias is None:
            raise ValueError("the SigLIP loss needs a model with a logit bias (set model.init_logit_bias, e.g. -10)")
        rank = rank_and_world_size()[0] if gather else 0
        batch = image_features.shape[0]
        # The image rows are local, so only the texts need gathering.
        all_texts = all_gather_with_grad(text_features) if gather else text_features
        logits = logit_scale * image_features @ all_texts.T + logit_bias
        signs = -torch.ones_like(logits)
        signs[torch.arange(batch), torch.arange(batch) + rank * batch] = 1.0
        return -F.logsigmoid(signs * logits).sum() / batch
