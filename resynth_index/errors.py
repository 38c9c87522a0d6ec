"""Exceptions that carry a one-line message meant for the user."""


class RsxError(Exception):
    """A user-facing failure: the message is one clear sentence, shown without a traceback."""


class ImageError(RsxError):
    """An image file that cannot be used (unreadable, corrupt, hostile, too large)."""


class ModelLoadError(RsxError):
    """A model (embedder, generator, captioner) that cannot be loaded from the given path."""


class StoreError(RsxError):
    """The lab's store is missing, inconsistent or incompatible with the request."""
