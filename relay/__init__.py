"""dedup-relay: an SMTP relay that forwards every unique message once."""

__all__ = ["__version__"]

__version__ = "0.1.0"
