"""smtp-bridge: accept mail over SMTP, spool it durably, forward it to email HTTP APIs."""

__version__ = "0.1.0"
