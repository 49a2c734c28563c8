"""Start-up configuration and the command line that builds it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from include.fullstory_emulator.faults import Faults, check_fault_ranges

REGIONS = ("na1", "eu1")


def default_api_key(region: str) -> str:
    return f"{region}.local-emulator-key/demo"


def default_org_id(region: str) -> str:
    return f"o-LOCAL-{region}"


def key_region(api_key: str) -> str | None:
    """The data region a key names: its first three characters before the first '.'."""
    prefix, dot, _ = api_key.partition(".")
    return prefix if dot and len(prefix) == 3 else None


@dataclass
class EmulatorConfig:
    host: str = "127.0.0.1"
    port: int = 8089
    region: str = "na1"
    api_keys: list[str] = field(default_factory=list)
    org_id: str | None = None
    tls: bool = False
    tls_dir: str | None = None
    page_size: int = 1000
    idempotency_ttl: float = 86_400.0
    keep_properties: bool = True
    max_running_jobs: int = 100
    max_in_progress_jobs: int = 200
    max_in_progress_items: int = 500_000
    faults: Faults = field(default_factory=Faults)

    def resolved(self) -> EmulatorConfig:
        """Fill region defaults; refuse keys that name the other region (they could never work)."""
        if self.region not in REGIONS:
            raise ValueError(f"region must be one of {REGIONS}")
        if not self.api_keys:
            self.api_keys = [default_api_key(self.region)]
        if self.org_id is None:
            self.org_id = default_org_id(self.region)
        check_fault_ranges(self.faults)
        for key in self.api_keys:
            named = key_region(key)
            if named in REGIONS and named != self.region:
                raise ValueError(
                    f"api key {key[:8]}... names region {named}, the emulator serves {self.region}"
                )
        return self


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m include.fullstory_emulator", description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="bind address (keep it local)")
    p.add_argument("--port", type=int, default=8089, help="0 picks a free port")
    p.add_argument("--region", choices=REGIONS, default="na1")
    p.add_argument("--api-key", action="append", dest="api_keys", default=[], help="repeatable")
    p.add_argument("--org-id", default=None)
    p.add_argument("--tls", action="store_true", help="serve HTTPS with a generated self-signed CA")
    p.add_argument("--tls-dir", default=None, help="where the CA bundle, cert and key go (default: temp)")
    p.add_argument("--page-size", type=int, default=1000, help="items per imports/errors page")
    p.add_argument("--idempotency-ttl", type=float, default=86_400.0, help="seconds a key is remembered")
    p.add_argument("--no-keep-properties", action="store_true", help="do not keep event properties")
    p.add_argument("--max-running-jobs", type=int, default=100)
    p.add_argument("--max-in-progress-jobs", type=int, default=200)
    p.add_argument("--max-in-progress-items", type=int, default=500_000)
    d = Faults()
    p.add_argument("--job-seconds", type=float, default=d.job_seconds)
    p.add_argument("--rate", type=float, default=d.rate, help="requests/s; <= 0 disables the limiter")
    p.add_argument("--burst", type=float, default=d.burst)
    p.add_argument("--latency-ms", type=float, default=d.latency_ms)
    p.add_argument("--error-rate", type=float, default=d.error_rate)
    p.add_argument("--error-status", type=int, default=d.error_status)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--throttle-next", type=int, default=0)
    p.add_argument("--throttle-rate", type=float, default=0.0)
    p.add_argument("--retry-after", type=int, default=d.retry_after)
    p.add_argument("--drop-next", type=int, default=0)
    p.add_argument("--drop-rate", type=float, default=0.0)
    p.add_argument("--slow-next", type=int, default=0)
    p.add_argument("--slow-seconds", type=float, default=0.0)
    p.add_argument("--reject-event-name", action="append", dest="reject_event_names", default=[])
    p.add_argument("--reject-user-uid", action="append", dest="reject_user_uids", default=[])
    return p


def config_from_args(argv: list[str] | None = None) -> EmulatorConfig:
    a = build_parser().parse_args(argv)
    faults = Faults(
        latency_ms=a.latency_ms,
        error_rate=a.error_rate,
        error_status=a.error_status,
        seed=a.seed,
        throttle_next=a.throttle_next,
        throttle_rate=a.throttle_rate,
        retry_after=a.retry_after,
        drop_next=a.drop_next,
        drop_rate=a.drop_rate,
        slow_next=a.slow_next,
        slow_seconds=a.slow_seconds,
        rate=a.rate,
        burst=a.burst,
        job_seconds=a.job_seconds,
        reject_event_names=a.reject_event_names,
        reject_user_uids=a.reject_user_uids,
    )
    return EmulatorConfig(
        host=a.host,
        port=a.port,
        region=a.region,
        api_keys=a.api_keys,
        org_id=a.org_id,
        tls=a.tls,
        tls_dir=a.tls_dir,
        page_size=a.page_size,
        idempotency_ttl=a.idempotency_ttl,
        keep_properties=not a.no_keep_properties,
        max_running_jobs=a.max_running_jobs,
        max_in_progress_jobs=a.max_in_progress_jobs,
        max_in_progress_items=a.max_in_progress_items,
        faults=faults,
    ).resolved()
