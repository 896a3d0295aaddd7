"""The check pipeline: subject -> runs (steps with probes) -> evidence -> verdicts."""
