"""Typed API errors; each maps to one HTTP status and OpenAI's error shape."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    status: int = 400
    type: str = "invalid_request_error"
    headers: dict[str, str] | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


class BadRequest(APIError):
    status = 400


class Unauthorized(APIError):
    status = 401
    type = "authentication_error"


class NotFound(APIError):
    status = 404


class TooManyRequests(APIError):
    status = 429
    type = "rate_limit_error"
    headers = {"Retry-After": "1"}


class GatewayTimeout(APIError):
    status = 504
    type = "timeout_error"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
