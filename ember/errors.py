"""Ember's error hierarchy. Each error knows its HTTP status and OpenAI-style error type.

Pure Python on purpose: ember.loader and ember.energy import this on machines that have
neither fastapi nor redis.
"""

from __future__ import annotations


class EmberError(Exception):
    """Base of every error Ember raises on purpose."""

    status_code: int = 500
    error_type: str = "server_error"
    code: str = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_openai(self) -> dict[str, dict[str, str | None]]:
        """The OpenAI error body: {"error": {"message", "type", "code"}}."""
        return {"error": {"message": self.message, "type": self.error_type, "code": self.code}}


# --- client errors (4xx) ---------------------------------------------------------------
class BadRequest(EmberError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "bad_request"


class InvalidName(BadRequest):
    """A name that could escape its directory or key space (`..`, `/`, absolute paths)."""

    code = "invalid_name"


class Unauthorized(EmberError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(EmberError):
    status_code = 403
    error_type = "permission_error"
    code = "forbidden"


class NotFound(EmberError):
    status_code = 404
    error_type = "not_found_error"
    code = "not_found"


class FunctionNotFound(NotFound):
    code = "model_not_found"


class CheckpointNotFound(NotFound):
    code = "checkpoint_not_found"


class PayloadTooLarge(EmberError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class RequestTimeout(EmberError):
    """The client stalled in the middle of its request body."""

    status_code = 408
    error_type = "invalid_request_error"
    code = "request_timeout"


class RateLimited(EmberError):
    """An API key over its requests or tokens per minute; `retry_after_s` says when to come back."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: float | None, code: str | None = None) -> None:
        """retry_after_s None: waiting cannot help (one request over the whole budget): no
        Retry-After, and `x-should-retry: false`, which the OpenAI clients obey."""
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s
        self.should_retry = retry_after_s is not None


class Unprocessable(EmberError):
    status_code = 422
    error_type = "invalid_request_error"
    code = "invalid_body"


# --- checkpoint / loader ---------------------------------------------------------------
class CheckpointError(EmberError):
    """A checkpoint that is malformed, truncated, forged or otherwise unusable."""

    status_code = 422
    error_type = "invalid_request_error"
    code = "bad_checkpoint"


class IntegrityError(CheckpointError):
    """Bytes that do not match their recorded checksum."""

    code = "checksum_mismatch"


class CheckpointChanged(CheckpointError):
    """The store's checkpoint is not the one a function was deployed with (another manifest)."""

    status_code = 409
    code = "checkpoint_changed"


class Conflict(EmberError):
    """The request contradicts the current state (409)."""

    status_code = 409
    error_type = "invalid_request_error"
    code = "conflict"


class FunctionUnreadable(EmberError):
    """A stored function spec that no longer validates (written by an older version, or by hand):
    it can be deployed again or deleted, nothing else."""

    status_code = 409
    error_type = "invalid_request_error"
    code = "function_unreadable"


class UnsafeFormat(CheckpointError):
    """A format that would need unpickling (.bin, .pt): refused."""

    code = "unsafe_format"


class StoreError(EmberError):
    """The checkpoint store (file:// or s3://) failed or refused."""

    status_code = 502
    error_type = "server_error"
    code = "store_error"


class StoreAccessDenied(StoreError):
    status_code = 403
    error_type = "permission_error"
    code = "store_access_denied"


class CapacityError(EmberError):
    """A tier or device cannot hold what was asked of it."""

    status_code = 507
    error_type = "server_error"
    code = "insufficient_capacity"


# --- serving ----------------------------------------------------------------------------
class ServiceUnavailable(EmberError):
    status_code = 503
    error_type = "server_error"
    code = "service_unavailable"


class NoCapacity(ServiceUnavailable):
    """No instance could be placed or become ready within the SLO timeout."""

    code = "no_capacity"


class StateUnavailable(ServiceUnavailable):
    """Redis (shared state) is unreachable."""

    code = "state_unavailable"


class Overloaded(EmberError):
    """An instance's queue is full: try again after `retry_after_s` (429 + Retry-After)."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: float = 1.0, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class WorkerError(EmberError):
    status_code = 502
    error_type = "server_error"
    code = "worker_error"


class InstanceGone(EmberError):
    """The cluster no longer books this instance (reaped, drained or given up): not loaded/served."""

    status_code = 409
    error_type = "invalid_request_error"
    code = "instance_gone"


class WorkerTimeout(WorkerError):
    """A worker did not answer within the gateway's timeout (paused, overloaded, partitioned)."""

    status_code = 504
    code = "worker_timeout"


# --- devices / energy -------------------------------------------------------------------
class DeviceError(EmberError):
    """A GPU (NVML) or simulated device refused or failed an operation."""

    status_code = 500
    error_type = "server_error"
    code = "device_error"


class DevicePermissionError(DeviceError):
    status_code = 403
    error_type = "permission_error"
    code = "device_permission_denied"


class DeviceSettingOutOfRange(DeviceError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "device_setting_out_of_range"


class ConfigError(EmberError):
    """Bad settings, trace files or cluster descriptions."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "bad_config"
