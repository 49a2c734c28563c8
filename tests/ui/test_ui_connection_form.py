"""The `fullstory` connection type: the provider metadata Airflow reads, the form it builds from it, and the
Test button's answers against the real emulator.

The same form and Test button through a running api-server: tests/integration/test_ui_airflow.py.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import jsonschema
import pytest

from fullstory_provider import get_provider_info
from fullstory_provider.exceptions import INVALID_KEY, WRONG_REGION
from fullstory_provider.hooks import FullStoryHook
from fullstory_provider.provider_info import CONN_FIELDS, PACKAGE_NAME

ROOT = Path(__file__).resolve().parents[2]
INSTALL_HINT = (
    "the FullStory provider is not installed in this venv: run `make venv` (pip install --no-deps -e .)"
)


def _airflow_schema(name: str) -> dict:
    import airflow

    return json.loads((Path(airflow.__file__).parent / name).read_text())


def test_provider_info_follows_airflows_schemas():
    info = get_provider_info()
    jsonschema.validate(info, _airflow_schema("provider_info.schema.json"))  # what the runtime checks
    # The connection type's form entries, against the stricter provider.yaml schema they come from.
    yaml_schema = _airflow_schema("provider.yaml.schema.json")
    connection_types = {
        "type": "object",
        "properties": {"connection-types": yaml_schema["properties"]["connection-types"]},
    }
    jsonschema.validate({"connection-types": info["connection-types"]}, connection_types)
    (conn,) = info["connection-types"]
    assert (conn["connection-type"], conn["hook-name"]) == ("fullstory", "FullStory")
    assert conn["hook-class-name"] == "fullstory_provider.hooks.FullStoryHook"


def test_the_hook_and_the_metadata_describe_the_same_form():
    (conn,) = get_provider_info()["connection-types"]
    behaviour = FullStoryHook.get_ui_field_behaviour()
    assert (
        behaviour["hidden_fields"]
        == conn["ui-field-behaviour"]["hidden-fields"]
        == ["schema", "login", "port"]
    )
    assert behaviour["relabeling"] == conn["ui-field-behaviour"]["relabeling"]
    assert behaviour["relabeling"] == {"password": "Server API key", "host": "API host (optional)"}
    assert list(conn["conn-fields"]) == list(CONN_FIELDS) == ["org_id", "data_region", "ca_bundle"]
    assert conn["conn-fields"]["data_region"]["schema"]["enum"] == ["na1", "eu1"]
    assert (FullStoryHook.conn_type, FullStoryHook.hook_name) == ("fullstory", "FullStory")


def test_the_installed_distribution_registers_the_provider():
    try:
        dist = importlib.metadata.distribution(PACKAGE_NAME)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(INSTALL_HINT, pytrace=False)
    (entry,) = [e for e in dist.entry_points if e.group == "apache_airflow_provider"]
    assert entry.load() is get_provider_info
    # The distribution's name is the provider's package-name (Airflow refuses a mismatch).
    assert dist.metadata["Name"] == get_provider_info()["package-name"]


def test_airflow_builds_the_connection_form_from_it():
    """HookMetaService is what the api-server's /ui/connections/hook_meta returns to the UI's form."""
    from airflow.api_fastapi.core_api.services.ui.connections import HookMetaService

    metas = {m.connection_type: m for m in HookMetaService.hook_meta_data()}
    assert "fullstory" in metas, INSTALL_HINT
    meta = metas["fullstory"]
    assert meta.hook_name == "FullStory" and meta.hook_class_name == "fullstory_provider.hooks.FullStoryHook"
    standard = meta.standard_fields
    assert standard.password.title == "Server API key"
    assert standard.host.title == "API host (optional)" and not standard.host.hidden
    assert standard.url_schema.hidden and standard.login.hidden and standard.port.hidden
    extra = meta.extra_fields
    assert extra["org_id"]["schema"]["title"] == "Org ID"
    assert extra["data_region"]["schema"]["enum"] == ["na1", "eu1"] and extra["data_region"]["value"] == "na1"
    assert extra["ca_bundle"]["schema"]["title"] == "CA bundle (optional)"


def _use(monkeypatch, emu, *, key=None, org=None, region=None, conn_type="fullstory"):
    monkeypatch.setenv(
        "AIRFLOW_CONN_FULLSTORY_DEFAULT",
        json.dumps(
            {
                "conn_type": conn_type,
                "host": emu.base_url,
                "password": key or emu.api_key,
                "extra": {"org_id": org or emu.org_id, "data_region": region or emu.region},
            }
        ),
    )


@pytest.mark.parametrize("conn_type", ["fullstory", "http"])
def test_the_test_button_against_the_emulator(fullstory_emulator, monkeypatch, conn_type):
    emu = fullstory_emulator
    _use(monkeypatch, emu, conn_type=conn_type)
    assert FullStoryHook().test_connection() == (True, f"Connected to FullStory org {emu.org_id} (na1)")

    _use(monkeypatch, emu, key="na1.revoked-key/zz", conn_type=conn_type)
    ok, message = FullStoryHook().test_connection()
    assert not ok and message.startswith(INVALID_KEY) and "401" in message and "wrong or revoked" in message
    assert "revoked-key" not in message

    # An eu1 org's key sent to a na1 host: FullStory answers 404 (org not found).
    _use(monkeypatch, emu, key="eu1.other-org-key/zz", org="o-OTHER-eu1", region="eu1", conn_type=conn_type)
    ok, message = FullStoryHook().test_connection()
    assert not ok and message.startswith(WRONG_REGION) and "404" in message and "data_region eu1" in message
    assert "other-org-key" not in message
    assert requests_seen(emu) >= 3


def requests_seen(emu) -> int:
    return emu.requests()["total"]


def test_regions_that_disagree_are_refused_before_any_request(fullstory_emulator, monkeypatch):
    emu = fullstory_emulator
    before = requests_seen(emu)
    _use(monkeypatch, emu, region="eu1")  # a na1 key and org id with data_region eu1
    ok, message = FullStoryHook().test_connection()
    assert not ok and "data region mismatch" in message
    assert requests_seen(emu) == before
