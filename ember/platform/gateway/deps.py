"""FastAPI dependencies: settings, Redis, the key store and role checks, as Annotated aliases."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import redis
from fastapi import Depends, Header, Request

from ember.config import Settings
from ember.platform.gateway.auth import Principal, verify_async
from ember.platform.gateway.protocol import Role


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_redis(request: Request) -> redis.Redis:
    """The app's sync Redis client (decode_responses=True); call it from the threadpool in async code."""
    return request.app.state.redis


async def get_principal(request: Request, authorization: Annotated[str | None, Header()] = None) -> Principal:
    """The caller, from Redis through the app's redis.asyncio client (no threadpool hop: a sync
    dependency would take one on every request)."""
    return await verify_async(request.app.state.aredis, authorization)


def require_roles(*roles: Role) -> Callable[..., Any]:
    """A dependency that authenticates the caller and requires one of `roles`."""

    async def dep(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        return principal.require(*roles)

    return dep


SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[redis.Redis, Depends(get_redis)]
AnyPrincipal = Annotated[Principal, Depends(get_principal)]
AdminPrincipal = Annotated[Principal, Depends(require_roles("admin"))]
OperatorPrincipal = Annotated[Principal, Depends(require_roles("admin", "operator"))]
