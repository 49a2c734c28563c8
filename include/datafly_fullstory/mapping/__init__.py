"""The mapping stage: validated Datafly rows -> FullStory events and user updates, as request chunks.

Modules, each importing only those listed before it:
- `settings.py`: `MappingSettings`, the stage's options (a plain dict through Airflow params / XCom);
- `columns.py`: column helpers: landing columns as arrays, timestamps, getters into parsed JSON, JSON
  columns parsed once per distinct text (`ParsedJson`, `Distinct`);
- `properties.py`: FullStory's property rules (`PropertyCleaner`) and `Reject`, a row that would break one;
- `types.py`: declared types (`coerce`, `TypeChecker`); `type_report.py` owns `type_problems.parquet`;
- `verdicts.py`: each row's outcome (`Verdict`) and the rules that decide it for a whole batch at once:
  Datafly type -> blueprint mapping, the run's `event_types`, analytics consent, identity;
- `suppression.py`: `Suppression`, the people with a deletion request, whose rows are filtered first;
- `identity.py`: identity stitching: an event with no user_id and no session id gets the user its
  anonymous id was identified as (`IdentityMap`, `Stitcher`), and the file `identity.parquet`;
- `prepare.py`: `prepare_window`, the revocations and the identity pairs from one read of the parts;
- `bodies.py`: one serialised body per surviving row (`EventBuilder`) and per folded user;
- `templates.py`: `EventLines`, a batch's event lines built column-wise from per-template byte fragments
  (the same bytes as `bodies.EventBuilder`, which builds the rows the fragments cannot express);
- `batch.py`: `BatchMapper`, one landing frame -> event lines, identify rows and outcomes; `identify`
  rows are folded per uid once the whole window is read (`fold_users`);
- `trait_diff.py`: trait diffing, user updates equal to the last one delivered are not sent;
- `stage.py`: `run_mapping`, the stage's I/O: validated parts in; chunks, outcomes, manifest out.

Rows that end here get a row in `outcomes/mapping.parquet`; rows written to chunks get theirs at delivery.
"""

from include.datafly_fullstory.mapping.batch import BatchMapper
from include.datafly_fullstory.mapping.properties import PropertyCleaner, Reject
from include.datafly_fullstory.mapping.settings import MappingSettings
from include.datafly_fullstory.mapping.stage import run_mapping

__all__ = ["BatchMapper", "MappingSettings", "PropertyCleaner", "Reject", "run_mapping"]
