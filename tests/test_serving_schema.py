"""Property-based API testing from the OpenAPI schema (schemathesis).

Beyond "never a 500", schemathesis' default checks also hold: every status code and body is the
documented one, and a 405 names the allowed methods.
"""

from __future__ import annotations

import shutil

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig

from fedrec.serving.app import create_app
from fedrec.serving.settings import ServeSettings
from fedrec.serving.state import ExportHolder

# The schema does not depend on the export, so the app exists at import time; the fixture below
# points its holder at a real tiny export before any case runs.
SETTINGS = ServeSettings(export="not-loaded-yet", merchant="big", watch_interval=0, admin_token="tok")
HOLDER = ExportHolder(SETTINGS)
# schemathesis' default list of statuses that reject invalid data, plus the request limits' 413
# (body too large) and 414 (query string too long): an over-long generated `q` gets a 414.
REJECTED = ["400", "401", "403", "404", "405", "406", "409", "413", "414", "415", "422", "428", "429", "5xx"]
CONFIG = SchemathesisConfig.from_dict({"checks": {"negative_data_rejection": {"expected-statuses": REJECTED}}})
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(SETTINGS, HOLDER), config=CONFIG)


@pytest.fixture(scope="module", autouse=True)
def loaded_export(served_root, tmp_path_factory):
    root = shutil.copytree(served_root, tmp_path_factory.mktemp("schema") / "artifacts")
    HOLDER.settings = ServeSettings(export=str(root / "exports"), merchant="big", watch_interval=0)
    assert HOLDER.reload(False).error is None


@schema.parametrize()
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema_and_never_fails(case):
    assert HOLDER.current is not None
    case.call_and_validate()
