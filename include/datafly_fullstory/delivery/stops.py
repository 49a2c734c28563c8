"""Why a delivery task stopped: `delivery_stops/<task_id>-<map_index>.json` in the run folder.

The delivery operator writes one when its try fails (the message carries no secret) and removes it when a
later try starts; the summarise step reads them to say why rows are still pending.
"""

from __future__ import annotations

from include.datafly_fullstory.state import RunStore

FOLDER = "delivery_stops"


def record_name(task_id: str, map_index: int) -> str:
    return f"{task_id}-{map_index}.json"


def write_stop(store: RunStore, record: str, error: BaseException, chunks: list[str]) -> None:
    store.write_json({"error": f"{type(error).__name__}: {error}", "chunks": list(chunks)}, FOLDER, record)


def clear_stop(store: RunStore, record: str) -> None:
    store.remove(FOLDER, record)


def read_stops(store: RunStore) -> list[str]:
    """The recorded reasons, one per stopped task."""
    return [str(store.read_json(FOLDER, name).get("error")) for name in store.list(FOLDER, suffix=".json")]
