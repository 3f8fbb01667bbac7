"""The error tree. Every API error is one of these; the API maps them to HTTP in one place.

    SandboxdError                 500 internal
    ├── BadRequest                400 invalid_request (code names the problem, field names the input)
    ├── Unauthorized              401 unauthorized
    ├── NotFound                  404 not_found
    ├── Conflict                  409 conflict
    │   └── NoCapacity            409 no_capacity
    ├── PayloadTooLarge           413 payload_too_large
    ├── NotImplementedYet         501 not_implemented
    ├── NoWorkers                 503 no_workers
    └── WorkerFailure             502 worker_failure (a worker or guest agent failed us)

The core raises these with typed arguments and never sees HTTP objects.
"""

from __future__ import annotations


class SandboxdError(Exception):
    status = 500
    code = "internal"

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.field = field

    def to_body(self) -> dict:
        error = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error}


class BadRequest(SandboxdError):
    status = 400
    code = "invalid_request"


class Unauthorized(SandboxdError):
    status = 401
    code = "unauthorized"


class NotFound(SandboxdError):
    status = 404
    code = "not_found"


class Conflict(SandboxdError):
    status = 409
    code = "conflict"


class NoCapacity(Conflict):
    code = "no_capacity"


class PayloadTooLarge(SandboxdError):
    status = 413
    code = "payload_too_large"


class NotImplementedYet(SandboxdError):
    status = 501
    code = "not_implemented"


class WorkerFailure(SandboxdError):
    status = 502
    code = "worker_failure"


class NoWorkers(SandboxdError):
    status = 503
    code = "no_workers"
