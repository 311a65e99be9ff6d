"""/docs works offline: the page and everything it loads come from the service itself."""

import re
from html.parser import HTMLParser
from urllib.parse import urlsplit

import pytest

pytestmark = pytest.mark.anyio


class _Urls(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


def page_urls(html: str) -> list[str]:
    """Every URL the page loads: src/href attributes and quoted URLs in its inline script."""
    parser = _Urls()
    parser.feed(html)
    quoted = re.findall(r"""url:\s*['"]([^'"]+)['"]|['"](https?://[^'"]+)['"]""", html)
    return parser.urls + [u for pair in quoted for u in pair if u]


async def test_docs_page_loads_only_local_assets(client):
    page = await client.get("/docs")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    html = page.text
    assert "SwaggerUIBundle" in html
    assert '"validatorUrl": null' in html  # Swagger UI's default would call swagger.io
    urls = page_urls(html)
    assert {"/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css",
            "/openapi.json"} <= set(urls), urls
    for url in urls:
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc, f"/docs loads {url} from elsewhere"
        response = await client.get(url)
        assert response.status_code == 200, (url, response.status_code)
        assert response.content, url
    js = await client.get("/docs/assets/swagger-ui-bundle.js")
    assert js.headers["content-type"].startswith("text/javascript")
    assert b"SwaggerUIBundle" in js.content
    css = await client.get("/docs/assets/swagger-ui.css")
    assert css.headers["content-type"].startswith("text/css")


@pytest.mark.parametrize("path", ["/docs/assets/index.html", "/docs/assets/../app.py",
                                  "/docs/assets/swagger-initializer.js", "/redoc"])
async def test_nothing_else_is_served_from_the_package(client, path):
    response = await client.get(path)
    assert response.status_code == 404
    assert response.json()["error"]["code"]


async def test_oauth2_redirect_page_is_local(client):
    response = await client.get("/docs/oauth2-redirect")
    assert response.status_code == 200
    assert not [u for u in page_urls(response.text) if urlsplit(u).netloc]
