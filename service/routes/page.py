"""The web page (drop an image, see its neighbours) and the offline Swagger UI at /docs."""

# No `from __future__ import annotations`, as in the other route modules.
from importlib import resources
from pathlib import Path

from fastapi import APIRouter
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse

PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self' 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"
)
DOCS_ASSETS_URL = "/docs-assets"


def page_html() -> str:
    return resources.files("service").joinpath("static/index.html").read_text(encoding="utf-8")


def docs_assets() -> Path | None:
    """Swagger UI's files from the fastapi-offline package, so /docs works without internet."""
    try:
        import fastapi_offline
    except ImportError:
        return None
    static = Path(fastapi_offline.__file__).parent / "static"
    return static if (static / "swagger-ui-bundle.js").is_file() else None


def router() -> APIRouter:
    api = APIRouter()
    page = page_html()  # read once, when the app is built

    @api.get("/", response_class=HTMLResponse, tags=["page"], operation_id="web_page", summary="The web page")
    async def index_page() -> HTMLResponse:
        """The web page: drop an image, see its neighbours."""
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"})

    return api


def docs_router() -> APIRouter:
    """/docs served from the files under DOCS_ASSETS_URL (the app mounts them) instead of a CDN."""
    api = APIRouter(include_in_schema=False)

    @api.get("/docs")
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="imgsearch - API docs",
            swagger_js_url=f"{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS_URL}/favicon.png",
            oauth2_redirect_url="/docs/oauth2-redirect",
        )

    @api.get("/docs/oauth2-redirect")
    async def docs_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    return api
