"""meshorch: an orchestrator for containerised applications at edge sites."""

__version__ = "0.1.0"
