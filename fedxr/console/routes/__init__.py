"""The console's routes, one router per area. Every router but ``public`` carries the ``signed_in`` dependency."""

from fastapi import APIRouter, Depends

from fedxr.console.security import signed_in


def protected_router() -> APIRouter:
    """A router whose every route demands a session before the route's own code runs."""
    return APIRouter(dependencies=[Depends(signed_in)])
