//! The instances of a TensorFlow Serving predict body, read as the JSON streams by. Their count
//! (at most [`MAX_INSTANCES`]) and each one's shape are checked while parsing, so no body,
//! however long its lists, is ever held as a tree of values: a wrong first element stops the
//! parse there, keys that are not ours are skipped without being stored, and the base64 texts
//! are borrowed from the body when they hold no escape.
//!
//! Accepted, as TensorFlow Serving takes one binary input: rows (`"instances"`: a list of
//! `{"b64": ...}` or `{"<input>": {"b64": ...}}`) or columns (`"inputs"`: a list of
//! `{"b64": ...}`, one `{"b64": ...}`, or `{"<input>": either}`). Other keys
//! (`signature_name`) are ignored.

use std::borrow::Cow;
use std::fmt;

use serde::de::{
    self, DeserializeSeed, Deserializer, Error as _, IgnoredAny, MapAccess, SeqAccess, Visitor,
};

use crate::ops::api::ApiError;

/// Most images in one predict request.
pub const MAX_INSTANCES: usize = 64;

/// The base64 texts of a JSON predict body, in order; a 400 naming the cause otherwise.
pub fn parse_instances(body: &[u8]) -> Result<Vec<Cow<'_, str>>, ApiError> {
    serde_json::from_slice::<Body>(body)
        .map(|b| b.0)
        .map_err(|e| match e.classify() {
            serde_json::error::Category::Data => ApiError::bad_request(e.to_string()),
            _ => ApiError::bad_request(format!("malformed JSON: {e}")),
        })
}

struct Body<'de>(Vec<Cow<'de, str>>);

impl<'de> de::Deserialize<'de> for Body<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(BodyVisitor)
    }
}

struct BodyVisitor;

impl<'de> Visitor<'de> for BodyVisitor {
    type Value = Body<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object with \"instances\" or \"inputs\"")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Body<'de>, A::Error> {
        let mut found: Option<(Key, Vec<Cow<'de, str>>)> = None;
        while let Some(key) = map.next_key::<Key>()? {
            if key == Key::Other {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            if let Some((first, _)) = &found {
                return Err(A::Error::custom(if *first == key {
                    format!("\"{}\" is given twice", key.name())
                } else {
                    "give either \"instances\" or \"inputs\", not both".into()
                }));
            }
            let list = if key == Key::Instances {
                map.next_value_seed(Rows)?
            } else {
                map.next_value_seed(Columns)?
            };
            found = Some((key, list));
        }
        found.map(|(_, list)| Body(list)).ok_or_else(|| {
            A::Error::custom(
                "no instances: send {\"instances\": [{\"b64\": \"<base64 image>\"}]} or an image body",
            )
        })
    }
}

/// The keys that matter, at the top and in an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Instances,
    Inputs,
    B64,
    Other,
}

impl Key {
    fn name(self) -> &'static str {
        match self {
            Key::Instances => "instances",
            Key::Inputs => "inputs",
            Key::B64 => "b64",
            Key::Other => "(other)",
        }
    }
}

impl<'de> de::Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<Key, E> {
                Ok(match key {
                    "instances" => Key::Instances,
                    "inputs" => Key::Inputs,
                    "b64" => Key::B64,
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_identifier(KeyVisitor)
    }
}

/// Up to [`MAX_INSTANCES`] instances from a list; the list's rest is only skipped to say there
/// are too many.
fn instances_from_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Vec<Cow<'de, str>>, A::Error> {
    let mut out = Vec::new();
    while out.len() < MAX_INSTANCES {
        match seq.next_element_seed(Instance { index: out.len() })? {
            Some(text) => out.push(text),
            None => break,
        }
    }
    if out.len() == MAX_INSTANCES && seq.next_element::<IgnoredAny>()?.is_some() {
        return Err(A::Error::custom(format!(
            "more than {MAX_INSTANCES} instances; at most {MAX_INSTANCES} in one request"
        )));
    }
    if out.is_empty() {
        return Err(A::Error::custom("no instances: the list is empty"));
    }
    Ok(out)
}

/// `"instances"`: a list.
struct Rows;

impl<'de> DeserializeSeed<'de> for Rows {
    type Value = Vec<Cow<'de, str>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Rows {
    type Value = Vec<Cow<'de, str>>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("\"instances\" to be a list")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        instances_from_seq(seq)
    }
}

/// `"inputs"`: a list of instances, one instance, or `{"<input>": either}`.
struct Columns;

const COLUMNS: &str = "\"inputs\" to be a list of {\"b64\": ...}, one {\"b64\": ...}, or \
                       {\"<input name>\": either}";

impl<'de> DeserializeSeed<'de> for Columns {
    type Value = Vec<Cow<'de, str>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Columns {
    type Value = Vec<Cow<'de, str>>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(COLUMNS)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        instances_from_seq(seq)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut b64, mut named, mut keys) = (None, None, 0);
        while let Some(key) = map.next_key::<Key>()? {
            keys += 1;
            if key == Key::B64 {
                b64 = Some(map.next_value_seed(Base64Text { index: 0 })?);
            } else {
                named = Some(map.next_value_seed(Column)?);
            }
        }
        match (b64, named) {
            (Some(text), _) => Ok(vec![text]),
            (None, Some(list)) if keys == 1 => Ok(list),
            _ => Err(A::Error::custom(format!("expected {COLUMNS}"))),
        }
    }
}

/// The value of `{"<input>": ...}` in `"inputs"`: a list of instances or one.
struct Column;

impl<'de> DeserializeSeed<'de> for Column {
    type Value = Vec<Cow<'de, str>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Column {
    type Value = Vec<Cow<'de, str>>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of {\"b64\": ...} or one {\"b64\": ...}")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        instances_from_seq(seq)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        Instance { index: 0 }.visit_map(map).map(|text| vec![text])
    }
}

/// One instance: `{"b64": ...}` (other keys ignored) or `{"<input>": {"b64": ...}}`.
struct Instance {
    index: usize,
}

impl Instance {
    fn wrong_shape<E: de::Error>(&self) -> E {
        E::custom(format!(
            "instance {}: expected {{\"b64\": \"<base64 image>\"}} or \
             {{\"<input name>\": {{\"b64\": \"<base64 image>\"}}}}",
            self.index
        ))
    }
}

impl<'de> DeserializeSeed<'de> for Instance {
    type Value = Cow<'de, str>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Instance {
    type Value = Cow<'de, str>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "instance {} to be {{\"b64\": \"<base64 image>\"}}",
            self.index
        )
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut b64, mut named, mut keys) = (None, None, 0);
        let index = self.index;
        while let Some(key) = map.next_key::<Key>()? {
            keys += 1;
            if key == Key::B64 {
                b64 = Some(map.next_value_seed(Base64Text { index })?);
            } else {
                named = map.next_value_seed(NamedInput { index })?;
            }
        }
        match (b64, named) {
            (Some(text), _) => Ok(text),
            (None, Some(text)) if keys == 1 => Ok(text),
            _ => Err(self.wrong_shape()),
        }
    }
    // Anything else is refused where it starts (a list is not read through).
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        Err(self.wrong_shape())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Err(self.wrong_shape())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Err(self.wrong_shape())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Err(self.wrong_shape())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Err(self.wrong_shape())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Err(self.wrong_shape())
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(self.wrong_shape())
    }
}

/// The value of `"b64"`: a string, borrowed when it has no escape.
struct Base64Text {
    index: usize,
}

impl<'de> DeserializeSeed<'de> for Base64Text {
    type Value = Cow<'de, str>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Base64Text {
    type Value = Cow<'de, str>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a base64 string for \"b64\" in instance {}", self.index)
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_string()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

/// The value of a key other than `"b64"` in an instance: its `"b64"` when it is
/// `{"b64": ...}`, nothing otherwise (skipped without being stored).
struct NamedInput {
    index: usize,
}

impl<'de> DeserializeSeed<'de> for NamedInput {
    type Value = Option<Cow<'de, str>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for NamedInput {
    type Value = Option<Cow<'de, str>>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut b64 = None;
        while let Some(key) = map.next_key::<Key>()? {
            if key == Key::B64 {
                b64 = Some(map.next_value_seed(Base64Text { index: self.index })?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(b64)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(body: &str) -> Result<Vec<String>, String> {
        parse_instances(body.as_bytes())
            .map(|v| v.into_iter().map(Cow::into_owned).collect())
            .map_err(|e| e.message)
    }

    #[test]
    fn the_request_formats_of_tensorflow_serving() {
        let ok = |body: &str, want: &[&str]| assert_eq!(texts(body).unwrap(), want, "{body}");
        ok(r#"{"instances": [{"b64": "QQ=="}]}"#, &["QQ=="]);
        ok(
            r#"{"signature_name": "x", "instances": [{"b64": "QQ=="}, {"img": {"b64": "Qg=="}}]}"#,
            &["QQ==", "Qg=="],
        );
        ok(
            r#"{"instances": [{"b64": "QQ==", "key": [1, {"b64": 2}], "n": null}]}"#,
            &["QQ=="],
        );
        ok(
            r#"{"inputs": [{"b64": "QQ=="}, {"b64": "Qg=="}]}"#,
            &["QQ==", "Qg=="],
        );
        ok(r#"{"inputs": {"b64": "QQ=="}}"#, &["QQ=="]);
        ok(
            r#"{"inputs": {"image_bytes": [{"b64": "QQ=="}]}}"#,
            &["QQ=="],
        );
        ok(r#"{"inputs": {"image_bytes": {"b64": "QQ=="}}}"#, &["QQ=="]);
        ok(r#"{"instances": [{"b64": "Q\u0051=="}]}"#, &["QQ=="]);
    }

    #[test]
    fn texts_without_escapes_are_borrowed_from_the_body() {
        let body = br#"{"instances": [{"b64": "QQ=="}, {"b64": "Q\/=="}]}"#;
        let got = parse_instances(body).unwrap();
        assert!(matches!(got[0], Cow::Borrowed("QQ==")));
        assert!(matches!(&got[1], Cow::Owned(s) if s == "Q/=="));
    }

    #[test]
    fn every_refusal_names_its_cause() {
        let many = format!(
            r#"{{"instances": [{}]}}"#,
            vec![r#"{"b64": "QQ=="}"#; MAX_INSTANCES + 1].join(",")
        );
        for (body, cause) in [
            ("{\"instances\": [", "malformed JSON"),
            ("", "malformed JSON"),
            ("{}", "no instances"),
            ("[1, 2]", "JSON object"),
            ("\"x\"", "JSON object"),
            (r#"{"instances": []}"#, "the list is empty"),
            (r#"{"instances": {"b64": "QQ=="}}"#, "list"),
            (r#"{"instances": [{"b64": "QQ=="}, "plain"]}"#, "instance 1"),
            (r#"{"instances": [[0, 0, 0]]}"#, "instance 0: expected"),
            (r#"{"instances": [0, 0, 0]}"#, "instance 0: expected"),
            (r#"{"instances": [null]}"#, "instance 0: expected"),
            (r#"{"instances": [{}]}"#, "instance 0: expected"),
            (
                r#"{"instances": [{"a": 1, "b": 2}]}"#,
                "instance 0: expected",
            ),
            (r#"{"instances": [{"b64": 7}]}"#, "base64 string"),
            (&many, "at most 64"),
            (
                r#"{"instances": [{"b64": "QQ=="}], "inputs": [{"b64": "QQ=="}]}"#,
                "not both",
            ),
            (
                r#"{"instances": [{"b64": "QQ=="}], "instances": [{"b64": "QQ=="}]}"#,
                "twice",
            ),
            (r#"{"inputs": 5}"#, "\"inputs\" to be"),
            (
                r#"{"inputs": {"a": [{"b64": "QQ=="}], "b": [{"b64": "QQ=="}]}}"#,
                "\"inputs\" to be",
            ),
            (r#"{"inputs": {"a": []}}"#, "the list is empty"),
            (r#"{"inputs": {"a": 1}}"#, "a list of"),
        ] {
            let message = texts(body).unwrap_err();
            assert!(message.contains(cause), "{body}: {message}");
        }
    }

    #[test]
    fn a_huge_list_is_refused_at_its_first_wrong_element() {
        // 16 MiB of zeros: refused at the first one, without a value per element.
        let mut body = b"{\"instances\": [".to_vec();
        body.extend(std::iter::repeat_n(*b"0,", 8 << 20).flatten());
        body.extend(b"0]}");
        let started = std::time::Instant::now();
        let message = parse_instances(&body).unwrap_err().message;
        assert!(message.contains("instance 0"), "{message}");
        assert!(started.elapsed() < std::time::Duration::from_millis(100));
    }
}
