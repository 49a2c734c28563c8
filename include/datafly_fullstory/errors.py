"""Errors a person must fix. A task that raises one fails at once, without Airflow retries: a retry would
meet the same params, landing files, blueprint or ledger contents and fail the same way."""

from __future__ import annotations


class InputError(ValueError):
    """Base of every error a person must fix; the message says what and where."""
