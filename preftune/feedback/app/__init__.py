"""The feedback web app: ``create_app(db_url)`` gives a FastAPI application serving the
annotator and admin pages, the JSON API under ``/api/v1`` and the static files."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from preftune.feedback.app.db import open_database
from preftune.feedback.app.service import FeedbackError
from preftune.feedback.app.web import Settings, SecurityMiddleware, make_limiter

__all__ = ["create_app", "app_from_env", "Settings"]


def _is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def _validation_message(exc: RequestValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
    if err.get("type") == "json_invalid":
        return f"malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}"
    return f"{where}: {err.get('msg')}"


def _serve_api_docs(app: FastAPI) -> None:
    """Swagger UI at /api/v1/docs from files installed with the app (fastapi-offline ships them):
    no CDN, and the page runs under the same strict Content-Security-Policy as every other page."""
    from importlib.resources import files

    from fastapi.responses import HTMLResponse

    try:
        assets = files("fastapi_offline") / "static"
    except ModuleNotFoundError:
        return  # the JSON schema is still at /api/v1/openapi.json
    app.mount("/api/v1/docs/static", StaticFiles(directory=str(assets)), name="docs-static")

    @app.get("/api/v1/docs", include_in_schema=False)
    def api_docs() -> HTMLResponse:
        return HTMLResponse(
            '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>preftune feedback API</title>'
            '<link rel="stylesheet" href="/api/v1/docs/static/swagger-ui.css"></head><body>'
            '<div id="swagger-ui"></div><script src="/api/v1/docs/static/swagger-ui-bundle.js"></script>'
            '<script src="/static/api-docs.js"></script></body></html>')


def create_app(db_url: str | None = None, settings: Settings | None = None) -> FastAPI:
    from preftune.feedback.app import api, pages

    engine, sessions = open_database(db_url)
    app = FastAPI(title="preftune feedback", version="1", docs_url=None,
                  openapi_url="/api/v1/openapi.json", redoc_url=None, swagger_ui_oauth2_redirect_url=None,
                  description="Push candidates, pull labels. Authenticate with `Authorization: Bearer TOKEN` "
                              "(printed by `preftune annotate add-user`).")
    app.state.engine, app.state.sessions = engine, sessions
    app.state.settings = settings or Settings()
    app.state.limiter = make_limiter(app.state.settings)
    app.include_router(api.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=str(Path(__file__).parent / "static")), name="static")
    _serve_api_docs(app)
    app.add_middleware(SecurityMiddleware, max_body_bytes=app.state.settings.max_body_bytes)

    def error_page(request: Request, status: int, message: str):
        return pages.templates.TemplateResponse(request, "error.html", {"user": None, "csrf": "", "message": message,
                                                                        "status": status}, status_code=status)

    @app.exception_handler(FeedbackError)
    async def feedback_error(request: Request, exc: FeedbackError):
        if _is_api(request):
            return JSONResponse({"detail": str(exc)}, status_code=exc.status)
        return error_page(request, exc.status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        message = _validation_message(exc)
        if _is_api(request):
            return JSONResponse({"detail": message}, status_code=422)
        return error_page(request, 422, message)

    @app.exception_handler(pages.LoginRequired)
    async def login_required(request: Request, exc: pages.LoginRequired):
        # After the log-in the browser GETs `next`: a form's action (POST only) would be a 405, so
        # a form sent with an expired session comes back to the page it was sent from.
        target = exc.path if request.method == "GET" else pages.page_of(exc.path)
        return RedirectResponse(f"/login?next={quote(target)}", status_code=303)

    @app.exception_handler(pages.PageForbidden)
    async def forbidden(request: Request, exc: pages.PageForbidden):
        return error_page(request, 403, "This page is for admins only.")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if _is_api(request) or exc.status_code == 401:
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        return error_page(request, exc.status_code, str(exc.detail))

    return app


def app_from_env() -> FastAPI:
    """The app of one worker process of ``preftune annotate serve --workers N``: the database URL
    and cookie setting come from the environment the command set."""
    import os

    secure = bool(os.environ.get("PREFTUNE_SECURE_COOKIES"))
    return create_app(os.environ.get("PREFTUNE_DB"), Settings(secure_cookies=secure))
