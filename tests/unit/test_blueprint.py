"""The blueprint file: the retail YAML loads, and a bad edit fails at load time naming the key."""

from __future__ import annotations

import copy

import pytest
import yaml

from include.datafly_fullstory.blueprint import (
    BLUEPRINT_DIR,
    BlueprintError,
    blueprint_from_dict,
    load_blueprint,
    normalise_event_name,
)

RETAIL = yaml.safe_load((BLUEPRINT_DIR / "retail.yaml").read_text())


def test_retail_blueprint_version_and_mappings():
    bp = load_blueprint("retail")
    assert (bp.name, bp.variant, bp.version) == ("fullstory", "retail", "0.1.0")
    assert {m.fullstory_name for m in bp.events} == {"page_view", "product_viewed", "purchase"}
    assert bp.type_mappings()["page"].fullstory_name == "page_view"
    assert bp.unmapped_types == {"group", "screen", "alias"}
    assert bp.consent_category == "analytics"
    assert bp.consent_paths == (("consent", "canonical", "analytics"), ("consent", "analytics"))


@pytest.mark.parametrize(
    ("spelling", "fullstory_name"),
    [
        ("Product Viewed", "product_viewed"),
        ("product_viewed", "product_viewed"),
        ("view_item", "product_viewed"),
        ("Order Completed", "purchase"),
        ("order_completed", "purchase"),
        ("purchase", "purchase"),
    ],
)
def test_every_spelling_of_a_blueprint_event_is_known(spelling, fullstory_name):
    assert load_blueprint().track_names()[normalise_event_name(spelling)].fullstory_name == fullstory_name


def test_blueprint_data_the_mapping_relies_on():
    bp = load_blueprint()
    purchase = next(m for m in bp.events if m.fullstory_name == "purchase")
    assert purchase.renames == {"transaction_id": "order_id", "value": "revenue"}
    items = {f.property: (f.sources, f.type) for f in bp.item_fields}
    assert items["item_ids"] == (("product_id", "item_id", "id"), "strs")
    assert items["item_prices"][1] == "reals" and items["item_quantities"][1] == "ints"
    assert bp.reserved_names["uid"] == "custom_uid"
    assert bp.identity["user_agent"] == (("userAgent",), ("user_agent",))
    assert bp.limits == {
        "event_name": 250,
        "properties": 500,
        "property_path": 512,
        "value_bytes": 8192,
        "uid": 256,
        "display_name": 256,
        "email": 128,
    }


def _broken(edit) -> str:
    doc = copy.deepcopy(RETAIL)
    edit(doc)
    with pytest.raises(BlueprintError) as err:
        blueprint_from_dict(doc, source="retail.yaml")
    return str(err.value)


@pytest.mark.parametrize(
    ("edit", "names"),
    [
        (lambda d: d.pop("version"), "retail.yaml: version: is missing"),
        (lambda d: d["events"]["purchase"].pop("match"), "events.purchase.match: is missing"),
        (lambda d: d["events"]["purchase"]["match"].update(type="identify"), "events.purchase.match.type"),
        (lambda d: d["events"]["purchase"]["match"].update(events=[]), "events.purchase.match.events"),
        (
            lambda d: d["events"]["purchase"].update(schema={"quantity": "integer"}),
            "events.purchase.schema.quantity",
        ),
        (lambda d: d["items"]["fields"][0].update(type="objs"), "items.fields[0].type"),
        (lambda d: d["items"]["fields"][1].update(property="item skus"), "items.fields[1].property"),
        (
            lambda d: d["events"]["purchase"]["match"]["events"].append("view_item"),
            "'view_item' is already mapped",
        ),
        (lambda d: d["limits"].update(uid=-1), "limits.uid: must be a positive integer"),
        (lambda d: d["consent"].update(paths="consent.analytics"), "consent.paths: must be a list"),
        (lambda d: d["reserved_names"].update(uid="bad name"), "reserved_names.uid"),
    ],
)
def test_a_bad_blueprint_names_the_key(edit, names):
    assert names in _broken(edit)


def test_unreadable_yaml_and_missing_file_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("events: [unclosed\n")
    with pytest.raises(BlueprintError, match="bad.yaml: not valid YAML"):
        load_blueprint(bad)
    with pytest.raises(BlueprintError, match="not found"):
        load_blueprint("wholesale")
