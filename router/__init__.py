"""SplitServe router package."""
