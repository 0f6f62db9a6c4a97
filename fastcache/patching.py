"""One instance attribute set on an object and undone exactly: how fastcache touches a pipeline.

The class's attribute is never changed. An instance attribute another tool left (DeepCache's
helper wraps ``unet.forward`` this way) is remembered and put back; if someone replaced ours
meanwhile, undoing leaves theirs alone.
"""

from __future__ import annotations

from typing import Any


class InstancePatch:
    def __init__(self, owner: Any, name: str, value: Any) -> None:
        self.owner, self.name, self.value = owner, name, value
        self.previous = vars(owner).get(name)  # another tool's instance attribute, or None

    def apply(self) -> None:
        setattr(self.owner, self.name, self.value)

    def undo(self) -> None:
        # == rather than `is`: a bound method is a new object at every attribute access.
        if vars(self.owner).get(self.name) != self.value:
            return
        if self.previous is None:
            delattr(self.owner, self.name)
        else:
            setattr(self.owner, self.name, self.previous)
