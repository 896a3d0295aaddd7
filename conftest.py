"""Project-wide test configuration: pytester for the plugin tests, quiet transformers."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

pytest_plugins = ["pytester"]
