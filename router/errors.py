"""RouterError: what every part of the router raises for a request it cannot serve."""

from __future__ import annotations

import grpc


class RouterError(Exception):
    """A request the router cannot serve: a status code and a message for the client (gRPC or HTTP)."""

    def __init__(self, code: grpc.StatusCode, message: str, too_long: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.too_long = (
            too_long  # the prompt exceeds the context (HTTP answers with OpenAI's error code for it)
        )
