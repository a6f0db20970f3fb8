"""Errors a user can act on. Every message says what was wrong and what to do instead."""


class QuickdraftError(ValueError):
    """Base class of the errors quickdraft raises for bad input or unusable models."""


class InvalidRequestError(QuickdraftError):
    """A prompt, sampling value or limit that cannot be served as given."""


class ContextLengthError(InvalidRequestError):
    """The prompt, or the prompt and the completion asked for, do not fit in the model's context."""


class ModelLoadError(QuickdraftError):
    """A model path that does not exist or a checkpoint that cannot be loaded."""


class UnknownDrafterError(QuickdraftError):
    """A drafter name that no registered drafter answers to."""
