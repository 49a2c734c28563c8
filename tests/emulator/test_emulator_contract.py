"""Contract: what the emulator accepts and refuses agrees with a schema of FullStory's request bodies.

Two sources of that schema, each a parameter of the `spec` fixture:
- `project`: the project's own schema (include/fullstory_emulator/schema.py, written from
  docs/fullstory-api.md), which every checkout has: these always run;
- `swagger`: FullStory's verbatim Swagger specs, read from ../shared/reference/fullstory-api/ (override:
  FULLSTORY_SPEC_DIR, the spec folder, or DATAFLY_SHARED_DIR, the shared folder), which CI lays beside
  the repo; without them these skip, saying so (in CI they fail).

For each request definition of the request endpoints (POST /v2/events, /v2/events/batch, /v2/users,
/v2/users/batch and their batch items) it builds valid bodies by walking the definition, then variants:
wrong type, null, unknown field, missing required field, maxLength / maxProperties / int32 boundaries.
Whether a variant is valid is decided by a JSON-schema validator over the source itself (Swagger objects
closed with additionalProperties: false, see docs/fullstory-api.md; the project schema is closed
already), never by the test's own expectation. Then: refused <=> invalid, with the single-item
endpoints answering 400 and batch items landing in /errors. Every response body the emulator returned
is finally validated against the response definition the Swagger gives for that path, method and
status (the project schema describes requests only, so that check needs the Swagger).

FullStory's rules beyond the Swagger (one form of identification per event) are respected by the valid
bases; removing an identifying field is expected to be refused, by name. The project schema states that
rule itself, and limits the Swagger leaves to prose (event name length, event properties, batch size).
"""

from __future__ import annotations

import copy
import re
import time
from pathlib import Path

import orjson
import pytest
import requests
from openapi_schema_validator import OAS30Validator, oas30_format_checker

from include.fullstory_emulator import schema as project_schema
from include.fullstory_emulator.testing import EmulatorProcess

SPEC_FILES = ("events.swagger.patched.json", "users.sdk.swagger.patched.json")
WRONG_TYPE = {
    "string": 12345,
    "integer": "12",
    "number": "1.5",
    "boolean": "yes",
    "object": "x",
    "array": "x",
}


# ---- the spec ----------------------------------------------------------------------------------------


def spec_dir() -> Path:
    from tests.conftest import missing_specs, spec_folder

    path = spec_folder()
    if any(not (path / name).is_file() for name in SPEC_FILES):
        missing_specs(path)
    return path


class _Definitions:
    definitions: dict

    def resolve(self, schema: dict) -> dict:
        while "$ref" in schema:
            schema = self.definitions[schema["$ref"].rsplit("/", 1)[1]]
        return schema

    def item_definition(self, envelope: str) -> str:
        return self.definitions[envelope]["properties"]["requests"]["items"]["$ref"].rsplit("/", 1)[1]


class ProjectSpec(_Definitions):
    """The project's own schema of the request bodies, seen through the same interface as `Spec`."""

    def __init__(self) -> None:
        self.definitions = project_schema.DEFINITIONS
        self.bodies = {
            endpoint.split(" ", 1)[1]: name for endpoint, name in project_schema.ENDPOINT_BODIES.items()
        }

    def request_definition(self, path: str) -> str:
        return self.bodies[path]

    def is_valid(self, definition: str, instance) -> bool:
        return project_schema.validator(definition).is_valid(instance)


class Spec(_Definitions):
    """FullStory's Swagger specs: request and response definitions."""

    def __init__(self, folder: Path) -> None:
        self.paths: dict = {}
        self.definitions: dict = {}
        for name in SPEC_FILES:
            doc = orjson.loads((folder / name).read_bytes())
            self.paths.update(doc["paths"])
            self.definitions.update(doc["definitions"])
        self.closed = {name: _closed(d) for name, d in self.definitions.items()}

    def request_definition(self, path: str) -> str:
        body = next(p for p in self.paths[path]["post"]["parameters"] if p["in"] == "body")
        return body["schema"]["$ref"].rsplit("/", 1)[1]

    def validator(self, definition: str, overrides: dict | None = None) -> OAS30Validator:
        definitions = {**self.closed, **(overrides or {})}
        schema = {"definitions": definitions, "allOf": [{"$ref": f"#/definitions/{definition}"}]}
        return OAS30Validator(schema, format_checker=oas30_format_checker)

    def is_valid(self, definition: str, instance) -> bool:
        return self.validator(definition).is_valid(instance)

    def response_schema(self, template: str, method: str, status: int) -> str | None:
        responses = self.paths.get(template, {}).get(method.lower(), {}).get("responses", {})
        ref = (responses.get(str(status)) or {}).get("schema", {}).get("$ref")
        return ref.rsplit("/", 1)[1] if ref else None


def _closed(schema):
    """The gateway refuses unknown fields: close every object that names its properties."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if schema.get("type") == "object" and "properties" in schema and isinstance(schema["properties"], dict):
        if all(isinstance(v, dict) for v in schema["properties"].values()):
            out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def swagger() -> Spec:
    return Spec(spec_dir())


@pytest.fixture(scope="module", params=["project", "swagger"])
def spec(request) -> Spec | ProjectSpec:
    """The source the emulator's verdicts are checked against: the project schema, always; FullStory's
    Swagger when present (skips, or fails in CI, without it)."""
    if request.param == "project":
        return ProjectSpec()
    return request.getfixturevalue("swagger")


# ---- valid bodies and variants, from the definitions --------------------------------------------------

# Free-form objects (no declared properties) get FullStory-valid content.
FREE_FORM = {
    "properties": {"plan": "pro", "seats": 5, "trial": False, "company": {"size": 40}, "tags": ["a", "b"]},
    "schema.properties": {"seats": "int", "company.size": "int"},
}


def sample(spec: Spec, schema: dict, path: tuple = ()):
    """A valid instance of `schema`, every declared property filled."""
    schema = spec.resolve(schema)
    kind = schema.get("type")
    if kind == "object":
        if "properties" not in schema:
            key = ".".join(path[-2:]) if path[-2:] == ("schema", "properties") else path[-1]
            return copy.deepcopy(FREE_FORM[key])
        return {name: sample(spec, sub, (*path, name)) for name, sub in schema["properties"].items()}
    if kind == "array":
        return [sample(spec, schema["items"], (*path, 0))]
    if kind == "string":
        if "enum" in schema:
            return schema["enum"][0]
        if schema.get("format") in ("date-time", "ISO 8601 string"):
            return "2022-03-15T14:23:23Z"
        example = schema.get("example", (schema.get("examples") or [None])[0])
        return example if isinstance(example, str) else f"v-{'-'.join(map(str, path))}"[:20]
    if kind == "integer":
        return 7
    if kind == "number":
        return 1.5
    if kind == "boolean":
        return True
    raise AssertionError(f"no sample for {schema} at {path}")


def _get(instance, path):
    for part in path:
        instance = instance[part]
    return instance


def _with(instance, path, value=None, delete=False):
    out = copy.deepcopy(instance)
    parent = _get(out, path[:-1])
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return out


def _is_int32(schema: dict) -> bool:
    """Swagger says `format: int32`; the project schema gives the bounds."""
    bounds = (schema.get("minimum"), schema.get("maximum"))
    return schema.get("format") == "int32" or bounds == (-(2**31), 2**31 - 1)


def variants(spec: Spec, schema: dict, base, path: tuple = ()):
    """(label, body) pairs: one defect each, at every declared field present in `base`."""
    schema = spec.resolve(schema)
    node = _get(base, path)
    kind = schema.get("type")
    where = ".".join(map(str, path)) or "<root>"
    if kind == "object" and "properties" in schema:
        yield f"unknown field in {where}", _with(base, (*path, "zz_unknown"), 1)
        for name in schema.get("required", []):
            yield f"missing required {where}.{name}", _with(base, (*path, name), delete=True)
        for name, sub in schema["properties"].items():
            if name in node:
                yield from _field_variants(spec, sub, base, (*path, name))
    elif kind == "object" and schema.get("maxProperties"):
        # filled up from the base's own keys, so merging into a stored user stays within the limit
        limit = schema["maxProperties"]
        full = {**node, **{f"p{i}": i for i in range(limit - len(node))}}
        yield f"{where} with {limit} properties", _with(base, path, full)
        yield f"{where} with {limit + 1} properties", _with(base, path, {**full, "p_extra": 1})


def _field_variants(spec: Spec, schema: dict, base, path: tuple):
    where = ".".join(map(str, path))
    resolved = spec.resolve(schema)
    kind = resolved.get("type")
    yield f"{where} wrong type", _with(base, path, WRONG_TYPE[kind])
    yield f"{where} null", _with(base, path, None)
    yield f"{where} removed", _with(base, path, delete=True)
    if kind == "string" and "maxLength" in resolved:
        limit = resolved["maxLength"]
        yield f"{where} at maxLength", _with(base, path, "u" * limit)
        yield f"{where} over maxLength", _with(base, path, "u" * (limit + 1))
    if kind == "integer" and _is_int32(resolved):
        yield f"{where} above int32", _with(base, path, 2**31)
        yield f"{where} int32 max", _with(base, path, 2**31 - 1)
    if kind == "number":
        yield f"{where} integral number", _with(base, path, 3)
    yield from variants(spec, schema, base, path)


# ---- FullStory's own rules, which the valid bases must respect ----------------------------------------


def event_bases(spec: Spec, definition: str) -> dict[str, tuple[dict, set]]:
    """Valid events with each form of identification, and the fields that identify (removing one is
    refused by FullStory's 'one form of identification' rule, not by the spec)."""
    full = sample(spec, spec.definitions[definition])
    by_uid = copy.deepcopy(full)
    del by_uid["user"]["id"], by_uid["session"]["id"]  # user.uid + session.use_most_recent
    by_id = copy.deepcopy(full)
    del by_id["user"]["uid"], by_id["session"]
    by_session = copy.deepcopy(full)
    del by_session["user"], by_session["session"]["use_most_recent"]
    return {
        "uid": (by_uid, {"user", "user.uid"}),
        "id": (by_id, {"user", "user.id"}),
        "session": (by_session, {"session", "session.id"}),
    }


def identification_broken(label: str, identifying: set) -> bool:
    match = re.fullmatch(r"(\S+) (removed|null)", label)
    return bool(match) and match.group(1) in identifying


# ---- HTTP, with every answer recorded for the response check -----------------------------------------


class Recorder:
    def __init__(self, emu: EmulatorProcess) -> None:
        self.emu = emu
        self.session = emu.api_session()
        self.answers: list[tuple[str, str, int, object]] = []

    def call(self, method: str, template: str, path: str | None = None, body=None, **kw) -> requests.Response:
        url = f"{self.emu.base_url}{path or template}"
        data = orjson.dumps(body) if body is not None else None
        response = self.session.request(method, url, data=data, timeout=30, **kw)
        parsed = response.json() if response.content else None
        self.answers.append((template, method, response.status_code, parsed))
        return response

    def finished_job(self, kind: str, job_id: str) -> dict:
        template = f"/v2/{kind}/batch/{{job_id}}"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status = self.call("GET", template, f"/v2/{kind}/batch/{job_id}").json()
            if status["job"]["status"] != "PROCESSING":
                return status
            time.sleep(0.02)
        raise AssertionError(f"job {job_id} still PROCESSING after 10 s")

    def pages(self, kind: str, job_id: str, view: str) -> list[dict]:
        results, token = [], None
        for _ in range(1000):
            params = {"page_token": token} if token else None
            page = self.call(
                "GET",
                f"/v2/{kind}/batch/{{job_id}}/{view}",
                f"/v2/{kind}/batch/{job_id}/{view}",
                params=params,
            ).json()
            results += page["results"]
            assert int(page["total_records"]) >= len(results)
            token = page.get("next_page_token")
            if not token:
                return results
        raise AssertionError("more than 1000 pages")


@pytest.fixture(scope="module")
def recorder():
    with EmulatorProcess(job_seconds=0.02, page_size=40) as emu:
        yield Recorder(emu)


def _key(item) -> bytes:
    return orjson.dumps(item, option=orjson.OPT_SORT_KEYS)


def _assert_batch_agrees(recorder: Recorder, kind: str, spec: Spec, item_def: str, cases: list):
    """One batch holding every item variant; /imports and /errors must match the spec's verdicts."""
    job = recorder.call("POST", f"/v2/{kind}/batch", body={"requests": [body for _, body, _ in cases]})
    assert job.status_code == 200, job.text
    job_id = job.json()["job"]["id"]
    status = recorder.finished_job(kind, job_id)
    errors = recorder.pages(kind, job_id, "errors")
    imports = recorder.pages(kind, job_id, "imports")
    refused_expected = sorted(_key(body) for _, body, accept in cases if not accept)
    echo = "event" if kind == "events" else "user"
    assert sorted(_key(e[echo]) for e in errors) == refused_expected, [
        (label, body) for label, body, accept in cases if not accept
    ]
    accepted = sum(1 for *_, accept in cases if accept)
    assert (status["imports"], status["errors"]) == (accepted, len(cases) - accepted)
    assert len(imports) == accepted
    assert status["job"]["status"] == ("FAILED" if accepted < len(cases) else "COMPLETED")
    for error in errors:
        assert error["code"] and error["message"]


# ---- the checks --------------------------------------------------------------------------------------


def test_generated_bases_are_spec_valid(spec):
    event_def = spec.request_definition("/v2/events")
    for base, _ in event_bases(spec, event_def).values():
        assert spec.is_valid(event_def, base)
    user_def = spec.request_definition("/v2/users")
    assert spec.is_valid(user_def, sample(spec, spec.definitions[user_def]))


def test_create_event_accepts_exactly_spec_valid_bodies(spec, recorder):
    definition = spec.request_definition("/v2/events")
    checked = refused = 0
    for base_name, (base, identifying) in event_bases(spec, definition).items():
        assert recorder.call("POST", "/v2/events", body=base).status_code == 200
        for label, body in variants(spec, spec.definitions[definition], base):
            answer = recorder.call("POST", "/v2/events", body=body)
            expected = spec.is_valid(definition, body) and not identification_broken(label, identifying)
            assert (answer.status_code == 200) == expected, (base_name, label, answer.text)
            if not expected:
                refused += 1
                error = answer.json()
                assert answer.status_code == 400 and error["code"], (label, error)
                field = label.split(" ")[0].split(".")[-1]
                if not label.startswith(("unknown", "missing")):
                    assert field in error["message"], (label, error)
            checked += 1
    assert checked > 100 and refused > 50


def test_create_user_accepts_exactly_spec_valid_bodies(spec, recorder):
    definition = spec.request_definition("/v2/users")
    base = sample(spec, spec.definitions[definition])
    cases = list(variants(spec, spec.definitions[definition], base))
    assert len(cases) > 20
    for label, body in cases:
        answer = recorder.call("POST", "/v2/users", body=body)
        expected = spec.is_valid(definition, body)
        assert (answer.status_code == 200) == expected, (label, answer.text)
        if not expected:
            assert answer.status_code == 400 and answer.json()["code"], label


def test_batch_event_items_refused_exactly_when_spec_invalid(spec, recorder):
    envelope = spec.request_definition("/v2/events/batch")
    item_def = spec.item_definition(envelope)
    cases = []
    for base, identifying in event_bases(spec, item_def).values():
        cases.append(("base", base, True))
        for label, body in variants(spec, spec.definitions[item_def], base):
            accept = spec.is_valid(item_def, body) and not identification_broken(label, identifying)
            cases.append((label, body, accept))
    cases.append(("not an object", "just a string", False))
    _assert_batch_agrees(recorder, "events", spec, item_def, cases)


def test_batch_user_items_refused_exactly_when_spec_invalid(spec, recorder):
    envelope = spec.request_definition("/v2/users/batch")
    item_def = spec.item_definition(envelope)
    full = sample(spec, spec.definitions[item_def])
    # Two bases, because uid is immutable once set (a rule of the data, not of the schema): one
    # targets an existing user by FullStory id (which must exist), one upserts by uid.
    by_id = {k: v for k, v in full.items() if k != "uid"}
    by_id["id"] = recorder.call("POST", "/v2/users", body={}).json()["id"]
    by_uid = {k: v for k, v in full.items() if k != "id"}
    cases = []
    for base in (by_id, by_uid):
        cases.append(("base", base, True))
        for label, body in variants(spec, spec.definitions[item_def], base):
            cases.append((label, body, spec.is_valid(item_def, body)))
    _assert_batch_agrees(recorder, "users", spec, item_def, cases)


@pytest.mark.parametrize("path", ["/v2/events/batch", "/v2/users/batch"])
def test_batch_envelope_refused_whole_exactly_when_spec_invalid(spec, recorder, path):
    envelope = spec.request_definition(path)
    item_def = spec.item_definition(envelope)
    item = event_bases(spec, item_def)["uid"][0] if "events" in path else {"uid": "env-user"}
    item.pop("context", None)  # shared.context is set in the base below
    base = {"requests": [item]}
    if "shared" in spec.definitions[envelope]["properties"]:
        base["shared"] = sample(spec, spec.definitions[envelope]["properties"]["shared"])
    assert spec.is_valid(envelope, base)
    cases = [("base", base)]
    schema = copy.deepcopy(spec.definitions[envelope])
    schema["properties"]["requests"] = {"type": "array"}  # item-level defects are the other test's
    for label, body in variants(spec, schema, base):
        cases.append((label, body))
    for label, body in cases:
        answer = recorder.call("POST", path, body=body)
        expected = spec.is_valid(envelope, body) and bool(body.get("requests"))
        assert (answer.status_code == 200) == expected, (label, answer.text)
        if not expected:
            assert answer.status_code == 400, (label, answer.text)


def test_error_statuses_use_the_spec_error_shape(recorder):
    emu = recorder.emu
    assert recorder.call("GET", "/v2/events/batch/{job_id}", "/v2/events/batch/nope").status_code == 404
    emu.set_faults(throttle_next=1)
    assert recorder.call("POST", "/v2/events", body={"name": "x", "user": {"uid": "u"}}).status_code == 429
    emu.set_faults(error_next=1)
    assert recorder.call("POST", "/v2/users", body={"uid": "u"}).status_code == 500
    recorder.session.headers["Authorization"] = "Basic na1.not-a-key/x"
    try:
        assert recorder.call("POST", "/v2/users/batch", body={"requests": [{}]}).status_code == 401
    finally:
        recorder.session.headers["Authorization"] = f"Basic {emu.api_key}"


def test_every_response_body_matches_the_spec(swagger, recorder):
    """Runs last in this module: checks every answer recorded above against the Swagger's responses."""
    spec = swagger
    assert len(recorder.answers) > 300
    # Failed items echo what was sent, which may itself be spec-invalid: checked for equality above,
    # so here the echo is allowed to be anything.
    relaxed = {}
    for name, echo in (
        ("fullstory.v2.events.GetBatchEventsImportErrorsResponse.FailedEventsImport", "event"),
        ("fullstory.v2.users.GetBatchUserImportErrorsResponse.FailedUserImport", "user"),
    ):
        definition = copy.deepcopy(spec.closed[name])
        definition["properties"][echo] = {}
        relaxed[name] = definition
    seen = set()
    for template, method, status, body in recorder.answers:
        definition = spec.response_schema(template, method, status)
        if status == 202:
            continue
        assert definition, f"the spec defines no {status} answer for {method} {template}"
        errors = sorted(spec.validator(definition, relaxed).iter_errors(body), key=str)
        assert not errors, (method, template, status, body, errors[0].message)
        seen.add((method, template, status))
    assert {s for _, _, s in seen} >= {200, 400, 401, 404, 429, 500}
