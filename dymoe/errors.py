"""The one error hierarchy of dymoe.

Every error a user can cause (bad path, unknown architecture, missing or misshapen tensor, corrupted
store, budget too small, prompt too long) is raised as a subclass of :class:`DymoeError` with a
message that names the file, tensor, layer or flag and says what to do. The CLI prints that message
on one line and exits with status 2; anything else is a bug and keeps its traceback.
"""


class DymoeError(Exception):
    """Base class of every user-facing error."""


class CheckpointError(DymoeError):
    """A checkpoint folder, config.json or safetensors file is missing, unreadable or inconsistent."""


class UnsupportedModelError(DymoeError):
    """The checkpoint's architecture is not one dymoe implements."""


class StoreError(DymoeError):
    """An expert store is missing, incomplete, of another format version or corrupted."""


class BudgetError(DymoeError):
    """A memory budget is too small for what the run needs."""


class InputError(DymoeError):
    """A prompt, flag value or request is invalid (e.g. longer than the context)."""
