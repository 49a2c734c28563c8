"""Delivery of payload chunks as FullStory batch import jobs, kept exactly once by the delivery ledger.

- `loop.py`: the `Delivery` loop (one chunk = one batch job), driven by each chunk's ledger status;
- `client.py`: the `BatchClient` contract the Airflow hook satisfies;
- `order.py`: users chunks before events chunks;
- `jobs.py`: FullStory's answers about a job -> the state of each line (matched by event id / uid);
- `outcomes.py`: a chunk's rows -> their outcomes and dead letters, from the ledger;
- `report.py`: the task's settings and report (its partial run stats);
- `stops.py`: why a delivery task stopped, for the summary.
- `timeline.py`: when each batch job of a try was submitted and finished, its retries and 429s (the run
  report's delivery timeline).
"""

from include.datafly_fullstory.delivery.client import BatchClient
from include.datafly_fullstory.delivery.loop import Delivery
from include.datafly_fullstory.delivery.order import undelivered_users
from include.datafly_fullstory.delivery.report import DeliveryReport, DeliverySettings

__all__ = ["BatchClient", "Delivery", "DeliveryReport", "DeliverySettings", "undelivered_users"]
