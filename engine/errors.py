"""The engine's exception types: a caller can tell bad input from a bad model from an exhausted resource."""


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """The request itself is wrong (too long, bad sampling parameter): the caller should not retry it unchanged."""


class ModelLoadError(EngineError):
    """The model directory is missing, incomplete or corrupt; the message names the file and the problem."""


class ResourceExhaustedError(EngineError):
    """Not enough KV blocks (or other capacity) right now; the same request may succeed later or elsewhere."""


class UnknownRequestError(EngineError, KeyError):
    """An operation named a request id the engine does not hold."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable.
        return str(self.args[0]) if self.args else "unknown request"


class RequestFailedError(EngineError):
    """Computing this one request raised an error; the engine dropped it (its blocks are free) and goes on with the
    others. The same request would likely fail the same way elsewhere, so callers should not retry it on other nodes.
    """

    def __init__(self, request_id: str, message: str) -> None:
        super().__init__(f"request {request_id!r} failed inside the engine: {message}")
        self.request_id = request_id


class EngineBrokenError(EngineError):
    """The engine cannot compute anything any more (every recent forward failed, whatever it held): its process
    should stop and be restarted."""
