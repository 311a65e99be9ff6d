"""Hardening against the outside attack run (issue 18): one parameter set for the query and
the form, a per-request decode budget with fair sharing of the decode pool, header and read
limits, early refusals that every client reads, and no small leaks."""

import asyncio
import io
import time

import pytest
import torch
from PIL import Image
from service_helpers import encode, noise_image, png, serve, settings

pytestmark = pytest.mark.anyio


def assert_error(response, status: int, code: str, *words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    for word in words:
        assert word in error["message"], error


# -- parameters: the query and the form are one set -------------------------------------

IMAGE = png(noise_image(0))


async def form_predict(client, data: dict, params=None, files=None):
    return await client.post("/predict", data=data, params=params,
                             files=files or {"image": ("a.png", IMAGE)})


@pytest.mark.parametrize("fields,word", [
    ({"tpr": "1.5", "decision": "bogus"}, "tpr"),
    ({"tpr": "1.5", "decision": "bogus"}, "decision"),
    ({"energy_threshold": "nan"}, "energy_threshold"),
    ({"colour": "blue"}, "colour"),  # unknown field: not ignored
])
async def test_bad_or_unknown_form_fields_are_422(client, fields, word):
    assert_error(await form_predict(client, fields), 422, "invalid_request", word)


async def test_valid_form_fields_are_honoured_like_query_parameters(client):
    by_form = (await form_predict(client, {"tpr": "0.9", "decision": "all",
                                           "top_k": "2"})).json()
    by_query = (await form_predict(client, {}, params={"tpr": "0.9", "decision": "all",
                                                       "top_k": "2"})).json()
    plain = (await form_predict(client, {})).json()
    assert by_form["energy"]["threshold_source"] == "tpr"
    assert by_form["featurenorm"]["tpr"] == 0.9 and by_form["decision"] == "all"
    assert len(by_form["top_k"]) == 2
    for key in ("energy", "featurenorm", "decision", "top_k"):
        assert by_form[key] == by_query[key]
    assert plain["energy"]["threshold_source"] == "bundle"


async def test_batch_form_fields_are_honoured_and_checked(client):
    files = [("images", ("a.png", IMAGE)), ("images", ("b.png", IMAGE))]
    ok = await client.post("/predict/batch", data={"tpr": "0.9"}, files=files)
    assert ok.status_code == 200, ok.text
    assert all(r["prediction"]["energy"]["threshold_source"] == "tpr"
               for r in ok.json()["results"])
    bad = await client.post("/predict/batch", data={"tpr": "1.5"}, files=files)
    assert_error(bad, 422, "invalid_request", "tpr")


async def test_a_parameter_given_twice_must_agree(client):
    same = await form_predict(client, {"tpr": "0.9"}, params={"tpr": "0.9"})
    assert same.status_code == 200, same.text
    differ = await form_predict(client, {"tpr": "0.8"}, params={"tpr": "0.9"})
    assert_error(differ, 422, "invalid_request", "tpr", "different values")
    twice = await client.post("/predict", files=[("image", ("a.png", IMAGE)),
                                                 ("tpr", (None, "0.8")),
                                                 ("tpr", (None, "0.9"))])
    assert_error(twice, 422, "invalid_request", "tpr", "different values")


async def test_a_second_image_on_predict_is_422(client):
    files = [("image", ("a.png", IMAGE)), ("image", ("b.png", png(noise_image(1))))]
    assert_error(await client.post("/predict", files=files), 422, "invalid_request",
                 "image", "/predict/batch")


async def test_a_file_under_another_name_is_422(client):
    files = [("image", ("a.png", IMAGE)), ("extra", ("b.png", IMAGE))]
    assert_error(await client.post("/predict", files=files), 422, "invalid_request",
                 "extra")
    batch = [("images", ("a.png", IMAGE)), ("image", ("b.png", IMAGE))]
    assert_error(await client.post("/predict/batch", files=batch), 422, "invalid_request",
                 "form.image")


# -- the per-request decode budget and the fair share of the decode pool -----------------

async def test_a_batch_of_large_blank_pngs_is_refused_within_its_budget(tiny_bundle,
                                                                        monkeypatch):
    """The attack at small scale: each all-zero PNG passes the per-image limit and is tiny
    on the wire, but together they would decode to 8 Mpx; the request gets 413 after at most
    the budget's worth of decoding."""
    import service.decoding as decoding

    decoded = []
    load_rgb = decoding.load_rgb
    monkeypatch.setattr(decoding, "load_rgb",
                        lambda image: decoded.append(image.size) or load_rgb(image))
    blank = png(Image.new("RGB", (1000, 1000)))
    app_settings = settings(tiny_bundle, max_image_pixels=1_000_000,
                            max_request_pixels=2_500_000, decode_workers=2)
    async with serve(app_settings) as client:
        files = [("images", (f"{i}.png", blank)) for i in range(8)]
        response = await client.post("/predict/batch", files=files)
        assert_error(response, 413, "request_too_many_pixels", "2500000",
                     "OODSERVE_MAX_REQUEST_PIXELS")
        assert len(decoded) <= 2  # the budget's worth, not 8
        decoded.clear()
        ok = await client.post("/predict/batch", files=files[:2])  # within the budget
        assert ok.status_code == 200 and len(decoded) == 2
        single = await client.post("/predict", files={"image": ("a.png", blank)})
        assert single.status_code == 200


async def test_one_request_cannot_monopolise_the_decode_pool(tiny_bundle, monkeypatch):
    """One decoding thread, a batch of 24 slow images in flight: a single image sent just
    after it is answered long before the batch, not behind its 24 queued decodes."""
    import service.decoding as decoding

    load_rgb = decoding.load_rgb
    monkeypatch.setattr(decoding, "load_rgb",
                        lambda image: (time.sleep(0.05), load_rgb(image))[1])
    async with serve(settings(tiny_bundle, decode_workers=1)) as client:
        done = {}

        async def batch():
            files = [("images", (f"{i}.png", png(noise_image(i)))) for i in range(24)]
            response = await client.post("/predict/batch", files=files)
            done["batch"] = time.perf_counter()
            assert response.status_code == 200

        async def probe():
            await asyncio.sleep(0.15)
            start = time.perf_counter()
            response = await client.post("/predict", files={"image": ("p.png", IMAGE)})
            done["probe"] = time.perf_counter()
            assert response.status_code == 200
            return done["probe"] - start

        _, probe_s = await asyncio.gather(batch(), probe())
        assert done["probe"] < done["batch"]
        assert probe_s < 0.5, probe_s  # two decodes' wait, not 20


def test_large_jpegs_are_decoded_reduced_and_small_ones_exactly(tiny_bundle):
    from service.decoding import DRAFT_FACTOR, Decoder, PixelBudget
    from training.bundle import load_bundle
    from training.data.folders import load_rgb

    pre = load_bundle(tiny_bundle).manifest.preprocessing
    decoder = Decoder(pre, 100_000_000)
    side = 2 * DRAFT_FACTOR * pre.resize_size  # the smallest size that is reduced
    big = encode(noise_image(3, (side * 2, side * 2)), "JPEG", quality=92)
    budget = PixelBudget(10**9)
    reduced = decoder(big, budget)
    # decoded at 1/4 scale (the shorter side kept >= side / 2), and counted so
    assert budget.used == (side // 2) ** 2
    with Image.open(io.BytesIO(big)) as image:
        exact = decoder.transform(load_rgb(image))
    assert (reduced - exact).abs().mean() < 0.02  # close to the full decode
    small = encode(noise_image(4, (side - 8, side - 8)), "JPEG", quality=92)
    budget = PixelBudget(10**9)
    with Image.open(io.BytesIO(small)) as image:
        assert torch.equal(decoder(small, budget), decoder.transform(load_rgb(image)))
    assert budget.used == (side - 8) ** 2
