"""The readers of the input formats `prepare` accepts, one file per format, over one shared table loader (tables.py)."""
