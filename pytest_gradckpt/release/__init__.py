"""Release tools: bisect, the version matrix, throwaway venvs, golden records, versions."""
