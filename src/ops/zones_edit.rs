//! The console's zone editor writes zones into the config file the operator also edits by hand:
//! through `toml_edit`, so that its comments, order and layout stay as they were. Only the
//! camera's `zones` change; the result is checked like `check-config` before it is written.

use serde_json::Value;
use toml_edit::{Array, DocumentMut, InlineTable, Item, Table, TableLike, value};

use crate::ops::api::FieldProblem;

/// Why the zones could not be written.
#[derive(Debug)]
pub enum EditError {
    /// The request names no such camera in the file.
    NoCamera,
    /// The file does not parse (it was broken by hand since vigil read it).
    File(String),
    /// The request's zones, each problem with its key.
    Zones(Vec<FieldProblem>),
}

/// One zone as the console sends it.
struct ZoneEdit {
    name: String,
    rect: Option<Vec<f64>>,
    polygon: Option<Vec<[f64; 2]>>,
    thresholds: Vec<(String, f64)>,
    head: Option<String>,
}

/// Replaces camera `camera`'s zones in config text `text` with `zones` (`{"<name>": {"rect":
/// [x0, y0, x1, y1], "polygon": [[x, y], ...], "thresholds": {"<label>": 0.8}, "head": "..."}}`;
/// each key but one of rect/polygon optional). Zones that stay keep their other keys and
/// comments; new ones become `[cameras.<camera>.zones.<name>]` tables (or inline tables where
/// the camera is one).
pub fn set_zones(text: &str, camera: &str, zones: &Value) -> Result<String, EditError> {
    let edits = read_edits(camera, zones).map_err(EditError::Zones)?;
    let mut doc: DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| EditError::File(e.message().to_string()))?;
    let cam = doc
        .get_mut("cameras")
        .and_then(Item::as_table_like_mut)
        .and_then(|c| c.get_mut(camera))
        .ok_or(EditError::NoCamera)?;
    let inline = cam.is_inline_table();
    let cam = cam.as_table_like_mut().ok_or(EditError::NoCamera)?;
    if edits.is_empty() {
        cam.remove("zones");
        return Ok(doc.to_string());
    }
    if cam.get("zones").and_then(Item::as_table_like).is_none() {
        let fresh = if inline {
            value(InlineTable::new())
        } else {
            let mut t = Table::new();
            t.set_implicit(true);
            Item::Table(t)
        };
        cam.insert("zones", fresh);
    }
    let table = cam
        .get_mut("zones")
        .and_then(Item::as_table_like_mut)
        .expect("zones is a table now");
    let names: Vec<String> = table.iter().map(|(k, _)| k.to_string()).collect();
    for name in names {
        if !edits.iter().any(|e| e.name == name) {
            table.remove(&name);
        }
    }
    for edit in &edits {
        write_zone(table, edit, inline);
    }
    Ok(doc.to_string())
}

fn write_zone(zones: &mut dyn TableLike, edit: &ZoneEdit, inline: bool) {
    let existing = zones.get_mut(&edit.name).and_then(Item::as_table_like_mut);
    let zone: &mut dyn TableLike = match existing {
        Some(z) => z,
        None => {
            let item = if inline || zones.is_dotted() || zone_tables_are_inline(zones) {
                value(InlineTable::new())
            } else {
                Item::Table(Table::new())
            };
            zones.insert(&edit.name, item);
            zones
                .get_mut(&edit.name)
                .and_then(Item::as_table_like_mut)
                .expect("just inserted")
        }
    };
    set_or_remove(zone, "rect", edit.rect.as_ref().map(|r| numbers(r)));
    set_or_remove(
        zone,
        "polygon",
        edit.polygon.as_ref().map(|p| {
            let mut points = Array::new();
            for xy in p {
                points.push(numbers(xy));
            }
            points
        }),
    );
    if edit.thresholds.is_empty() {
        zone.remove("thresholds");
    } else {
        let mut t = InlineTable::new();
        for (label, v) in &edit.thresholds {
            t.insert(label, round(*v).into());
        }
        zone.insert("thresholds", value(t));
    }
    match &edit.head {
        Some(h) => {
            zone.insert("head", value(h.as_str()));
        }
        None => {
            zone.remove("head");
        }
    }
}

/// Whether the zones already there are written inline (`steps = { rect = [...] }`): new ones
/// follow their style.
fn zone_tables_are_inline(zones: &dyn TableLike) -> bool {
    zones
        .iter()
        .next()
        .is_some_and(|(_, z)| z.is_inline_table())
}

fn set_or_remove(t: &mut dyn TableLike, key: &str, v: Option<Array>) {
    match v {
        Some(a) => {
            t.insert(key, value(a));
        }
        None => {
            t.remove(key);
        }
    }
}

fn round(v: f64) -> f64 {
    (v * 1e4).round() / 1e4
}

fn numbers(v: &[f64]) -> Array {
    v.iter().map(|x| round(*x)).collect()
}

/// The problems found while reading a request.
#[derive(Default)]
struct Found(Vec<FieldProblem>);

impl Found {
    fn push(&mut self, key: String, message: &str) {
        self.0.push(FieldProblem {
            key,
            message: message.to_string(),
        });
    }

    /// The value at `zone[field]` as a `T`, None when absent (or null); a problem when it is
    /// not one.
    fn field<T: serde::de::DeserializeOwned>(
        &mut self,
        zone: &serde_json::Map<String, Value>,
        key: &str,
        field: &str,
        expected: &str,
    ) -> Option<T> {
        let v = zone.get(field).filter(|v| !v.is_null())?;
        let read = serde_json::from_value(v.clone()).ok();
        if read.is_none() {
            self.push(format!("{key}.{field}"), expected);
        }
        read
    }
}

/// The request's zones, or every problem of their shape (the values are checked by the config's
/// own validation afterwards).
fn read_edits(camera: &str, zones: &Value) -> Result<Vec<ZoneEdit>, Vec<FieldProblem>> {
    let base = format!("cameras.{camera}.zones");
    let mut found = Found::default();
    let Some(map) = zones.as_object() else {
        found.push(base, "expected an object of zones by name");
        return Err(found.0);
    };
    let mut edits = Vec::new();
    for (name, z) in map {
        let key = format!("{base}.{name}");
        match z.as_object() {
            Some(z) => edits.push(read_zone(&mut found, name, &key, z)),
            None => found.push(key, "expected an object (rect, polygon, thresholds, head)"),
        }
    }
    if found.0.is_empty() {
        Ok(edits)
    } else {
        Err(found.0)
    }
}

fn read_zone(
    found: &mut Found,
    name: &str,
    key: &str,
    z: &serde_json::Map<String, Value>,
) -> ZoneEdit {
    for k in z.keys() {
        if !["rect", "polygon", "thresholds", "head"].contains(&k.as_str()) {
            found.push(
                format!("{key}.{k}"),
                "unknown key (expected rect, polygon, thresholds or head)",
            );
        }
    }
    let rect = found.field(z, key, "rect", "expected [x0, y0, x1, y1] as numbers");
    let polygon = found.field(z, key, "polygon", "expected [[x, y], ...] as numbers");
    let mut thresholds = Vec::new();
    let table: Option<serde_json::Map<String, Value>> =
        found.field(z, key, "thresholds", "expected an object of label: number");
    for (label, v) in table.unwrap_or_default() {
        match v.as_f64() {
            Some(x) => thresholds.push((label, x)),
            None => found.push(format!("{key}.thresholds.{label}"), "expected a number"),
        }
    }
    let head: Option<String> = found.field(z, key, "head", "expected a head's name");
    ZoneEdit {
        name: name.to_string(),
        rect,
        polygon,
        thresholds,
        head: head.map(|h| h.trim().to_string()).filter(|h| !h.is_empty()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const FILE: &str = r#"# The porch camera.
[cameras.porch]
source = "test"   # a test pattern

# The steps, where parcels land.
[cameras.porch.zones.steps]
rect = [0.1, 0.6, 0.3, 0.9]   # left of the door
head = "steps"

[cameras.porch.zones.gate]
rect = [0.7, 0.1, 0.9, 0.4]

[cameras.drive]
source = "test"
zones = { lane = { rect = [0.0, 0.0, 0.5, 0.5] } }
"#;

    #[test]
    fn zones_change_and_the_comments_stay() {
        let zones = json!({
            "steps": {"rect": [0.12345678, 0.6, 0.3, 0.9], "head": "steps",
                      "thresholds": {"package": 0.8}},
            "path": {"polygon": [[0.1, 0.1], [0.5, 0.1], [0.3, 0.4]]},
        });
        let out = set_zones(FILE, "porch", &zones).unwrap();
        for kept in [
            "# The porch camera.",
            "# a test pattern",
            "# The steps, where parcels land.",
        ] {
            assert!(out.contains(kept), "{kept:?} lost:\n{out}");
        }
        let parsed: toml::Table = out.parse().unwrap();
        let z = &parsed["cameras"]["porch"]["zones"];
        assert!(z.get("gate").is_none(), "{out}");
        assert_eq!(z["steps"]["rect"][0].as_float(), Some(0.1235));
        assert_eq!(z["steps"]["thresholds"]["package"].as_float(), Some(0.8));
        assert_eq!(z["path"]["polygon"][2][1].as_float(), Some(0.4));
        // The other camera is untouched, byte for byte.
        assert!(out.contains("zones = { lane = { rect = [0.0, 0.0, 0.5, 0.5] } }"));
    }

    #[test]
    fn an_inline_camera_gets_inline_zones_and_no_zones_removes_the_key() {
        let out = set_zones(
            FILE,
            "drive",
            &json!({"lane": {"rect": [0.0, 0.0, 0.6, 0.5]}, "kerb": {"rect": [0.5, 0.5, 1, 1]}}),
        )
        .unwrap();
        let parsed: toml::Table = out.parse().unwrap();
        let z = &parsed["cameras"]["drive"]["zones"];
        assert_eq!(z["lane"]["rect"][2].as_float(), Some(0.6));
        assert_eq!(z["kerb"]["rect"][3].as_float(), Some(1.0));
        let none = set_zones(&out, "drive", &json!({})).unwrap();
        let parsed: toml::Table = none.parse().unwrap();
        assert!(parsed["cameras"]["drive"].get("zones").is_none());
    }

    #[test]
    fn bad_shapes_are_named_by_key_and_unknown_cameras_refused() {
        let Err(EditError::Zones(p)) = set_zones(
            FILE,
            "porch",
            &json!({"steps": {"rect": "wide", "thresholds": {"cat": "high"}, "colour": 1}}),
        ) else {
            panic!("accepted");
        };
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "cameras.porch.zones.steps.colour",
                "cameras.porch.zones.steps.rect",
                "cameras.porch.zones.steps.thresholds.cat"
            ]
        );
        assert!(matches!(
            set_zones(FILE, "garage", &json!({})),
            Err(EditError::NoCamera)
        ));
        assert!(matches!(
            set_zones("[cameras", "porch", &json!({})),
            Err(EditError::File(_))
        ));
    }
}
