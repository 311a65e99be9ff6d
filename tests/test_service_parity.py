"""The service's scores equal training's evaluation scores for the same bundle and images.

training's side is :func:`training.evaluation.score_dataset` over an image folder opened the
way ``python -m training evaluate`` opens one, with the bundle's model and preprocessing.
"""

import asyncio

import numpy as np
import pytest
import torch
from service_helpers import serve, settings
from uploads import encode, noise_image

from training.bundle import load_bundle
from training.data.folders import UnlabeledImageFolder
from training.detectors import SERVED
from training.evaluation import score_batch, score_dataset

pytestmark = pytest.mark.anyio

# The service runs the images in batches of its own making, evaluation in one batch of all
# of them: float32 kernels may then sum in another order (see test_service_batching.RTOL).
RTOL = 1e-5


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """24 images of several sizes and formats (JPEG, PNG, grayscale, palette, RGBA)."""
    root = tmp_path_factory.mktemp("parity")
    for i in range(24):
        size = [(32, 32), (48, 40), (40, 64), (100, 75)][i % 4]
        image = noise_image(500 + i, size)
        kind = i % 6
        if kind == 0:
            (root / f"{i:02d}.jpg").write_bytes(encode(image, "JPEG", quality=85))
        elif kind == 1:
            (root / f"{i:02d}.png").write_bytes(encode(image, "PNG"))
        elif kind == 2:
            (root / f"{i:02d}.png").write_bytes(encode(image.convert("L"), "PNG"))
        elif kind == 3:
            (root / f"{i:02d}.gif").write_bytes(encode(image.convert("P"), "GIF"))
        elif kind == 4:
            rgba = image.convert("RGBA")
            rgba.putalpha(128)
            (root / f"{i:02d}.png").write_bytes(encode(rgba, "PNG"))
        else:
            (root / f"{i:02d}.webp").write_bytes(encode(image, "WEBP", quality=80))
    return root


async def test_service_scores_equal_training_evaluation(tiny_bundle, image_folder, tmp_path):
    bundle = load_bundle(tiny_bundle)
    block = bundle.manifest.featurenorm.selected_block
    dataset = UnlabeledImageFolder(image_folder,
                                   transform=bundle.manifest.preprocessing.eval_transform(),
                                   cache_dir=tmp_path)
    evaluation = score_dataset(bundle.model, dataset, torch.device("cpu"), taps=[block])

    async with serve(settings(tiny_bundle, max_batch_size=8, max_batch_delay_ms=20)) as client:
        async def one(path):
            response = await client.post("/predict", files={"image": (path.name,
                                                                      path.read_bytes())})
            assert response.status_code == 200, response.text
            return response.json()

        served = await asyncio.gather(*(one(path) for path, _ in dataset.samples))

    assert len(served) == len(evaluation.pred) == 24
    for d in SERVED:
        np.testing.assert_allclose([r[d.name]["score"] for r in served],
                                   evaluation.of(d, block), rtol=RTOL)
    np.testing.assert_allclose([r["probability"] for r in served], evaluation.of("msp"),
                               rtol=RTOL)
    assert [r["class_index"] for r in served] == evaluation.pred.tolist()


@pytest.mark.parametrize("warm", [False, True], ids=["eager", "traced"])
def test_the_cpu_predictor_runs_channels_last_with_evaluations_scores(tiny_bundle, warm):
    """On the CPU the served model and its batches are NHWC (a speed choice, see
    service.inference.memory_format_for); training's evaluation runs NCHW. Once warmed up the
    pass is traced (TorchScript, so that it runs without the GIL). The scores must still
    agree, at one image and at a batch, eager and traced."""
    from service.inference import Predictor

    predictor = Predictor(load_bundle(tiny_bundle), "cpu", "float32", 8, 1)
    if warm:
        predictor.warm_up([1, 8])
    assert predictor.traced is warm
    convs = [m.weight for m in predictor.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    bundle = load_bundle(tiny_bundle)  # a fresh copy, in the default layout
    block = bundle.manifest.featurenorm.selected_block
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    want = score_batch(bundle.model.eval(), images, [block])
    for batch in (images[:1], images):
        got = predictor(list(batch))
        for d in SERVED:
            np.testing.assert_allclose([s.scores[d.name] for s in got],
                                       want.of(d, block)[:len(batch)], rtol=RTOL)
        assert [s.pred for s in got] == want.pred[:len(batch)].tolist()


@pytest.mark.parametrize("trace", ["raises", "differs"])
def test_a_trace_that_fails_or_differs_leaves_the_pass_eager(tiny_bundle, monkeypatch, caplog,
                                                             trace):
    """The trace is checked against the eager pass at warm-up: a model the tracer cannot
    follow, or a trace whose numbers are not the eager ones to the bit, is served eager, with
    a warning, and still scores like training's evaluation."""
    from service.inference import Predictor

    real_trace = torch.jit.trace

    def fake_trace(module, example, **kwargs):
        if trace == "raises":
            raise RuntimeError("cannot trace this")
        traced = real_trace(module, example, **kwargs)

        class Off(torch.nn.Module):  # the trace's rows, every score one ulp up
            def forward(self, batch):
                floats, ints = traced(batch)
                return torch.nextafter(floats, floats + 1), ints

        return Off()

    monkeypatch.setattr(torch.jit, "trace", fake_trace)
    predictor = Predictor(load_bundle(tiny_bundle), "cpu", "float32", 4, 1)
    with caplog.at_level("WARNING", logger="oodserve"):
        predictor.warm_up([1, 4])
    assert not predictor.traced
    assert "serving it eager" in caplog.text
    bundle = load_bundle(tiny_bundle)
    block = bundle.manifest.featurenorm.selected_block
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    want = score_batch(bundle.model.eval(), images, [block])
    got = predictor(list(images))
    for d in SERVED:
        np.testing.assert_allclose([s.scores[d.name] for s in got], want.of(d, block), rtol=RTOL)


def test_the_trace_can_be_turned_off(tiny_bundle):
    from service.inference import Predictor

    predictor = Predictor(load_bundle(tiny_bundle), "cpu", "float32", 4, 1, cpu_trace=False)
    predictor.warm_up([1, 4])
    assert not predictor.traced
