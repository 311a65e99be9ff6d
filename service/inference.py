"""The bundle's model on its device, turning a batch of preprocessed images into scores.

Scores come from :func:`training.evaluation.score_batch` with the bundle's selected block as
the only tap, so one forward pass yields the logits and that block's features, and the
numbers are the ones training's evaluation computes for the same image. Everything an image's
response needs (probabilities, class ranking, the served detectors' scores, prediction) is
packed into two rows per image on the device, so that a batch comes back to the host in two
copies.

On CUDA the forward pass and the scores are captured as CUDA graphs during warm-up, one per
batch size the batcher pads to (powers of two up to the largest batch): a pass of these
small CIFAR models is many small kernels, and launching them one by one from Python, not
the arithmetic, sets the pace (docs/benchmarks.md). A batch of n images is
run by the graph of the smallest captured size >= n; the rows past n hold whatever the last
batch left there, and each image's scores depend on that image alone (BatchNorm in eval
mode), so the padding is never read.

On the CPU the same computation is traced to TorchScript during warm-up: a traced pass is one
call into C++ that holds no GIL until it returns, where an eager one gives the GIL back and
takes it again at each of its operators (about 170 for ResNet-56). While the event loop is
busy (an overload, a storm of refusals) each re-take waits for the loop's thread to yield, up
to the interpreter's switch interval (5 ms): an eager forward pass then takes many times as
long as alone, a traced one barely longer (``bench/busy_loop.py``, docs/benchmarks.md). The
traced pass runs the same operators on the same tensors, and warm-up checks that it gives the eager
pass's numbers to the bit, else the predictor stays eager and says so.

A :class:`Predictor` is only ever called from one thread (the batcher's inference thread, or
the engine process's), which is what makes its staging buffer and graphs safe to reuse.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch

from service import allocator
from service.settings import Settings
from training.bundle import Bundle
from training.detectors import SERVED, SERVED_NAMES
from training.evaluation import score_batch
from training.runtime import select_device

log = logging.getLogger("oodserve")

# What "out of memory" looks like; a module attribute so that tests can inject their own.
OOM_ERRORS: tuple[type[BaseException], ...] = (torch.cuda.OutOfMemoryError,)

# What OODSERVE_PRECISION may name, and the dtype of the weights and activations. tf32 is
# float32 storage with TensorFloat-32 tensor-core arithmetic (10-bit mantissa) in the
# convolutions and matrix products; float32 is float32 arithmetic throughout.
PRECISIONS = {"float32": torch.float32, "tf32": torch.float32, "float16": torch.float16,
              "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ImageScores:
    """One image's results as plain Python numbers, so the event loop only indexes them."""

    pred: int
    probabilities: list[float]  # softmax over the classes
    ranking: list[int]  # class indices by decreasing probability (ties: lower index first)
    scores: dict[str, float]  # by served detector

    @classmethod
    def from_rows(cls, floats: list[float], ints: list[int]) -> ImageScores:
        """From one image's packed rows (see :func:`row_widths`)."""
        n = len(floats) - len(SERVED_NAMES)
        return cls(pred=ints[0], probabilities=floats[:n], ranking=ints[1:],
                   scores=dict(zip(SERVED_NAMES, floats[n:])))


def row_widths(num_classes: int) -> tuple[int, int]:
    """Widths of an image's two packed rows: float32 ``[probabilities..., one score per
    served detector]`` and int32 ``[pred, ranking...]``."""
    return num_classes + len(SERVED_NAMES), num_classes + 1


def memory_format_for(device: torch.device, precision: str) -> torch.memory_format:
    """The layout the model and its input batches take. NHWC ("channels last") on the CPU:
    oneDNN's convolutions then read and write the activations as they are, instead of
    reordering each one's input to their blocked layout and its output back. On CUDA, NHWC
    for the tensor-core precisions (tf32, float16, bfloat16), the layout of cuDNN's
    tensor-core kernels; float32 stays NCHW, where cuDNN's NHWC kernels are the slower ones
    (docs/benchmarks.md). The sums run in another order than training's evaluation
    (NCHW), so scores may differ from it in the last float32 digits, as batches of other
    sizes already do."""
    if device.type == "cpu" or precision != "float32":
        return torch.channels_last
    return torch.contiguous_format


def graph_sizes(max_batch_size: int) -> list[int]:
    """Batch sizes captured as CUDA graphs: powers of two below the largest, and it. Padding
    a batch to the next one wastes at most half a pass, on sizes that are cheap anyway."""
    sizes, n = [], 1
    while n < max_batch_size:
        sizes.append(n)
        n *= 2
    return [*sizes, max_batch_size]


class ScoreRows(torch.nn.Module):
    """The packed rows of a batch on the model's device, computed there: what CUDA graphs
    capture and what the CPU traces (a module, so that a trace keeps the model's weights as
    its own parameters rather than copying them into the graph as constants)."""

    def __init__(self, model: torch.nn.Module, block: str):
        super().__init__()
        self.model = model
        self.block = block

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = score_batch(self.model, batch, [self.block])
        probabilities = torch.softmax(out.logits, dim=1)
        ranking = torch.argsort(probabilities, dim=1, descending=True, stable=True)
        floats = torch.cat([probabilities,
                            *(out.of(d, self.block)[:, None] for d in SERVED)], dim=1)
        ints = torch.cat([out.pred[:, None], ranking], dim=1).to(torch.int32)
        return floats, ints


class Predictor:
    def __init__(self, bundle: Bundle, device: str, precision: str, max_batch_size: int,
                 torch_threads: int, tune_malloc: bool = True, cuda_graphs: bool = True,
                 cpu_trace: bool = True):
        self.device = select_device(device)
        self.malloc_tuned = False
        # Set, not inherited: the default (every core) oversubscribes cores shared with
        # decoding and other workers, and an intra-op thread that loses its core stalls the
        # operator. On CUDA the host's part is copying images into the batch.
        torch.set_num_threads(torch_threads)
        if self.device.type == "cpu":
            self.malloc_tuned = tune_malloc and allocator.tune_malloc()
            if precision != "float32":
                log.warning("OODSERVE_PRECISION=%s is for CUDA; serving in float32 on the CPU",
                            precision)
                precision = "float32"
        else:
            # float32 means float32: cuDNN's default TF32 convolutions keep 10 mantissa bits,
            # which would move scores away from training's evaluation; reduced precision is
            # asked for by name (OODSERVE_PRECISION) and checked on its own.
            torch.backends.cudnn.allow_tf32 = precision != "float32"
            torch.backends.cuda.matmul.allow_tf32 = precision != "float32"
        self.precision, self.dtype = precision, PRECISIONS[precision]
        self.memory_format = memory_format_for(self.device, precision)
        self.model = bundle.model.to(self.device, self.dtype,
                                     memory_format=self.memory_format).eval()
        self.block = bundle.manifest.featurenorm.selected_block
        self.max_batch_size = max_batch_size
        size = bundle.manifest.preprocessing.input_size
        self.input_shape = (3, size, size)
        cuda = self.device.type == "cuda"
        # Where batches are assembled on the host; pinned on CUDA so the copy to the device
        # runs asynchronously (the engine process gathers images straight into it).
        self.staging = torch.empty((max_batch_size, *self.input_shape), pin_memory=cuda)
        widths = row_widths(len(bundle.manifest.classes))
        self._out = (torch.empty((max_batch_size, widths[0]), pin_memory=cuda),
                     torch.empty((max_batch_size, widths[1]), dtype=torch.int32,
                                 pin_memory=cuda))
        self.use_graphs = cuda and cuda_graphs
        self.use_trace = not cuda and cpu_trace
        # What computes the rows: eager until warm-up traces it (on the CPU).
        self._scores: torch.nn.Module = ScoreRows(self.model, self.block)
        self.traced = False
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]] = {}
        self._graph_input: torch.Tensor | None = None

    def release(self) -> None:
        """Let go of the model, its graphs and buffers (this predictor is not used again):
        a reload's retired version frees its memory even while something still holds it."""
        self.model = self.staging = self._out = self._graph_input = self._scores = None
        self._graphs = {}

    @classmethod
    def for_settings(cls, bundle: Bundle, settings: Settings, torch_threads: int) -> Predictor:
        """The predictor the service's settings ask for, its largest batch resolved for the
        device it lands on (the one place both layouts build it)."""
        cuda = select_device(settings.device).type == "cuda"
        return cls(bundle, settings.device, settings.precision,
                   settings.resolved_max_batch_size(cuda), torch_threads,
                   settings.tune_malloc, settings.cuda_graphs, settings.cpu_trace)

    @property
    def dtype_name(self) -> str:
        """The precision served, as OODSERVE_PRECISION names it (``tf32`` included)."""
        return self.precision

    def __call__(self, images: list[torch.Tensor]) -> list[ImageScores]:
        """Scores of ``images``, in order."""
        torch.stack(images, out=self.staging[:len(images)])
        floats, ints = self.run(len(images))
        return [ImageScores.from_rows(*rows) for rows in zip(floats.tolist(), ints.tolist())]

    def run(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed score rows (host tensors, valid until the next call) of the first ``n``
        images in :attr:`staging`. A batch that runs out of GPU memory is split in halves,
        recursively, each retried after emptying the CUDA cache; only a single image that
        does not fit fails (and with it the batch's requests)."""
        self._run_range(0, n)
        return self._out[0][:n], self._out[1][:n]

    def _run_range(self, start: int, stop: int) -> None:
        try:
            self._forward(start, stop)
            return
        except OOM_ERRORS:
            if stop - start == 1:
                raise
        # Out of the except block, so that the failed attempt's tensors (held by the
        # traceback) are freed before the cache is emptied and the halves run.
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        middle = (start + stop) // 2
        log.warning("out of memory on a batch of %d images; retrying as %d + %d",
                    stop - start, middle - start, stop - middle)
        self._run_range(start, middle)
        self._run_range(middle, stop)

    @torch.inference_mode()
    def _forward(self, start: int, stop: int) -> None:
        n, host = stop - start, self.staging[start:stop]
        if self._graphs:
            size = next(s for s in sorted(self._graphs) if s >= n)
            graph, rows = self._graphs[size]
            self._graph_input[:n].copy_(host, non_blocking=True)
            graph.replay()
        else:
            batch = host.to(self.device, self.dtype, non_blocking=True,
                            memory_format=self.memory_format)
            rows = self._scores(batch)
        for out, row in zip(self._out, rows):
            out[start:stop].copy_(row[:n], non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def warm_up(self, batch_sizes: list[int]) -> None:
        """Run dummy batches so the first requests do not pay for lazy initialisation; on
        CUDA (unless turned off), capture the graphs instead; on the CPU (unless turned
        off), trace the pass first."""
        if self.use_graphs:
            self._capture()
            return
        if self.use_trace:
            self._trace()
        for n in batch_sizes:
            self([torch.zeros(self.input_shape)] * n)

    @torch.inference_mode()
    def _trace(self) -> None:
        eager = self._scores
        # Random images, not zeros: a check on constant input could pass a trace that is
        # wrong elsewhere. Two sizes, so that a trace tied to its example's batch size fails.
        check = torch.randn((self.max_batch_size, *self.input_shape),
                           generator=torch.Generator().manual_seed(0)).contiguous(
            memory_format=self.memory_format)
        try:
            with warnings.catch_warnings():
                # torch.jit.trace is deprecated in favour of torch.compile and torch.export,
                # neither of which gives a CPU pass without the GIL or a C++ compiler at
                # serving time; the check below catches a trace that has stopped working.
                warnings.simplefilter("ignore", FutureWarning)
                traced = torch.jit.trace(eager, check[:1], check_trace=False)
            same = all(torch.equal(a, b) for n in (1, self.max_batch_size)
                       for a, b in zip(traced(check[:n]), eager(check[:n])))
        except Exception as e:  # noqa: BLE001 - a model the tracer cannot follow is served eager
            log.warning("tracing the forward pass failed (%s); serving it eager", e)
            return
        if not same:
            log.warning("the traced forward pass does not give the eager pass's numbers; "
                        "serving it eager")
            return
        self._scores, self.traced = traced, True

    @torch.inference_mode()
    def _capture(self) -> None:
        sizes = sorted(graph_sizes(self.max_batch_size), reverse=True)
        self._graph_input = torch.zeros((self.max_batch_size, *self.input_shape),
                                        device=self.device, dtype=self.dtype).contiguous(
            memory_format=self.memory_format)
        # Eager passes first, on a side stream as graph capture wants: they pick cuDNN's
        # algorithms and fill the caching allocator.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for n in sizes:
                self._scores(self._graph_input[:n])
        torch.cuda.current_stream(self.device).wait_stream(side)
        # One memory pool for all the graphs, largest first: they never run at once, and
        # each one's outputs stay referenced, so no graph overwrites another's.
        pool = torch.cuda.graph_pool_handle()
        for n in sizes:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                rows = self._scores(self._graph_input[:n])
            self._graphs[n] = (graph, rows)
        torch.cuda.synchronize(self.device)
        log.info("captured CUDA graphs for batches of %s", sorted(self._graphs))
