from typing import Callable, TypeVar

_F = TypeVar("_F", bound=Callable[..., object])

NOOP_MARKER: str
DISCARD_MARKER: str

def mark_noop(func: _F) -> _F: ...
def mark_discard(func: _F) -> _F: ...
def resolve_callback(handler: object, name: str) -> Callable[..., object] | None: ...
