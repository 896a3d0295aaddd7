"""Probes measure one fact each; the engine judges. One probe, one module."""
