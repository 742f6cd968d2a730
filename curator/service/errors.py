"""The one error shape of the API: {"error": message, "field": where, "status": code}."""

from __future__ import annotations


class ApiError(Exception):
    """A client error with its HTTP status and the request field it is about (None: the request)."""

    def __init__(self, status: int, field: str | None, message: str):
        super().__init__(message)
        self.status = status
        self.field = field
        self.message = message
