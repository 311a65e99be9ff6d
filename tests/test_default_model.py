"""The shipped default bundle: it loads, the service serves it with no settings, and it
behaves as its report says on real CIFAR-10 test images and on noise."""

import io

import numpy as np
import pytest
from conftest import CIFAR10
from PIL import Image
from service_helpers import predict_ok, serve

from service.settings import DEFAULT_BUNDLE, Settings
from training.bundle import load_bundle
from training.data.archives import extract_archive

pytestmark = pytest.mark.anyio


def test_the_default_bundle_loads_and_records_its_evaluation():
    m = load_bundle(DEFAULT_BUNDLE).manifest
    assert m.name == "cifar10-resnet56-gregplus" and m.architecture.name == "resnet56"
    assert m.featurenorm.selected_block == max(m.featurenorm.norm_ratios,
                                               key=m.featurenorm.norm_ratios.get)
    assert set(m.evaluation["ood"]) == {"isun", "gaussian", "uniform", "rademacher", "blobs"}
    notice = (DEFAULT_BUNDLE / "NOTICE").read_text()  # BSD-2 of the initial weights
    assert "Yerlan Idelbayev" in notice and "Redistribution" in notice


async def test_with_no_settings_the_service_serves_the_default_model(cache_dir):
    test_dir = extract_archive(CIFAR10, cache_dir) / "cifar10" / "test"
    classes = sorted(p.name for p in test_dir.iterdir())
    images = [(c, f.read_bytes()) for c in classes
              for f in sorted((test_dir / c).iterdir())[:5]]  # 50 real ID images
    rng = np.random.default_rng(0)
    noise = []
    for _ in range(20):
        pixels = (rng.normal(0.5, 0.25, (32, 32, 3)).clip(0, 1) * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        noise.append(buf.getvalue())
    async with serve(Settings(_env_file=None, torch_threads=1)) as client:
        assert (await client.get("/v1/model")).json()["name"] == "cifar10-resnet56-gregplus"
        id_results = [(c, await predict_ok(client, data)) for c, data in images]
        noise_results = [await predict_ok(client, data) for data in noise]
    correct = np.mean([r["label"] == c for c, r in id_results])
    id_kept = np.mean([not r["energy"]["is_ood"] for _, r in id_results])
    # the report: 89.8% accuracy, 95% TPR on test, 0% FPR on Gaussian noise
    assert correct >= 0.8, correct
    assert id_kept >= 0.8, id_kept
    assert all(r["energy"]["is_ood"] and r["is_ood"] for r in noise_results)
