"""The built-in model zoo: tiny models built offline with random weights."""
