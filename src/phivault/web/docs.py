"""The interactive API docs at `/docs`, served without inline script so a strict CSP holds."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse, Response

from phivault.access.guards import Public

router = APIRouter(include_in_schema=False)

# A pinned Swagger UI with Subresource Integrity: the browser runs these exact bytes or nothing
# (hashes of swagger-ui-dist 5.17.14 from the npm registry).
SWAGGER = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5.17.14"
BUNDLE_SRI = "sha384-wmyclcVGX/WhUkdkATwhaK1X1JtiNrr2EoYJ+diV3vj4v6OC5yCeSu+yW13SYJep"
CSS_SRI = "sha384-wxLW6kwyHktdDGr6Pv1zgm/VGJh99lfUbzSn6HNHBENZlCN7W602k9VkGdxuFvPn"
DOCS_CSP = (
    "default-src 'none'; script-src 'self' https://cdn.jsdelivr.net; "
    "style-src https://cdn.jsdelivr.net; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
PAGE = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>phivault API</title>
<link rel="stylesheet" href="{SWAGGER}/swagger-ui.css" integrity="{CSS_SRI}"
 crossorigin="anonymous"></head>
<body><div id="swagger-ui"></div>
<script src="{SWAGGER}/swagger-ui-bundle.js" integrity="{BUNDLE_SRI}"
 crossorigin="anonymous"></script>
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
