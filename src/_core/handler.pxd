# Handler resolution: which of a handler's callbacks the core calls.
#
# The convention lives here, in the core, and both sides use it: the API layer's
# ICppnpUsr marks its do-nothing defaults with mark_noop() / mark_discard()
# (cppnp/handler.py), and the server resolves a handler once (resolve_handlers) into a
# Handlers record the connections share.  A callback marked no-op, or missing, is None:
# the core skips it instead of calling it.  An on_message marked discard (the default,
# which drops the input) makes the connection drop input without a call.


cdef class Handlers:
    """The user's callbacks, resolved once per server (None where not overridden)."""
    cdef:
        object on_connection
        object on_message
        object on_write_complete
        object on_high_water_mark
        object on_close
        bint discard_input


# Resolve *handler*'s callbacks; TypeError if one of them is not callable.
cdef Handlers resolve_handlers(object handler)
# No callbacks, input discarded: what a connection holds once its loop closed.
cdef Handlers no_handlers()
