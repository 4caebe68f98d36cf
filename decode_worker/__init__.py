"""SplitServe decode_worker package."""
