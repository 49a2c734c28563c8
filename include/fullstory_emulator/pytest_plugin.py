"""Pytest fixtures for the FullStory emulator.

Register with `pytest_plugins = ["include.fullstory_emulator.pytest_plugin"]` in the root conftest.

- `fullstory_emulator`: one emulator process per test session (default flags), reset (state and
  faults) before each test that uses it.
- `fullstory_emulator_factory`: `factory(region="eu1", tls=True, ...)` starts extra emulators with
  custom flags; all of them are stopped when the test ends.
"""

from __future__ import annotations

import pytest

from include.fullstory_emulator.testing import EmulatorProcess


@pytest.fixture(scope="session")
def fullstory_emulator_session():
    with EmulatorProcess() as emulator:
        yield emulator


@pytest.fixture
def fullstory_emulator(fullstory_emulator_session) -> EmulatorProcess:
    fullstory_emulator_session.reset()
    return fullstory_emulator_session


@pytest.fixture
def fullstory_emulator_factory():
    started: list[EmulatorProcess] = []

    def start(*args: str, **flags) -> EmulatorProcess:
        emulator = EmulatorProcess(*args, **flags).start()
        started.append(emulator)
        return emulator

    yield start
    for emulator in started:
        emulator.stop()
