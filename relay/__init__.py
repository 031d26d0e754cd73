"""dedup-relay: an SMTP relay that forwards every unique message once."""

__version__ = "0.1.0"
