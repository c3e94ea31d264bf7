"""Build the Cython core: one extension per component (see README, Development)."""

import os
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup

MODULES = [
    "buffer",
    "task",
    "channel",
    "pending",
    "timer_queue",
    "blocking_queue",
    "socket_ops",
    "tls",
    "gil_share",
    "handler",
    "event_loop",
    "idle_wheel",
    "tcp_connection",
    "acceptor",
    "event_loop_pool",
    "tcp_server",
    "connector",
    "tcp_client",
    "thread_pool",
    "codec",
]

if not sys.platform.startswith("linux"):
    sys.exit("cppnp needs Linux (epoll, eventfd, accept4)")

# CPPNP_DEBUG=1 (make debug): -O0 -g3 with asserts, and Cython's annotated HTML.
DEBUG = os.environ.get("CPPNP_DEBUG") == "1"
SANITIZE = os.environ.get("CPPNP_SANITIZE") == "1"
# Warnings are errors in our own builds (make, CI); a user's compiler may differ.
STRICT = os.environ.get("CPPNP_STRICT") == "1"
FREETHREADING = os.environ.get("CPPNP_FREETHREADING", "1") == "1"

# -Wno-stringop-overflow: gcc 12 reports a false positive inside CPython 3.13t's own
# atomic refcount helpers (Py_DECREF inlined into a Cython __cinit__), which -Werror
# would turn into a failed free-threaded build.
cflags = ["-Wall", "-Wno-unused-function", "-Wno-stringop-overflow"]
ldflags = []
if STRICT:
    cflags.append("-Werror")
if DEBUG or SANITIZE:
    cflags += ["-O0", "-g3", "-fno-omit-frame-pointer", "-UNDEBUG"]
else:
    cflags += ["-O2"]
if SANITIZE:
    cflags += ["-fsanitize=address,undefined"]
    ldflags += ["-fsanitize=address,undefined"]

extensions = [
    Extension(
        f"_core.{name}",
        [f"src/_core/{name}.pyx"],
        include_dirs=["src/_core/includes"],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
    )
    for name in MODULES
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["src"],
        compiler_directives={
            "language_level": 3,
            "embedsignature": True,
            # Shared state rests on the core's own locks and atomics (see README): the
            # modules do not need the GIL, so a free-threaded CPython keeps it off.
            "freethreading_compatible": FREETHREADING,
        },
        annotate=DEBUG,
        build_dir="build/cython",
    ),
)
