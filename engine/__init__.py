"""SplitServe engine package."""
