"""The interactive API docs at `/docs`: Swagger UI served from the package itself, so the page
works on a network without internet access, under a CSP that allows this origin only and no
inline script."""

from __future__ import annotations

import functools
from importlib import resources

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse, Response

from phivault.access.guards import Public

router = APIRouter(include_in_schema=False)

# swagger-ui-dist from the npm registry, vendored in web/static/swagger/ with its LICENSE and
# NOTICE (Apache-2.0). Subresource Integrity still pins these exact bytes (the hashes are the
# npm package's), and the version is in the assets' paths, so they can be cached for a year:
# a new version comes under new paths.
SWAGGER_VERSION = "5.17.14"
ASSETS = f"/docs/swagger-ui-{SWAGGER_VERSION}"
BUNDLE_SRI = "sha384-wmyclcVGX/WhUkdkATwhaK1X1JtiNrr2EoYJ+diV3vj4v6OC5yCeSu+yW13SYJep"
CSS_SRI = "sha384-wxLW6kwyHktdDGr6Pv1zgm/VGJh99lfUbzSn6HNHBENZlCN7W602k9VkGdxuFvPn"
ASSET_CACHE = "public, max-age=31536000, immutable"
DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
PAGE = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>phivault API</title>
<link rel="stylesheet" href="{ASSETS}/swagger-ui.css" integrity="{CSS_SRI}"></head>
<body><div id="swagger-ui"></div>
<script src="{ASSETS}/swagger-ui-bundle.js" integrity="{BUNDLE_SRI}"></script>
<script src="/docs/init.js"></script></body></html>
"""
# No validator badge: it would call validator.swagger.io, outside this origin.
INIT = ('window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", '
        'validatorUrl: null, persistAuthorization: false});\n')


@functools.cache
def asset(name: str) -> bytes:
    """The bytes of one vendored Swagger UI file, read once per process."""
    return resources.files("phivault.web").joinpath("static", "swagger", name).read_bytes()


@router.get("/docs", dependencies=[Depends(Public())])
async def docs() -> HTMLResponse:
    return HTMLResponse(PAGE, headers={"content-security-policy": DOCS_CSP})


@router.get("/docs/init.js", dependencies=[Depends(Public())])
async def docs_init() -> Response:
    return Response(INIT, media_type="text/javascript",
                    headers={"content-security-policy": DOCS_CSP})


@router.get(f"{ASSETS}/swagger-ui-bundle.js", dependencies=[Depends(Public())])
async def swagger_bundle() -> Response:
    return Response(asset("swagger-ui-bundle.js"), media_type="text/javascript",
                    headers={"cache-control": ASSET_CACHE})


@router.get(f"{ASSETS}/swagger-ui.css", dependencies=[Depends(Public())])
async def swagger_css() -> Response:
    return Response(asset("swagger-ui.css"), media_type="text/css",
                    headers={"cache-control": ASSET_CACHE})
