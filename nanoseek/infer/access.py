"""Who may reach the server, and with what: the API key, the body limit, and the warning for a server
exposed beyond this machine without a key. `Gate` also counts every response by endpoint and status."""

from __future__ import annotations

import hmac
import ipaddress

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from nanoseek.infer.metrics import Metrics
from nanoseek.infer.protocol import APIError

ENDPOINTS = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/tokenize",
             "/detokenize", "/tokenizer_info")  # metric labels; any other path counts as "other"


def require_key(key: str):
    """A dependency that answers 401 unless the request carries `Authorization: Bearer <key>`; through FastAPI's
    HTTPBearer, so the schema documents the scheme."""
    expected = key.encode()
    bearer = HTTPBearer(auto_error=False, description="the server's --api-key")

    async def check(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), expected):
            raise APIError(401, "missing or wrong API key: send the header `Authorization: Bearer <key>`",
                           code="invalid_api_key")
    return check


class Gate:
    """ASGI middleware: counts responses by endpoint and status, and refuses bodies over `limit` bytes (413)
    from Content-Length, or while the body is read when it has none."""

    def __init__(self, app, limit: int, metrics: Metrics):
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = 500

        async def counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        too_large = APIError(413, f"the request body exceeds max_body_bytes={self.limit} (the server's "
                                  "--max-body-mb)", code="request_too_large")
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, too_large.message)
            return message

        try:
            length = int(dict(scope["headers"]).get(b"content-length", b"0"))
        except ValueError:
            length = 0
        try:
            if length > self.limit:
                await too_large.response()(scope, receive, counted)
            else:
                await self.app(scope, limited, counted)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning for a server reachable beyond this machine without an API key (None when there is none)."""
    if api_key:
        return None
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return None
    return (f"WARNING: serving on {host}, reachable from other machines, without --api-key: anyone who can "
            "reach this port can use the model. Pass --api-key KEY (clients send `Authorization: Bearer KEY`) "
            "or bind 127.0.0.1.")
