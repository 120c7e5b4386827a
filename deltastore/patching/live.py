"""What one store applied to each live `nn.Module` (by the module's identity), so that revert,
a switch to another stance and a scoped apply know what to undo; a switch that fails puts the
previous stance back."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from ..engine.reader import Reader
from ..repo.records import Version

# apply.py, mix.py and prepared.py load torch: imported inside the methods that apply, since
# the store, which read commands load, imports this module (tests/test_startup.py).
if TYPE_CHECKING:
    import torch

    from .prepared import PreparedStance


class LiveModules:
    """The handles one store's applies put in live modules, by module."""

    def __init__(self, reader: Reader):
        self.reader = reader
        # id(module) -> the handle put there, while it is active: a reverted handle (however it
        # was reverted) is dropped, so that the store keeps no module alive after its revert.
        self._applied: dict[int, Any] = {}

    def _track(self, module: torch.nn.Module, handle: Any) -> None:
        key = id(module)
        self._applied[key] = handle
        handle.on_revert.append(lambda: self._applied.pop(key) if self._applied.get(key) is handle else None)

    def apply(self, module: torch.nn.Module, ref: str | Version | Mapping[str | Version, float], *,
              strict: bool = True, scale: float | None = None):
        """Apply a version (`scale`: at that strength), or a mix of versions, to `module`."""
        from .apply import apply_module
        from .mix import MixError, apply_mix

        if isinstance(ref, Mapping):
            if scale is not None:
                raise MixError("give the weights in the mapping, or one ref and scale=, not both")
            handle = apply_mix(self.reader, module, ref)
        elif scale is not None:
            handle = apply_mix(self.reader, module, {self.reader.resolve(ref).id: scale})
        else:
            handle = apply_module(self.reader, module, self.reader.resolve(ref), strict=strict)
        self._track(module, handle)
        return handle

    def revert(self, module: torch.nn.Module) -> None:
        handle = self._applied.pop(id(module), None)
        if handle is not None:
            handle.revert()

    def switch(self, module: torch.nn.Module, ref: str | Version | PreparedStance | None):
        """Revert what was applied to `module`, then apply `ref` (None: stay at base)."""
        from .apply import apply_module
        from .prepared import PreparedStance

        if isinstance(ref, PreparedStance) or (ref is None and self._switching(module)):
            return self._switch_prepared(module, ref)
        version = self.reader.resolve(ref) if ref is not None else None
        with self._replacing(module):
            if version is None:
                return None
            handle = apply_module(self.reader, module, version)
        self._track(module, handle)
        return handle

    @contextmanager
    def applied(self, module: torch.nn.Module, ref: str | Version | Mapping[str | Version, float], *,
                scale: float | None = None) -> Iterator[Any]:
        handle = self.apply(module, ref, scale=scale)
        try:
            yield handle
        finally:
            handle.revert()
            self._applied.pop(id(module), None)

    @contextmanager
    def _replacing(self, module: torch.nn.Module) -> Iterator[None]:
        """What was applied to `module`, reverted for the body to apply another stance; when
        the body fails (the module is at its base again), the previous stance is applied again
        before the error goes on."""
        from .apply import apply_module

        previous = self._applied.pop(id(module), None)
        if previous is not None:
            previous.revert()
        try:
            yield
        except BaseException:
            if previous is not None and previous.version is not None:
                self._track(module, apply_module(self.reader, module, previous.version))
            raise

    def _switching(self, module: torch.nn.Module) -> bool:
        from .prepared import SwitchHandle

        return isinstance(self._applied.get(id(module)), SwitchHandle)

    def _switch_prepared(self, module: torch.nn.Module, stance: Any):
        from .prepared import SwitchHandle

        handle = self._applied.get(id(module))
        if isinstance(handle, SwitchHandle) and handle.active:
            handle.switch(stance)
            return handle if stance is not None else None
        # A plain apply is reverted first; its stance is put back if the switch fails.
        with self._replacing(module):
            handle = SwitchHandle(module)
            handle.switch(stance)
        self._track(module, handle)
        return handle
