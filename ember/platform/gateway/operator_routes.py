"""Routes for operators and the console: who am I, nodes, function statistics, and the
`/console` page itself (static files shipped in the package; they hold no data, every number
comes from the authenticated routes below and the energy API)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles

from ember.errors import NotFound
from ember.platform.gateway.deps import AnyPrincipal, require_roles
from ember.platform.gateway.fleet import functions_view, nodes_view
from ember.platform.gateway.registry import FunctionRegistry

router = APIRouter()
CONSOLE_DIR = Path(__file__).with_name("console")
# the page runs only its own script and talks only to this gateway
CONSOLE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

Operator = Depends(require_roles("admin", "operator"))


@router.get("/v1/me")
async def whoami(principal: AnyPrincipal) -> dict[str, Any]:
    """The calling key's id, role and name (the console adapts to the role)."""
    return {"id": principal.id, "role": principal.role, "name": principal.name}


@router.get("/v1/nodes", dependencies=[Operator])
async def list_nodes(request: Request) -> dict[str, Any]:
    app = request.app
    return await to_thread.run_sync(nodes_view, app.state.cluster, app.state.redis)


@router.get("/v1/stats/functions")
async def function_stats(request: Request, principal: AnyPrincipal) -> dict[str, Any]:
    """Admins and operators see every function, developers their own."""
    principal.require("admin", "operator", "developer")
    app = request.app

    def read() -> dict[str, Any]:
        specs = [s for s in FunctionRegistry(app.state.redis).list()
                 if principal.role != "developer" or s.owner == principal.id]
        return functions_view(specs, app.state.cluster, app.state.redis, app.state.stats)

    body = await to_thread.run_sync(read)
    body["gateway"] = app.state.gateway_id
    return body


@router.get("/console", include_in_schema=False)
async def console() -> Response:
    return FileResponse(CONSOLE_DIR / "index.html", media_type="text/html", headers=CONSOLE_HEADERS)


@router.get("/console/", include_in_schema=False)
async def console_slash() -> Response:
    return RedirectResponse("/console")


class ConsoleFiles(StaticFiles):
    """The console's script and style, with the console's headers."""

    async def get_response(self, path: str, scope: Any) -> Response:
        if path not in ("console.js", "console.css"):
            raise NotFound(f"no console file {path!r}")
        resp = await super().get_response(path, scope)
        resp.headers.update(CONSOLE_HEADERS)
        return resp


def mount_console(app: Any) -> None:
    app.include_router(router)
    app.mount("/console/static", ConsoleFiles(directory=CONSOLE_DIR), name="console-static")
