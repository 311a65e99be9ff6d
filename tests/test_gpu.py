"""What only a GPU can show: CUDA graphs give training's evaluation scores, and reduced
precision keeps the default thresholds' decisions. Skipped, with the reason, without CUDA."""

import numpy as np
import pytest
import torch
from conftest import CIFAR10

from service.inference import Predictor
from service.settings import DEFAULT_BUNDLE
from service.thresholds import resolve_policy
from training.bundle import load_bundle
from training.data.sources import open_dataset
from training.detectors import SERVED
from training.evaluation import score_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")

RTOL = 1e-5  # the parity tests' tolerance (test_service_parity)
MAX_ACCEPT_SHIFT = 0.005  # reduced precision may move an accept rate by half a point at most


def test_graphs_on_cuda_give_evaluations_scores(tiny_bundle):
    """Batches of 1, 3 (run by the graph of 4, padded) and 8, in float32 on CUDA with graphs,
    against training's evaluation on the CPU."""
    predictor = Predictor(load_bundle(tiny_bundle), "cuda", "float32", 8, 1)
    predictor.warm_up([1, 8])
    assert sorted(predictor._graphs) == [1, 2, 4, 8]
    bundle = load_bundle(tiny_bundle)
    block = bundle.manifest.featurenorm.selected_block
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    want = score_batch(bundle.model.eval(), images, [block])
    for n in (1, 3, 8):
        got = predictor(list(images[:n]))
        for d in SERVED:
            np.testing.assert_allclose([s.scores[d.name] for s in got],
                                       want.of(d, block)[:n], rtol=RTOL)
        assert [s.pred for s in got] == want.pred[:n].tolist()


def accept_rates(precision: str, images: torch.Tensor) -> np.ndarray:
    """Share of ``images`` accepted as in-distribution by the default bundle's calibrated
    thresholds: energy, FeatureNorm, and the bundle's default rule."""
    bundle = load_bundle(DEFAULT_BUNDLE)
    policy = resolve_policy(bundle.manifest)
    predictor = Predictor(bundle, "cuda", precision, 256, 1)
    predictor.warm_up([1, 256])
    decisions = []
    for start in range(0, len(images), 256):
        chunk = images[start:start + 256]
        decisions += [(*decided.ood.values(), decided.combined) for decided in
                      (policy.decide(s.scores) for s in predictor(list(chunk)))]
    return 1.0 - np.mean(np.array(decisions, dtype=float), axis=0)


@pytest.mark.skipif(not CIFAR10.exists(), reason=f"{CIFAR10} not found")
def test_reduced_precision_keeps_the_default_accept_rates(cache_dir):
    dataset = open_dataset(f"{CIFAR10}#cifar10/test", labeled=True, cache_dir=cache_dir,
                           transform=load_bundle(DEFAULT_BUNDLE).manifest.preprocessing
                           .eval_transform())
    loader = torch.utils.data.DataLoader(dataset, batch_size=500, num_workers=8)
    images = torch.cat([x for x, _ in loader])
    reference = accept_rates("float32", images)
    print(f"\nfloat32 accept rates on {len(images)} CIFAR-10 test images (energy, featurenorm, "
          f"default rule): {np.round(reference * 100, 2)}")
    for precision in ("tf32", "float16", "bfloat16"):
        rates = accept_rates(precision, images)
        shift = np.abs(rates - reference)
        print(f"{precision}: {np.round(rates * 100, 2)}, shift {np.round(shift * 100, 2)} "
              "points")
        assert shift.max() <= MAX_ACCEPT_SHIFT, (precision, rates, reference)
