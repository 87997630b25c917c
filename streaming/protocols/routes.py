"""Every WebSocket path of the server's port, in one place: the session each one runs and how it
takes an API key and words a refusal (streaming.server.auth). The WhisperLive protocol has a port
of its own (streaming.server.whisperlive_port), where every path is its.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from websockets.asyncio.server import ServerConnection

from ..server.auth import NATIVE, REALTIME, SUBSCRIBER, TWILIO, Endpoint
from .base import ProtocolSession, SessionContext
from .native import NativeSession
from .realtime import RealtimeSession
from .twilio import CALLS_PREFIX, CallSubscriber, TwilioSession


@dataclass(frozen=True)
class Route:
    path: str
    """The path, or a prefix ending in "/" that takes every path under it."""
    endpoint: Endpoint
    session: Callable[[ServerConnection, SessionContext], ProtocolSession]
    shown: str = ""
    """How the 404 page and the log name it, where not by `path`."""


ROUTES = (
    Route("/v1/stream", NATIVE, NativeSession),
    Route("/v1/realtime", REALTIME, RealtimeSession),
    Route("/v1/twilio", TWILIO, TwilioSession),
    Route(CALLS_PREFIX, SUBSCRIBER, CallSubscriber, "/v1/calls/{callSid}"),
)

WEBSOCKET_PATHS = ", ".join(route.shown or route.path for route in ROUTES)
"""The WebSocket paths, for people: "/v1/stream, /v1/realtime, /v1/twilio, /v1/calls/{callSid}"."""


def find_route(path: str) -> Route | None:
    """The route of a WebSocket path: its own, or the longest prefix route above it."""
    exact = [route for route in ROUTES if route.path == path]
    if exact:
        return exact[0]
    prefixes = [route for route in ROUTES if route.path.endswith("/") and path.startswith(route.path)]
    return max(prefixes, key=lambda route: len(route.path)) if prefixes else None
