"""The bad-input corpus (tests/bad_inputs.py) against the service with its default limits:
every case gets its documented status, error code and message, and the service stays
healthy and keeps scoring images exactly as before."""

import re
from pathlib import Path

import pytest
from bad_inputs import DEFAULT_UPLOAD_LIMIT, build
from service_helpers import predict_ok, serve, settings
from uploads import noise_png

from service.schemas import ErrorResponse, PredictResponse
from service.settings import Settings

pytestmark = pytest.mark.anyio

CASES = build()
SERVICE_DOCS = Path(__file__).resolve().parents[1] / "docs" / "service.md"


@pytest.fixture(scope="module")
async def client(tiny_bundle):
    async with serve(settings(tiny_bundle)) as client:  # the default limits
        client.reference = await predict_ok(client, noise_png(42))
        yield client


def test_the_corpus_assumes_the_default_limits():
    defaults = Settings(_env_file=None)
    assert defaults.max_upload_bytes == DEFAULT_UPLOAD_LIMIT
    assert defaults.max_image_pixels == 25_000_000
    assert defaults.max_batch_images == 64
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
async def test_case_gets_its_documented_answer(client, case):
    response = await client.post(case.path, content=case.body, headers=case.headers)
    assert response.status_code == case.status, (case.what, response.text)
    if case.status == 200:
        PredictResponse.model_validate_json(response.content)
        return
    error = ErrorResponse.model_validate_json(response.content).error
    assert error.code == case.code, (case.what, response.text)
    for word in case.words:
        assert word in error.message, (case.what, error.message)
    assert error.id is None  # ids are for 500s only


async def test_still_healthy_and_unchanged_after_the_corpus(client):
    for case in CASES:  # once more, back to back
        assert (await client.post(case.path, content=case.body,
                                  headers=case.headers)).status_code == case.status
    assert (await client.get("/healthz")).status_code == 200
    assert (await client.get("/readyz")).status_code == 200
    again = await predict_ok(client, noise_png(42))
    for key in ("class_index", "probability", "energy", "featurenorm"):
        assert again[key] == client.reference[key]


def readme_error_table() -> set[tuple[int, str]]:
    """(status, code) pairs of the error table in docs/service.md."""
    pairs = set()
    for line in SERVICE_DOCS.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and re.fullmatch(r"\d{3}(, \d{3})*", cells[0]):
            statuses = [int(s) for s in cells[0].split(", ")]
            codes = re.findall(r"`([a-z_]+)`", cells[1])
            pairs |= {(s, c) for s in statuses for c in codes}
    return pairs


def test_every_answer_of_the_corpus_is_documented():
    documented = readme_error_table()
    for case in CASES:
        if case.status != 200:
            assert (case.status, case.code) in documented, case.name
