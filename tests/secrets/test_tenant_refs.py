"""Delivery refuses another tenant's secret before looking anything up."""

from __future__ import annotations

import pytest

from meshorch.secrets.keyring import SecretRef, SecretUnavailable
from meshorch.secrets.service import SiteSecrets


def test_an_app_gets_only_its_own_tenants_secrets() -> None:
    own = SecretRef("db-password", "evil")
    SiteSecrets.check_owned([own], "evil")
    SiteSecrets.check_owned([], "evil")
    with pytest.raises(SecretUnavailable, match="secret acme/db-password refused"):
        SiteSecrets.check_owned([own, SecretRef("db-password", "acme")], "evil")
    with pytest.raises(SecretUnavailable, match="an app of tenant default"):
        SiteSecrets.check_owned([own], "default")
