"""Command-line interface (``tensorvigil ...``)."""
