"""The interactive API docs at `/docs`, served without inline script so a strict CSP holds."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse, Response

from phivault.access.guards import Public

router = APIRouter(include_in_schema=False)

SWAGGER = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5"
DOCS_CSP = (
    "default-src 'none'; script-src 'self' https://cdn.jsdelivr.net; "
    "style-src https://cdn.jsdelivr.net; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
PAGE = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>phivault API</title>
<link rel="stylesheet" href="{SWAGGER}/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="{SWAGGER}/swagger-ui-bundle.js"></script>
<script src="/docs/init.js"></script></body></html>
"""
INIT = ('window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", '
        'persistAuthorization: false});\n')


@router.get("/docs", dependencies=[Depends(Public())])
async def docs() -> HTMLResponse:
    return HTMLResponse(PAGE, headers={"content-security-policy": DOCS_CSP})


@router.get("/docs/init.js", dependencies=[Depends(Public())])
async def docs_init() -> Response:
    return Response(INIT, media_type="text/javascript",
                    headers={"content-security-policy": DOCS_CSP})
