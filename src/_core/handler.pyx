# cython: language_level=3, embedsignature=True
"""Handler resolution: the markers the API layer sets and the core reads (handler.pxd)."""

cimport cython

# The attribute names of the two markers (the one place that spells them).
NOOP_MARKER = "__cppnp_noop__"
DISCARD_MARKER = "__cppnp_discard__"


def mark_noop(func):
    """Mark a default callback that does nothing: the core skips it instead of calling
    it (also when a subclass inherits it unchanged).  Returns *func*.

    Thread-safe.
    """
    setattr(func, NOOP_MARKER, True)
    return func


def mark_discard(func):
    """Mark a default on_message that only drops the input: the core drops the input
    without calling it.  Returns *func*.

    Thread-safe.
    """
    setattr(func, DISCARD_MARKER, True)
    return func


cdef object _resolve(object handler, str name):
    method = getattr(handler, name, None)
    if method is None or getattr(method, NOOP_MARKER, False):
        return None
    if not callable(method):
        raise TypeError("handler.%s must be callable, got %r" % (name, type(method).__name__))
    return method


def resolve_callback(handler, str name):
    """Return ``handler.<name>`` if the core should call it, else None (missing, or marked
    no-op).  Raises TypeError if it is set but not callable.

    Thread-safe.
    """
    return _resolve(handler, name)


@cython.auto_pickle(False)
@cython.final
cdef class Handlers:
    pass


cdef Handlers resolve_handlers(object handler):
    cdef Handlers h = Handlers.__new__(Handlers)
    h.on_connection = _resolve(handler, "on_connection")
    h.on_message = _resolve(handler, "on_message")
    h.discard_input = h.on_message is None or getattr(h.on_message, DISCARD_MARKER, False)
    if h.discard_input:
        h.on_message = None
    h.on_write_complete = _resolve(handler, "on_write_complete")
    h.on_high_water_mark = _resolve(handler, "on_high_water_mark")
    h.on_close = _resolve(handler, "on_close")
    return h


cdef Handlers _NO_HANDLERS = Handlers.__new__(Handlers)
_NO_HANDLERS.discard_input = True


cdef Handlers no_handlers():
    return _NO_HANDLERS
