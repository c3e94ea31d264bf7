"""Private Cython core of cppnp; import cppnp instead."""
