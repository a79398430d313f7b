"""Errors that reach the user, each with the exit code the process ends with."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Documented exit codes (README, "Exit codes")."""

    OK = 0
    FAILURE = 1  # applying failed; the namespace was rolled back to what it held before
    INVALID_INPUT = 2  # a flag or environment value is unusable; nothing was written
    DRIFT = 3  # our chains hold rules from another configuration (use --reconcile)
    ENVIRONMENT = 4  # not root, a missing binary, kernel table or match, lock timeout
    VALIDATION_FAILED = 126  # --run-validation: traffic is not redirected (Istio's code)


class IstioIptablesError(Exception):
    """Base for every error the CLI turns into one line and an exit code."""

    exit_code: ExitCode = ExitCode.FAILURE


class ConfigError(IstioIptablesError):
    """A flag or environment variable holds a value we refuse to use."""

    exit_code = ExitCode.INVALID_INPUT

    def __init__(self, source: str, value: str, reason: str) -> None:
        self.source = source
        self.value = value
        self.reason = reason
        super().__init__(f"invalid value {value!r} for {source}: {reason}")


class EnvironmentProblem(IstioIptablesError):
    """The machine or namespace lacks something we need (privilege, binary, kernel support)."""

    exit_code = ExitCode.ENVIRONMENT


class ApplyError(IstioIptablesError):
    """Writing rules failed; by the time this is raised, the namespace is back as it was."""

    exit_code = ExitCode.FAILURE


class DriftError(IstioIptablesError):
    """Our chains already hold different rules; the message carries the diff."""

    exit_code = ExitCode.DRIFT


class ValidationFailed(IstioIptablesError):
    """--run-validation could not see a redirected connection."""

    exit_code = ExitCode.VALIDATION_FAILED
