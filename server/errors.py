"""APIError: every failure the API reports, as OpenAI's `{"error": {message, type, param, code}}` body.

Routes and the queue raise these; one handler in app.py turns them into responses, and `sse()` turns them
into an in-band error event once a stream has started. Every status code we send is made here.
"""

from __future__ import annotations

import json


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def json(self) -> str:
        return json.dumps(self.body())


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def context_too_long(max_model_len: int, num_prompt_tokens: int, max_tokens: int, param: str) -> APIError:
    total = num_prompt_tokens + max_tokens
    message = (
        f"This model's maximum context length is {max_model_len} tokens. However, you requested {total} tokens "
        f"({num_prompt_tokens} in the prompt, {max_tokens} for the completion). "
        "Please reduce the prompt or max_tokens."
    )
    return APIError(400, message, param=param, code="context_length_exceeded")


def unauthorized() -> APIError:
    return APIError(401, "Invalid or missing API key.", code="invalid_api_key")


def not_found(message: str, param: str | None = None, code: str = "not_found") -> APIError:
    return APIError(404, message, param=param, code=code)


def method_not_allowed(method: str, path: str) -> APIError:
    return APIError(405, f"Method {method} is not allowed on {path}.", code="method_not_allowed")


def body_too_large(limit: int) -> APIError:
    return APIError(413, f"Request body is larger than {limit} bytes.", code="request_too_large")


def queue_full(retry_after_s: int) -> APIError:
    message = "The server is busy: the request queue is full. Retry later."
    headers = {"Retry-After": str(retry_after_s)}
    return APIError(429, message, type="rate_limit_error", code="queue_full", headers=headers)


def unavailable(reason: str) -> APIError:
    """503: `reason` is "loading" or "draining"; clients should retry elsewhere or later."""
    message = {"loading": "The model is still loading.", "draining": "The server is shutting down."}[reason]
    return APIError(503, message, type="service_unavailable_error", code=reason, headers={"Retry-After": "1"})


def timed_out(seconds: float) -> APIError:
    return APIError(504, f"The request took longer than {seconds:g} s.", type="timeout_error", code="timeout")


def client_closed() -> APIError:
    """499 (nginx's code): the client went away; the body is never read, the status is for logs and metrics."""
    return APIError(499, "The client closed the connection.", type="client_closed", code="client_closed")


def internal(message: str = "The server failed while generating.") -> APIError:
    return APIError(500, message, type="server_error", code="internal_error")
