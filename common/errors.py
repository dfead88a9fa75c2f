"""The one error type for a setting to fix or a service that cannot be reached; `sntrack` maps it to exit 2."""

from __future__ import annotations


class ConfigurationError(Exception):
    """Bad configuration or an unreachable service: one line telling the user what to fix."""
