"""A local FullStory Server API emulator (v2 events and users, batch jobs, faults). See README.md."""

from include.fullstory_emulator.config import EmulatorConfig, default_api_key, default_org_id

__all__ = ["EmulatorConfig", "default_api_key", "default_org_id"]
