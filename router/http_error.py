"""HttpError: an error answered in OpenAI's JSON shape, by every HTTP route of the router."""

from __future__ import annotations

from typing import Any

import grpc

from router.errors import RouterError

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class HttpError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
        code: str | None = None, close: bool = False,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.close = close  # end the connection after answering (the rest of the body was never read)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def from_router(cls, exc: RouterError) -> HttpError:
        status = _HTTP_STATUS.get(exc.code, 500)
        code = "context_length_exceeded" if exc.too_long else "model_not_found" if status == 404 else None
        kind = "invalid_request_error" if status < 500 else "server_error"
        return cls(status, exc.message, type_=kind, code=code)
