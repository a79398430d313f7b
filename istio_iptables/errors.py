"""Errors that reach the user, each with the exit code the process ends with."""

from __future__ import annotations

from enum import IntEnum

# How much of a value a message quotes: a rejected 100 KB list is named, not echoed back.
QUOTE_LIMIT = 120


class ExitCode(IntEnum):
    """Documented exit codes (README, "Exit codes")."""

    OK = 0
    FAILURE = 1  # applying failed; the namespace was rolled back to what it held before
    INVALID_INPUT = 2  # a flag or environment value is unusable; nothing was written
    DRIFT = 3  # our chains hold rules from another configuration (use --reconcile)
    ENVIRONMENT = 4  # not root, a missing binary, kernel table or match, lock timeout
    VALIDATION_FAILED = 126  # --run-validation: traffic is not redirected (Istio's code)


def escape(text: str) -> str:
    """``text`` with every non-printable character spelled as an escape (``\\n``, ``\\x1b``, ``\\u2028``).

    A value echoed into a log or error line can then never start a line of its own (a forged
    log line) nor move the cursor of a terminal: ``str.splitlines`` finds no boundary in it.
    """
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def cut(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``text`` shortened to about ``limit`` characters, saying how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[: limit - 20]}...{text[-10:]} ({len(text)} characters)"


def quote(value: str, limit: int = QUOTE_LIMIT) -> str:
    """A user-supplied value as a message shows it: in quotes, escaped, cut when long."""
    return "'" + cut(escape(value).replace("'", "\\'"), limit) + "'"


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
        super().__init__(f"invalid value {quote(value)} for {source}: {reason}")


class EnvironmentProblem(IstioIptablesError):
    """The machine or namespace lacks something we need (privilege, binary, kernel support)."""

    exit_code = ExitCode.ENVIRONMENT


class StdoutError(EnvironmentProblem):
    """stdout is closed or refuses the output (``>&-``, ``>/dev/full``): what was to be printed is lost."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"cannot write to stdout: {reason}")


class ApplyError(IstioIptablesError):
    """Writing rules failed; by the time this is raised, the namespace is back as it was."""

    exit_code = ExitCode.FAILURE


class DriftError(IstioIptablesError):
    """Our chains already hold different rules; the message carries the diff."""

    exit_code = ExitCode.DRIFT


class ValidationFailed(IstioIptablesError):
    """--run-validation could not see a redirected connection."""

    exit_code = ExitCode.VALIDATION_FAILED
