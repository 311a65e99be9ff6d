"""The bundle's model on its device, turning a batch of preprocessed images into scores.

Scores come from :func:`training.evaluation.score_batch` with the bundle's selected block as
the only tap, so one forward pass yields the logits and that block's features, and the
numbers are the ones training's evaluation computes for the same image. A :class:`Predictor`
is only ever called from the batcher's single inference thread, which is what makes its
pinned staging buffer safe to reuse.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from service import allocator
from training.bundle import Bundle
from training.evaluation import score_batch
from training.runtime import select_device

log = logging.getLogger("oodserve")

# What "out of memory" looks like; a module attribute so that tests can inject their own.
OOM_ERRORS: tuple[type[BaseException], ...] = (torch.cuda.OutOfMemoryError,)


@dataclass(frozen=True)
class ImageScores:
    """One image's results as plain Python numbers, so the event loop only indexes them."""

    pred: int
    probabilities: list[float]  # softmax over the classes
    ranking: list[int]  # class indices by decreasing probability (ties: lower index first)
    energy: float
    featurenorm: float


def memory_format_for(device: torch.device) -> torch.memory_format:
    """The layout the model and its input batches take on ``device``. NHWC ("channels last")
    on the CPU: oneDNN's convolutions then read and write the activations as they are,
    instead of reordering each one's input to their blocked layout and its output back,
    which took 13-15% of the time per image at batches of 8-16 here (README, Benchmarks
    (service)). The sums run in another order than training's evaluation (NCHW), so scores
    may differ from it in the last float32 digits, as batches of other sizes already do.
    CUDA keeps the default: no GPU has measured the difference."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


class Predictor:
    def __init__(self, bundle: Bundle, device: str, half: bool, max_batch_size: int,
                 torch_threads: int, tune_malloc: bool = True):
        self.device = select_device(device)
        self.malloc_tuned = False
        if self.device.type == "cpu":
            # Set, not inherited: the default may oversubscribe cores shared with decoding.
            torch.set_num_threads(torch_threads)
            self.malloc_tuned = tune_malloc and allocator.tune_malloc()
        if half and self.device.type != "cuda":
            log.warning("OODSERVE_HALF is ignored on the CPU; serving in float32")
        self.dtype = torch.float16 if half and self.device.type == "cuda" else torch.float32
        self.memory_format = memory_format_for(self.device)
        self.model = bundle.model.to(self.device, self.dtype,
                                     memory_format=self.memory_format).eval()
        self.block = bundle.manifest.featurenorm.selected_block
        size = bundle.manifest.preprocessing.input_size
        # Pinned host memory lets the host-to-GPU copy run asynchronously.
        self._staging = (torch.empty((max_batch_size, 3, size, size), pin_memory=True)
                         if self.device.type == "cuda" else None)
        self.input_shape = (3, size, size)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def __call__(self, images: list[torch.Tensor]) -> list[ImageScores]:
        """Scores of ``images``, in order. A batch that runs out of GPU memory is split in
        halves, recursively, each retried after emptying the CUDA cache; only a single
        image that does not fit fails (and with it the batch's requests)."""
        try:
            return self._forward(images)
        except OOM_ERRORS:
            if len(images) == 1:
                raise
        # Out of the except block, so that the failed attempt's tensors (held by the
        # traceback) are freed before the cache is emptied and the halves run.
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        half = len(images) // 2
        log.warning("out of memory on a batch of %d images; retrying as %d + %d",
                    len(images), half, len(images) - half)
        return self(images[:half]) + self(images[half:])

    @torch.inference_mode()
    def _forward(self, images: list[torch.Tensor]) -> list[ImageScores]:
        if self._staging is not None:
            batch = torch.stack(images, out=self._staging[:len(images)])
        else:
            batch = torch.stack(images)
        batch = batch.to(self.device, self.dtype, non_blocking=True,
                         memory_format=self.memory_format)
        out = score_batch(self.model, batch, [self.block])
        probabilities = torch.softmax(out["logits"], dim=1)
        ranking = torch.argsort(probabilities, dim=1, descending=True, stable=True)
        columns = (out["pred"], probabilities, ranking, out["energy"],
                   out[f"featurenorm/{self.block}"])
        return [ImageScores(*row) for row in zip(*(c.cpu().tolist() for c in columns))]

    def warm_up(self, batch_sizes: list[int]) -> None:
        """Run dummy batches so the first requests do not pay for lazy initialisation."""
        for n in batch_sizes:
            self([torch.zeros(self.input_shape)] * n)
