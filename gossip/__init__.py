"""Gossip between sites and the hub (SWIM). Arrives with its own issue."""
