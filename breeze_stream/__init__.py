"""The `breeze-stream` command line (breeze_stream.cli); `python -m breeze_stream` runs it."""
