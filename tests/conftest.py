"""Shared fixtures: paths to the real data and weights beside the repository, the tiny
test bundle, and the service serving it."""

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from service_helpers import serve, settings

from training.config import load_config
from training.data.archives import extract_archive

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR10 = SHARED / "data" / "cifar10.tar.gz"
ISUN = SHARED / "data" / "isun.tar.gz"
TINY_AUX = SHARED / "data" / "tinyimagenet-aux.tar.gz"
RESNET20 = SHARED / "checkpoints" / "resnet20-12fca82f.th"


@pytest.fixture(scope="session")
def anyio_backend():
    """The async tests (service, deployment) run on asyncio, the loop uvicorn uses."""
    return "asyncio"


def _kept_torch_threads():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def _torch_threads_per_module():
    """Put torch's thread count back after each module and each test. Building a Predictor
    (a module's service, or a test's own) sets it for the whole process, as the service means
    to, and the order of a float sum depends on it: a test's numbers depended on whether a
    service test had run before it. Per module too, because a module's service is started
    before any test's fixture records the count."""
    yield from _kept_torch_threads()


@pytest.fixture(autouse=True)
def _torch_threads_per_test():
    yield from _kept_torch_threads()


@pytest.fixture(scope="module")
async def client(tiny_bundle):
    """The service on the tiny bundle with default settings, one per test module, through a
    real httpx client. A module that needs other settings defines its own ``client``."""
    async with serve(settings(tiny_bundle)) as client:
        yield client


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Extraction cache for the tests; reuses OODSERVE_CACHE when set to save time."""
    return Path(os.environ.get("OODSERVE_CACHE") or tmp_path_factory.mktemp("cache"))


def digest(tensors) -> str:
    """sha256 over named tensors, to compare weights bit for bit."""
    h = hashlib.sha256()
    for name, value in sorted(tensors):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]


def make_bundle(out_dir: Path, seed: int = 0, taps=("layer2.2", "layer3.2")) -> Path:
    """A small but complete bundle: randomly initialised ResNet-20 (CIFAR-10 classes),
    thresholds calibrated on Gaussian images through the same functions the pipeline uses."""
    import torch

    from training.bundle import export_bundle
    from training.calibration import calibrate_score
    from training.data.transforms import Preprocessing
    from training.detectors import SERVED
    from training.evaluation import score_batch
    from training.models import build_model

    torch.manual_seed(seed)
    model = build_model("resnet20", num_classes=10).eval()
    images = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    scores = score_batch(model, images, taps)
    selected = taps[0]
    manifest = {
        "name": "test-resnet20", "version": f"0.0.{seed}",
        "architecture": {"name": "resnet20", "options": {"num_classes": 10}},
        "classes": CIFAR10_CLASSES,
        "preprocessing": Preprocessing().model_dump(),
        "taps": list(taps),
        "featurenorm": {"selected_block": selected,
                        "norm_ratios": {t: 1.0 + i for i, t in enumerate(taps)}},
        "calibration": {d.name: calibrate_score(scores.of(d, selected).numpy(), d.higher_is_id,
                                                0.95) for d in SERVED},
    }
    return export_bundle(out_dir, model, manifest)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """Directory of a valid bundle; tests that alter it must copy it first."""
    return make_bundle(tmp_path_factory.mktemp("bundles") / "tiny")


PER_CLASS, AUX_IMAGES = 12, 48


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, cache_dir) -> dict[str, Path]:
    """A few real CIFAR-10 training images per class and real Tiny ImageNet outliers."""
    root = tmp_path_factory.mktemp("tiny")
    cifar = extract_archive(CIFAR10, cache_dir) / "cifar10" / "train"
    for class_dir in sorted(cifar.iterdir()):
        dest = root / "id" / class_dir.name
        dest.mkdir(parents=True)
        for f in sorted(class_dir.iterdir())[:PER_CLASS]:
            shutil.copy(f, dest / f.name)
    aux = extract_archive(TINY_AUX, cache_dir) / "tinyimagenet-aux"
    (root / "aux").mkdir()
    for f in sorted(aux.rglob("*.jpg"))[:AUX_IMAGES]:
        shutil.copy(f, root / "aux" / f.name)
    return {"id": root / "id", "aux": root / "aux", "cache": Path(cache_dir)}


def tiny_config(tiny_data, run_dir: Path, *extra: str):
    overrides = [
        f"run_dir={run_dir}", f"data.train={tiny_data['id']}", f"data.aux={tiny_data['aux']}",
        f"data.cache_dir={tiny_data['cache']}", "data.num_workers=0", "data.val_fraction=0.2",
        f"model.pretrained={RESNET20}", "train.batch_size=8", "train.aux_batch_size=16",
        "sampler.pool_size=32", "sampler.num_clusters=8", "train.device=cpu",
        "loss.m_in=-12", "loss.m_out=-8", "export.interpolation_candidates=[]",
        "evaluation.validation_ood={}", *extra,
    ]
    return load_config("configs/cifar10_resnet20_gregplus.yaml", overrides)
