"""The provider's metadata: what Airflow's providers manager reads through the `apache_airflow_provider`
entry point (pyproject.toml), including the `fullstory` connection form.

Airflow imports this while it is itself starting up (its configuration asks every installed provider for
its metadata), so this module and the package's __init__ import nothing from Airflow, nor anything heavy:
plain data only.

Airflow 3.2+ builds the connection form from this metadata (`conn-fields`, `ui-field-behaviour`) without
importing the hook; the hook's `get_ui_field_behaviour` returns the same data (connection.py). Extra fields
are stored in the connection's `extra` JSON under their own names (`org_id`, `data_region`, `ca_bundle`),
which is what connection.py reads, for `fullstory` and `http` connections alike.
"""

from __future__ import annotations

from typing import Any

PACKAGE_NAME = "datafly-fullstory"  # the distribution (pyproject.toml [project] name)
VERSION = "0.1.0"
CONN_TYPE = "fullstory"
HOOK_NAME = "FullStory"
HOOK_CLASS = "fullstory_provider.hooks.FullStoryHook"

# Standard fields: which are hidden, how the others are labelled.
HIDDEN_FIELDS = ["schema", "login", "port"]
RELABELING = {"password": "Server API key", "host": "API host (optional)"}
PLACEHOLDERS = {
    "password": "na1.xxxxxxxx/yyyy (Settings > API Keys, a Server key)",
    "host": "empty: api.fullstory.com (na1) or api.eu1.fullstory.com (eu1); a URL for a proxy or the emulator",
    "extra": '{"org_id": "o-1A2B3C-na1", "data_region": "na1"}',
}

# Extra fields (stored in `extra` under these names), in the connection form's order.
CONN_FIELDS: dict[str, dict[str, Any]] = {
    "org_id": {
        "label": "Org ID",
        "description": "Your FullStory Org ID, e.g. o-1A2B3C-na1 (Settings > FS Setup). Required.",
        "schema": {"type": "string", "minLength": 1, "pattern": r"^\S+$"},
    },
    "data_region": {
        "label": "Data region",
        "description": "Your org's data region: na1 (api.fullstory.com) or eu1 (api.eu1.fullstory.com); "
        "the Org ID's suffix shows it.",
        "schema": {"type": "string", "enum": ["na1", "eu1"], "default": "na1"},
    },
    "ca_bundle": {
        "label": "CA bundle (optional)",
        "description": "Path to a CA bundle on the workers, for a TLS proxy or the emulator's --tls.",
        "schema": {"type": ["string", "null"]},
    },
}


def get_provider_info() -> dict[str, Any]:
    """Provider metadata in the shape Airflow's providers manager reads (the runtime provider-info schema,
    with the `conn-fields` and `ui-field-behaviour` of provider.yaml)."""
    return {
        "package-name": PACKAGE_NAME,
        "name": "FullStory (Datafly)",
        "description": "FullStory Server API: batch import jobs for events and users.",
        "versions": [VERSION],
        "connection-types": [
            {
                "connection-type": CONN_TYPE,
                "hook-class-name": HOOK_CLASS,
                "hook-name": HOOK_NAME,
                "conn-fields": {name: {**spec} for name, spec in CONN_FIELDS.items()},
                "ui-field-behaviour": {
                    "hidden-fields": list(HIDDEN_FIELDS),
                    "relabeling": dict(RELABELING),
                    "placeholders": dict(PLACEHOLDERS),
                },
            }
        ],
        "extra-links": ["fullstory_provider.links.FullStoryAppLink"],
    }
