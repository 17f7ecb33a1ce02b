"""The project's error types.

Every failure an operator can see is one of these, so the CLI and the hotplug
script can turn it into an exit code and a sentence, never a traceback.
"""


class IscsimpleError(Exception):
    """Base of every error iscsimple reports to a person."""

    exit_code = 1


class InputError(IscsimpleError):
    """The input is wrong (a spec, a tab line, a config value): fix it and retry. CLI exit 2."""

    exit_code = 2


class OperationError(IscsimpleError):
    """An operation failed on the host (a command, a device, a timeout). CLI exit 1."""

    exit_code = 1
