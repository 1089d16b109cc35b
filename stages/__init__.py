"""Thin DVC stage entry points: `python -m stages.<name>`. Each parses its own params section,
calls the library, and writes its outputs atomically. Paths come from dvc.yaml's cmd arguments."""
