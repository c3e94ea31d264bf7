"""Small runnable servers: ``python -m cppnp <name>`` (echo, discard, daytime, timers, demo)."""
