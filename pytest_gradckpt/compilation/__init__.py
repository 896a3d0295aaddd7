"""Compiled-model support: how the caller compiled, and compiling each run's copy the same way."""
