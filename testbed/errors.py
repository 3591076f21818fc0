"""Errors a user can cause, and how they are shown: one line, no traceback.

Every bad input (topology YAML, Kubernetes manifests, CLI arguments) raises
:class:`InputError`; the CLI prints ``str(err)`` and exits with status 2.
The text names the file, the field (a kube-apiserver style path such as
``spec.ports[0].nodePort``) and the rule that was broken, in kube-apiserver's
own words where Kubernetes has them.
"""

from __future__ import annotations


class TestbedError(Exception):
    """Base class of every error the CLI turns into one line and a non-zero exit."""

    exit_code = 1


class InputError(TestbedError):
    """Invalid user input. ``str()`` is the single line shown to the user."""

    exit_code = 2

    def __init__(self, message: str, *, file: str | None = None, field: str | None = None):
        self.file = file
        self.field = field
        self.detail = message
        parts = []
        if file:
            parts.append(str(file))
        if field:
            parts.append(field)
        parts.append(message)
        super().__init__(": ".join(parts))


class NotRootError(TestbedError):
    exit_code = 2

    def __init__(self, what: str = "this command"):
        super().__init__(f"{what} needs root (network namespaces and kernel rules): run it with sudo")


class StateError(TestbedError):
    """No live cluster, or a cluster in a state the command cannot act on."""

    exit_code = 1


class KernelError(TestbedError):
    """The kernel or a kernel tool refused something the project asked for."""

    exit_code = 1
