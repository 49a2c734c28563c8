"""The mapping's settings."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class MappingSettings:
    """Mapping options; arrives as a plain dict through Airflow params / XCom (`from_dict`)."""

    require_explicit_consent: bool = False
    event_types: tuple[str, ...] | None = None
    max_items: int = 50_000
    max_bytes: int = 8 * 1024 * 1024
    recent_session_minutes: int = 30
    batch_rows: int = 100_000

    def __post_init__(self) -> None:
        if self.event_types is not None:
            object.__setattr__(self, "event_types", tuple(self.event_types) or None)
        if not 0 < self.max_items <= 50_000:
            raise ValueError(f"max_items={self.max_items}: FullStory batches hold 1..50000 items")
        if self.max_bytes < 64 * 1024:
            raise ValueError(f"max_bytes={self.max_bytes}: give at least 65536 bytes per request")

    @classmethod
    def from_dict(cls, data: dict | MappingSettings | None) -> MappingSettings:
        if isinstance(data, MappingSettings):
            return data
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown mapping setting(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: v for k, v in data.items() if v is not None or k == "event_types"})

    def as_dict(self) -> dict:
        out = asdict(self)
        out["event_types"] = list(self.event_types) if self.event_types else None
        return out
