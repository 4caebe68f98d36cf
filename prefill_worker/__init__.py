"""SplitServe prefill_worker package."""
