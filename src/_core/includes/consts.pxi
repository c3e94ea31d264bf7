# Sizes shared by the core (muduo's kCheapPrepend / kInitialSize, the readv spill area).
cdef enum:
    CHEAP_PREPEND = 8
    INITIAL_SIZE = 1024
    EXTRA_BUF = 65536
    MAX_EVENTS = 1024
