"""The three-agent site and HTTP session of the agent tests (tests/agent/conftest.py)."""

from tests.agent.conftest import session, site

__all__ = ["session", "site"]
