//! The JSON side of the API objects: Kubernetes' lenient spellings on input, and conversion
//! between typed objects and JSON values with errors that name the path of the bad field.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

/// A manifest or patch that does not fit the object's shape.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ShapeError {
    /// Where, in the object's JSON: `spec.template.spec.containers[0].ports[0].containerPort`.
    pub path: String,
    pub message: String,
}

/// Decodes a JSON value into an object; the error names the path of the offending field.
pub fn from_value<T: DeserializeOwned>(value: Value) -> Result<T, ShapeError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        // serde says "unknown field `foo`, expected one of `a`, `b`, ..."; keep it short.
        let message = match message.split_once(", expected") {
            Some((head, _)) if head.starts_with("unknown field") => head.to_string(),
            _ => message,
        };
        ShapeError {
            path: if path == "." { "<root>".into() } else { path },
            message,
        }
    })
}

/// The object as a JSON value, with empty fields (zero, "", [], {}, null) left out, as
/// Kubernetes prints objects.
pub fn to_value<T: Serialize>(object: &T) -> Value {
    let mut value = serde_json::to_value(object).unwrap_or(Value::Null);
    prune(&mut value);
    value
}

/// Removes empty members from objects, recursively. Array elements are kept (their
/// positions matter) but pruned inside.
pub fn prune(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for v in map.values_mut() {
                prune(v);
            }
            map.retain(|_, v| !is_empty(v));
        }
        Value::Array(items) => items.iter_mut().for_each(prune),
        _ => {}
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

/// Applies an RFC 7386 JSON merge patch to `target`.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch_map) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    let Value::Object(target_map) = target else {
        return;
    };
    for (key, value) in patch_map {
        if value.is_null() {
            target_map.remove(key);
        } else {
            merge_patch(target_map.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// serde for fields Kubernetes spells as a number or a string (`port: 8080`, `port: http`,
/// `maxSurge: 25%`): stored as a string, written back as a number when it is one.
pub mod int_or_string {
    use super::*;

    pub fn serialize<S: Serializer>(value: &str, s: S) -> Result<S::Ok, S::Error> {
        match value.parse::<i64>() {
            Ok(n) if n.to_string() == value => s.serialize_i64(n),
            _ => s.serialize_str(value),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        d.deserialize_any(Scalar("an integer or a string"))
    }
}

/// serde for maps of bytes (a Secret's `data`, a ConfigMap's `binaryData`): each value is
/// standard base64 in JSON and YAML, as Kubernetes writes it; a value that is not base64 is
/// refused naming its key.
pub mod base64_map {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;

    pub fn serialize<S: Serializer>(
        map: &BTreeMap<String, Vec<u8>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_map(map.iter().map(|(k, v)| (k, STANDARD.encode(v))))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, Vec<u8>>, D::Error> {
        struct B(Vec<u8>);
        impl<'de> Deserialize<'de> for B {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                STANDARD
                    .decode(text.trim())
                    .map(B)
                    .map_err(|e| de::Error::custom(format!("illegal base64 data: {e}")))
            }
        }
        let map: Option<BTreeMap<String, B>> = Option::deserialize(d)?;
        Ok(map
            .unwrap_or_default()
            .into_iter()
            .map(|(k, B(v))| (k, v))
            .collect())
    }
}

/// A quantity map (`cpu: 1`, `memory: 128Mi`): numbers are accepted and kept as written.
pub fn quantity_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    struct Q(#[serde(deserialize_with = "quantity")] String);
    fn quantity<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        d.deserialize_any(Scalar("a quantity such as 250m or 128Mi"))
    }
    let map: Option<BTreeMap<String, Q>> = Option::deserialize(d)?;
    Ok(map
        .unwrap_or_default()
        .into_iter()
        .map(|(k, Q(v))| (k, v))
        .collect())
}

/// An int64 written as a number or, as protobuf's JSON mapping does, a decimal string.
pub fn int64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    Ok(opt_int64(d)?.unwrap_or_default())
}

/// An optional int64 written as a number, a decimal string or null.
pub fn opt_int64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<i64>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an integer")
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            i64::try_from(v)
                .map(Some)
                .map_err(|_| E::custom("integer out of range"))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            if v.fract() == 0.0 && v.abs() < 9.0e15 {
                Ok(Some(v as i64))
            } else {
                Err(E::invalid_type(de::Unexpected::Float(v), &self))
            }
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            v.parse()
                .map(Some)
                .map_err(|_| E::invalid_value(de::Unexpected::Str(v), &self))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(V)
        }
    }
    d.deserialize_any(V)
}

/// Accepts a string, an integer or a decimal number, as a string.
struct Scalar(&'static str);

impl Visitor<'_> for Scalar {
    type Value = String;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.0)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_unit<E: de::Error>(self) -> Result<String, E> {
        Ok(String::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut target = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        merge_patch(&mut target, &json!({"a": "z", "c": {"f": null}, "l": [3]}));
        assert_eq!(target, json!({"a": "z", "c": {"d": "e"}, "l": [3]}));
        merge_patch(&mut target, &json!({"c": "x"}));
        assert_eq!(target["c"], json!("x"));
    }

    #[test]
    fn prune_drops_empty_members_but_keeps_array_positions() {
        let mut v = json!({"a": 0, "b": "", "c": [{}, {"x": 1}], "d": {"e": []}, "f": true});
        prune(&mut v);
        assert_eq!(v, json!({"c": [{}, {"x": 1}], "f": true}));
    }
}
