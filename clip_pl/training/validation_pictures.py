"""Pictures of what the model matches, drawn at validation from the same few val pairs every time.

``ValidationPictures`` keeps the first ``num_samples`` image-caption pairs of the validation loader
(global rank zero's, on CPU) from the first validation, and at each validation draws, with the model
as it is then:

- ``val/similarity_matrix``: their cosine similarities, images as rows, captions as columns
  (``clip_pl.evaluation.visualization.similarity_matrix_image``);
- ``val/retrieval``: each image beside its top-k captions, the true one in green
  (``clip_pl.evaluation.visualization.retrieval_grid_image``).

Both go to TensorBoard and wandb when those loggers are configured, and always to
``<run dir>/pictures/step_<global step>_similarity.png`` and ``..._retrieval.png``. The sanity check
Lightning runs before training is not a validation here: it neither provides the pairs nor is drawn.
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from clip_pl.evaluation.visualization import images_from_batch, retrieval_grid_image, similarity_matrix_image, to_array


class ValidationPictures(L.Callback):
    """Logs a similarity matrix and a retrieval grid of a fixed set of val pairs at validation.

    Args:
        num_samples: Pairs shown, the first ones of the validation loader.
        every_n_validations: Draw at the first validation and then every n-th one.
        top_k: Captions shown per image in the retrieval grid.
    """

    def __init__(self, num_samples: int = 8, every_n_validations: int = 1, top_k: int = 3):
        if num_samples < 1 or every_n_validations < 1 or top_k < 1:
            raise ValueError(
                "callbacks.pictures.num_samples, callbacks.pictures.every_n_validations and "
                f"callbacks.pictures.top_k must be at least 1, got {num_samples}, {every_n_validations} and {top_k}"
            )
        self.num_samples = num_samples
        self.every_n_validations = every_n_validations
        self.top_k = top_k
        self.images: torch.Tensor | None = None  # [N, 3, H, W] as the model receives them, on CPU
        self.tokens: torch.Tensor | None = None  # [N, L]
        self._collecting = True
        self._validations = 0

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not (trainer.is_global_zero and self._collecting and dataloader_idx == 0) or trainer.sanity_checking:
            return
        have = 0 if self.images is None else len(self.images)
        if have >= self.num_samples:
            return
        images, tokens = batch
        # Copies, so the slice does not keep the whole batch (or its GPU memory) alive.
        images = images[: self.num_samples - have].detach().cpu().clone()
        tokens = tokens[: self.num_samples - have].detach().cpu().clone()
        self.images = images if self.images is None else torch.cat([self.images, images])
        self.tokens = tokens if self.tokens is None else torch.cat([self.tokens, tokens])

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        # Later validations must not append their own first pairs when the val set held fewer.
        self._collecting = False
        if self.images is None:
            return
        validation = self._validations
        self._validations += 1
        if validation % self.every_n_validations == 0:
            self._draw(trainer, pl_module)

    def _draw(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model, tokenizer = pl_module.model, pl_module.tokenizer
        precision = trainer.precision_plugin
        # The precision plugin casts inputs and sets autocast as it does for validation_step.
        with torch.no_grad(), precision.forward_context():
            images = precision.convert_input(self.images.to(pl_module.device))
            image_features = model.encode_image(images)
            text_features = model.encode_text(self.tokens.to(pl_module.device))
        similarity = (image_features.float() @ text_features.float().T).cpu()
        thumbnails = images_from_batch(self.images, model.preprocess_config)
        captions = [tokenizer.decode(row) for row in self.tokens]
        pictures = {
            "similarity": ("val/similarity_matrix", similarity_matrix_image(thumbnails, captions, similarity)),
            "retrieval": ("val/retrieval", retrieval_grid_image(thumbnails, captions, similarity, k=self.top_k)),
        }
        step = trainer.global_step
        directory = os.path.join(trainer.default_root_dir, "pictures")
        os.makedirs(directory, exist_ok=True)
        for suffix, (tag, picture) in pictures.items():
            picture.save(os.path.join(directory, f"step_{step}_{suffix}.png"))
            array = to_array(picture)
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image(tag, array, step, dataformats="HWC")
                elif isinstance(logger, WandbLogger):
                    logger.log_image(key=tag, images=[array], step=step)

    def state_dict(self) -> dict[str, Any]:
        # The count, so that a resumed run keeps drawing at the same validations.
        return {"validations": self._validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._validations = state_dict["validations"]
