"""Every typed error aurora_core raises.

Each error carries a stable, machine-readable ``reason`` (snake_case). Messages may change between
releases; reasons do not. The HTTP server maps errors to status codes through ``http_status``.
"""

from __future__ import annotations


class AuroraError(Exception):
    """Base class of every aurora_core error."""

    reason: str = "error"
    http_status: int = 500

    def __init__(self, message: str = "", *, reason: str | None = None):
        super().__init__(message or self.__class__.__name__)
        if reason is not None:
            self.reason = reason


class ImageError(AuroraError):
    """The image bytes could not be turned into pixels."""

    reason = "image_error"
    http_status = 422


class UnsupportedFormat(ImageError):
    """Magic bytes name no accepted format (JPEG, PNG). Raised before any parsing."""

    reason = "unsupported_format"
    http_status = 415


class CorruptImage(ImageError):
    """Truncated, malformed or otherwise undecodable data of an accepted format."""

    reason = "corrupt_image"
    http_status = 422


class ImageTooLarge(ImageError):
    """The byte size or the header's pixel count exceeds a limit; raised before pixels are allocated."""

    reason = "image_too_large"
    http_status = 413


class Overloaded(AuroraError):
    """The queue is full; the request was rejected at admission and never computed."""

    reason = "overloaded"
    http_status = 503


class DeadlineExceeded(AuroraError):
    """The request's deadline passed before its result was ready."""

    reason = "deadline_exceeded"
    http_status = 504


class DeviceLost(AuroraError):
    """A sticky device error (illegal address, GPU fallen off the bus); the device is not usable."""

    reason = "device_lost"
    http_status = 503


class ResourceExhausted(AuroraError):
    """Out of device memory even at batch size 1."""

    reason = "resource_exhausted"
    http_status = 503


class ModelError(AuroraError):
    """The model raised at inference, or returned logits of the wrong batch size; ``__cause__`` holds the
    model's own exception, and the message does not repeat it (the server sends messages to clients).
    Its batch-mates fail with it: they ran in the same call.

    ``reason`` is "model_error". The class-level reason, the HTTP server's coarse ``code``, is
    "internal_error": to a client, a failing model is the server's fault like any other."""

    reason = "internal_error"
    http_status = 500

    def __init__(self, message: str = "", *, reason: str | None = "model_error"):
        super().__init__(message, reason=reason)


class PipelineClosed(AuroraError):
    """The pipeline is closed or closing and admits no new request."""

    reason = "pipeline_closed"
    http_status = 503


__all__ = [
    "AuroraError",
    "ImageError",
    "UnsupportedFormat",
    "CorruptImage",
    "ImageTooLarge",
    "Overloaded",
    "DeadlineExceeded",
    "DeviceLost",
    "ResourceExhausted",
    "ModelError",
    "PipelineClosed",
]
