//! Manifests: YAML or JSON in Kubernetes' shape, several documents per file (`---`), or a
//! `List` with `items`. Each document is checked against its kind's shape; an unknown kind
//! or field is an error that names the document and the field's path.

use flotilla_proto::api::json::{ShapeError, from_value};
use flotilla_proto::api::{KINDS, KindInfo, Resource, find_kind};
use serde::Deserialize;
use serde_json::Value;

/// One object of a manifest.
#[derive(Clone, Debug, PartialEq)]
pub struct Document {
    /// 1-based position in the file (items of a `List` count one by one).
    pub index: usize,
    pub kind: &'static KindInfo,
    pub value: Value,
}

impl Document {
    pub fn name(&self) -> &str {
        self.value
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    pub fn namespace(&self) -> &str {
        self.value
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    /// The typed object; the error names the field by its path.
    pub fn decode<K: Resource>(&self) -> Result<K, ManifestError> {
        from_value(self.value.clone()).map_err(|e: ShapeError| ManifestError {
            document: self.index,
            path: e.path,
            message: e.message,
        })
    }
}

/// What is wrong with a manifest, and where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("document {document}: {path}: {message}")]
pub struct ManifestError {
    pub document: usize,
    pub path: String,
    pub message: String,
}

/// The largest manifest read: a bigger one is refused before it is parsed, so a runaway
/// file cannot take the reader's memory (one object is bounded much lower, by the members'
/// `--max-request-bytes`).
pub const MAX_MANIFEST_BYTES: usize = 32 << 20;

/// Splits and checks a manifest. Every document must name a known kind with its apiVersion.
/// A manifest over [`MAX_MANIFEST_BYTES`] is refused, and so is one whose aliases expand
/// beyond reason (a "billion laughs" YAML bomb).
pub fn parse(text: &str) -> Result<Vec<Document>, ManifestError> {
    if text.len() > MAX_MANIFEST_BYTES {
        return Err(too_large(text.len()));
    }
    if flow_depth_exceeds(text, MAX_FLOW_DEPTH) {
        return Err(ManifestError {
            document: 0,
            path: "<root>".into(),
            message: format!(
                "not valid YAML or JSON: brackets nested deeper than {MAX_FLOW_DEPTH} levels"
            ),
        });
    }
    let mut docs = Vec::new();
    let mut index = 0;
    for de in serde_norway::Deserializer::from_str(text) {
        index += 1;
        let value = Value::deserialize(de).map_err(|e| ManifestError {
            document: index,
            path: "<root>".into(),
            message: format!("not valid YAML or JSON: {e}"),
        })?;
        if value.is_null() {
            // An empty document (a trailing `---`).
            index -= 1;
            continue;
        }
        if value.get("kind").and_then(Value::as_str) == Some("List") {
            let items = match value.get("items") {
                Some(Value::Array(items)) => items.clone(),
                _ => {
                    return Err(ManifestError {
                        document: index,
                        path: "items".into(),
                        message: "a List needs an array of items".into(),
                    });
                }
            };
            for item in items {
                docs.push(check(index, item)?);
                index += 1;
            }
            index -= 1;
            continue;
        }
        docs.push(check(index, value)?);
    }
    Ok(docs)
}

/// Flow nesting (`[` and `{`) refused before parsing: far deeper than the YAML reader
/// accepts (128 levels), whose time grows with the square of the depth (100,000 levels,
/// 200 KB, took 44 s to refuse).
const MAX_FLOW_DEPTH: usize = 1_000;

/// Whether `text` opens more than `max` brackets without closing them, outside quoted
/// strings and comments. An approximation of YAML's grammar that errs towards letting text
/// through to the parser, which refuses what is really too deep.
fn flow_depth_exceeds(text: &str, max: usize) -> bool {
    let mut depth = 0usize;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    let mut comment = false;
    let mut after_space = true;
    for c in text.chars() {
        if comment {
            comment = c != '\n';
            after_space = true;
            continue;
        }
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if q == '"' && c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '"' | '\'' => quote = Some(c),
            '#' if after_space => comment = true,
            '[' | '{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        after_space = c.is_whitespace();
    }
    false
}

/// The error for a manifest of `len` bytes (or more).
pub fn too_large(len: usize) -> ManifestError {
    ManifestError {
        document: 0,
        path: "<root>".into(),
        message: format!(
            "the manifest is {len} bytes or more, over the limit of {MAX_MANIFEST_BYTES}: split \
             it into several files"
        ),
    }
}

fn check(index: usize, value: Value) -> Result<Document, ManifestError> {
    let err = |path: &str, message: String| ManifestError {
        document: index,
        path: path.into(),
        message,
    };
    if !value.is_object() {
        return Err(err(
            "<root>",
            "must be an object with apiVersion, kind and metadata".into(),
        ));
    }
    let kind_name = value.get("kind").and_then(Value::as_str).unwrap_or("");
    if kind_name.is_empty() {
        return Err(err("kind", "required".into()));
    }
    let known = || KINDS.iter().map(|k| k.kind).collect::<Vec<_>>().join(", ");
    let kind = find_kind(kind_name)
        .filter(|k| k.kind == kind_name)
        .ok_or_else(|| {
            err(
                "kind",
                format!("unknown kind {kind_name:?}; Flotilla serves {}", known()),
            )
        })?;
    let api_version = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    if api_version != kind.api_version {
        return Err(err(
            "apiVersion",
            format!(
                "{kind_name} is served as apiVersion {:?}, got {api_version:?}",
                kind.api_version
            ),
        ));
    }
    if value
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .is_empty()
    {
        return Err(err("metadata.name", "required".into()));
    }
    let doc = Document { index, kind, value };
    // Check the shape now, so nothing is applied from a file with a bad document in it.
    with_kind!(kind.kind, K => doc.decode::<K>().map(|_| ()))?;
    Ok(doc)
}

/// Runs `$body` with `$k` bound to the Rust type of the kind named `$kind` (one of
/// [`flotilla_proto::api::KINDS`]); derived from [`flotilla_proto::for_each_kind!`].
#[macro_export]
macro_rules! with_kind {
    ($kind:expr, $k:ident => $body:expr) => {
        $crate::api::for_each_kind!([$crate::__with_kind_dispatch] $kind, $k, $body)
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __with_kind_dispatch {
    ([$kind:expr, $k:ident, $body:expr] $($ty:ident { $($rest:tt)* }),* $(,)?) => {{
        let kind: &str = $kind;
        $(
            if kind == stringify!($ty) {
                #[allow(dead_code)]
                type $k = $crate::api::$ty;
                $body
            } else
        )*
        {
            unreachable!("kind {kind} is not in flotilla_proto::for_each_kind!")
        }
    }};
}
pub use with_kind;

#[cfg(test)]
mod tests {
    #[test]
    fn with_kind_names_every_kind_by_its_type() {
        use flotilla_proto::api::{KINDS, Resource};
        for k in KINDS {
            let (kind, plural, namespaced, service) = crate::with_kind!(k.kind, K => {
                (K::KIND, K::PLURAL, K::NAMESPACED, K::SERVICE)
            });
            assert_eq!((kind, plural, namespaced), (k.kind, k.plural, k.namespaced));
            assert!(service.starts_with("flotilla.api.v1."), "{service}");
        }
    }

    #[test]
    fn a_yaml_bomb_and_a_huge_manifest_are_refused_quickly() {
        // "Billion laughs": nine levels of nine aliases each, 9^9 strings once expanded.
        let mut bomb = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
        for i in 1..9 {
            let p = i - 1;
            bomb.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let start = std::time::Instant::now();
        let err = parse(&bomb).unwrap_err();
        assert!(start.elapsed() < std::time::Duration::from_secs(2), "{err}");
        assert!(err.message.starts_with("not valid YAML or JSON"), "{err}");
        // 100 MB: refused before any parsing.
        let huge = "#".repeat(100 << 20);
        let start = std::time::Instant::now();
        let err = parse(&huge).unwrap_err();
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
        assert!(err.message.contains("over the limit of 33554432"), "{err}");
    }

    use super::*;

    const GOOD: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        command: ["python3", "-m", "http.server"]
        resources:
          requests: {cpu: 100m, memory: 64Mi}
---
"#;

    #[test]
    fn several_documents() {
        let docs = parse(GOOD).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1].kind.kind, "Deployment");
        assert_eq!((docs[1].namespace(), docs[1].name()), ("shop", "web"));
        let d: flotilla_proto::api::Deployment = docs[1].decode().unwrap();
        assert_eq!(d.spec.unwrap().replicas, Some(2));
    }

    #[test]
    fn json_and_lists() {
        let docs = parse(
            r#"{"apiVersion": "v1", "kind": "List", "items": [
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}},
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "b"}}]}"#,
        )
        .unwrap();
        assert_eq!(docs.iter().map(|d| d.index).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn errors_name_document_and_path() {
        let bad = GOOD.replace("requests:", "requestz:");
        let e = parse(&bad).unwrap_err();
        assert_eq!(e.document, 2);
        assert_eq!(
            e.path,
            "spec.template.spec.containers[0].resources.requestz"
        );
        let e = parse("apiVersion: v1\nkind: Widget\nmetadata: {name: a}\n").unwrap_err();
        assert!(e.to_string().contains("unknown kind \"Widget\""), "{e}");
        let e = parse("apiVersion: v1\nkind: Deployment\nmetadata: {name: a}\n").unwrap_err();
        assert!(e.to_string().contains("apiVersion \"apps/v1\""), "{e}");
        let e = parse("kind: [").unwrap_err();
        assert!(e.message.starts_with("not valid YAML"), "{e}");
        let e = parse("apiVersion: v1\nkind: Pod\nmetadata: {}\n").unwrap_err();
        assert_eq!(e.path, "metadata.name");
    }
}
