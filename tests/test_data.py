"""Data: archives extracted once, one decoder for every image mode, step-indexed batches."""

import io

import numpy as np
import pytest
from conftest import ISUN
from PIL import Image

from training.data.archives import extract_archive
from training.data.folders import load_rgb
from training.data.sampling import StepBatches, stratified_split
from training.data.sources import open_dataset


def test_archive_is_extracted_once(tmp_path):
    first = extract_archive(ISUN, tmp_path)
    marker = first / "marker"
    marker.write_text("x")
    assert extract_archive(ISUN, tmp_path) == first and marker.exists()
    assert len(open_dataset(f"{ISUN}", labeled=False, cache_dir=tmp_path)) == 8925


def test_torchvision_sets_are_never_downloaded(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"cifar10 \\(test\\) not found under {tmp_path}"):
        open_dataset(f"cifar10:{tmp_path}:test", labeled=True)


def test_synthetic_source_and_errors(tmp_path):
    data = open_dataset("synthetic:blobs:7:3", labeled=False, image_size=16)
    image, label = data[6]
    assert len(data) == 7 and label == -1 and image.size == (16, 16)
    with pytest.raises(ValueError, match="no class labels"):
        open_dataset("synthetic:blobs", labeled=True)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_dataset(str(tmp_path / "nowhere"), labeled=False)


def roundtrip(image: Image.Image, fmt: str, **kw) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    buf.seek(0)
    return Image.open(buf)


def test_every_mode_becomes_rgb():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    assert np.asarray(load_rgb(roundtrip(rgba, "PNG")))[0, 0].tolist() == [255, 255, 255]
    pal = Image.new("RGB", (4, 4), (0, 0, 255)).convert("P")
    assert np.asarray(load_rgb(roundtrip(pal, "PNG")))[0, 0].tolist() == [0, 0, 255]
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # red in CMYK
    red = np.asarray(load_rgb(roundtrip(cmyk, "JPEG")))[0, 0]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    deep = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert np.asarray(load_rgb(roundtrip(deep, "PNG"))).min() == 255


def test_exif_orientation_is_applied():
    wide = Image.new("RGB", (8, 4), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    assert load_rgb(roundtrip(wide, "JPEG", exif=exif)).size == (4, 8)


def test_step_batches_are_a_function_of_the_step():
    kw = {"seed": 5, "stream": 1, "epoch": 2}
    whole = list(StepBatches(100, 8, start=0, end=10, **kw))
    tail = list(StepBatches(100, 8, start=4, end=10, **kw))
    assert tail == whole[4:]  # resuming at step 4 sees the same batches
    indices = [i for batch in whole for i, _ in batch]
    assert len(set(indices)) == 80  # no repeats inside an epoch
    other_epoch = list(StepBatches(100, 8, start=0, end=10, seed=5, stream=1, epoch=3))
    assert other_epoch != whole
    ranks = [list(StepBatches(100, 8, start=0, end=5, rank=r, world=2, **kw)) for r in (0, 1)]
    assert not {i for b in ranks[0] for i, _ in b} & {i for b in ranks[1] for i, _ in b}
    wrapped = list(StepBatches(10, 8, start=0, end=5, wrap=True, **kw))
    flat = [i for b in wrapped for i, _ in b]
    assert sorted(flat[:10]) == list(range(10))  # each cycle is a full permutation
    assert sorted(flat) == sorted(list(range(10)) * 4)


def test_stratified_split_holds_out_each_class():
    targets = [0] * 50 + [1] * 30
    train, held = stratified_split(targets, 0.1, seed=0)
    assert sorted(train + held) == list(range(80))
    assert sum(targets[i] == 0 for i in held) == 5 and sum(targets[i] == 1 for i in held) == 3
    assert stratified_split(targets, 0.1, seed=0) == (train, held)
    assert stratified_split(targets, 0.1, seed=1) != (train, held)
