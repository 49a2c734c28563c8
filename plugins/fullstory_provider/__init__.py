"""A provider-shaped FullStory integration living in the project's plugins folder.

`FullStoryHook` (hooks.py), `FullStoryDeliveryOperator` (operators.py) and the "FullStory" extra link
(links.py). The plugin below registers the link so the UI can show it on serialized DAGs.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from fullstory_provider.links import FullStoryAppLink

__version__ = "0.1.0"


def get_provider_info() -> dict:
    """Provider metadata in the shape Airflow's providers manager reads, for packaging this as a provider."""
    return {
        "package-name": "datafly-fullstory-provider",
        "name": "FullStory (Datafly)",
        "description": "FullStory Server API: batch import jobs for events and users.",
        "versions": [__version__],
        "connection-types": [
            {"hook-class-name": "fullstory_provider.hooks.FullStoryHook", "connection-type": "fullstory"}
        ],
        "extra-links": ["fullstory_provider.links.FullStoryAppLink"],
    }


class FullStoryProviderPlugin(AirflowPlugin):
    name = "fullstory_provider"
    operator_extra_links = [FullStoryAppLink()]
