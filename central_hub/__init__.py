"""The central hub. Arrives with its own issue."""
