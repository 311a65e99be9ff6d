"""``GET /docs``: Swagger UI served from files installed with the service, not from a CDN.

FastAPI's own ``/docs`` page loads Swagger UI's script and stylesheet from a CDN, so it is
blank on a machine without internet access and tells a third party who reads the docs.
Here the page loads them from ``/docs/assets/``, served from the ``swagger-ui-bundle-v2``
package (Swagger UI 5, which renders the OpenAPI 3.1 documents FastAPI writes). ReDoc, which
no package bundles with the service, is not offered.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse
from starlette.exceptions import HTTPException
from swagger_ui_bundle import swagger_ui_path

DOCS_URL = "/docs"
ASSETS_URL = "/docs/assets"
# The files the page needs, and nothing else of the package's folder.
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
}


def install_docs(app: FastAPI) -> None:
    """Add ``/docs``, its assets and Swagger UI's OAuth2 redirect page to ``app`` (made with
    ``docs_url=None, redoc_url=None``)."""
    openapi_url, redirect_url = app.openapi_url, app.swagger_ui_oauth2_redirect_url

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")  # behind a path prefix
        return get_swagger_ui_html(
            openapi_url=root + openapi_url, title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon-32x32.png",
            oauth2_redirect_url=root + redirect_url if redirect_url else None,
            init_oauth=app.swagger_ui_init_oauth,
            # No validator badge: it would send the schema's address to swagger.io.
            swagger_ui_parameters={**(app.swagger_ui_parameters or {}), "validatorUrl": None})

    if redirect_url:
        @app.get(redirect_url, include_in_schema=False)
        async def swagger_ui_redirect() -> HTMLResponse:
            return get_swagger_ui_oauth2_redirect_html()

    @app.get(ASSETS_URL + "/{name}", include_in_schema=False)
    async def swagger_ui_asset(name: str) -> FileResponse:
        media_type = ASSETS.get(name)
        if media_type is None:
            raise HTTPException(404)
        return FileResponse(swagger_ui_path / name, media_type=media_type,
                            headers={"Cache-Control": "public, max-age=86400"})
