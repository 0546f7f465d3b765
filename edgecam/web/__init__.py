"""The web side: the fleet dashboard."""
