"""Domain errors. The server's core maps each class to one status code (``server.core.errors``)."""

from __future__ import annotations


class SteeringError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidRequestError(SteeringError, ValueError):
    """A request field is malformed or out of range (gRPC INVALID_ARGUMENT).

    ``field`` is the dotted path of the offending field, e.g. ``interventions[2].feature``.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.description = message


class UnknownSAEError(SteeringError, LookupError):
    """A request names an SAE the server does not serve (gRPC NOT_FOUND)."""

    def __init__(self, field: str, sae_id: str, known: list[str]) -> None:
        """``known``: the SAE ids a request may name, as the caller lists them."""
        listed = ", ".join(sorted(known)) or "(none loaded)"
        self.description = f"unknown SAE {sae_id!r}; loaded SAEs: {listed}"
        super().__init__(f"{field}: {self.description}")
        self.field = field
        self.sae_id = sae_id


class UnknownVectorError(SteeringError, LookupError):
    """An admin call names a steering vector the server has not loaded (gRPC NOT_FOUND)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.description = message


class NotLabelledError(SteeringError):
    """Feature labels were asked of an SAE that has none (gRPC FAILED_PRECONDITION)."""


class ResourceLimitError(SteeringError):
    """A server-side cap was hit (gRPC RESOURCE_EXHAUSTED)."""


class SAEFormatError(SteeringError):
    """An SAE directory cannot be loaded. The message names the file and the problem."""


class UnsupportedModelError(SteeringError):
    """The served model's architecture has no hook support (startup error)."""


class NoChatTemplateError(SteeringError):
    """Chat messages were sent to a model without a chat template (gRPC FAILED_PRECONDITION).

    ``field`` is the path of the messages, e.g. ``prompt.messages``.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.description = message


class EngineUnavailableError(SteeringError):
    """The engine has died or is shutting down (gRPC UNAVAILABLE)."""


class InternalServerError(SteeringError):
    """An unexpected failure, already logged; the message holds only the request id (INTERNAL)."""
