"""The command lines of `m2u_jax.export` (see README.md in this folder); a package so that the
tests can import their `main` functions."""
