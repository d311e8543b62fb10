//! Label selectors and field selectors in Kubernetes' string syntax, and the name and label
//! rules of the API (DNS-1123 labels and subdomains, label keys and values).

use std::collections::BTreeMap;
use std::fmt;

/// A selector that could not be parsed or built; the message says what and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelectorError(pub String);

impl fmt::Display for SelectorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SelectorError {}

/// One requirement of a label selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Requirement {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Requirement::Equals(k, v) => write!(f, "{k}={v}"),
            Requirement::NotEquals(k, v) => write!(f, "{k}!={v}"),
            Requirement::In(k, vs) => write!(f, "{k} in ({})", vs.join(",")),
            Requirement::NotIn(k, vs) => write!(f, "{k} notin ({})", vs.join(",")),
            Requirement::Exists(k) => write!(f, "{k}"),
            Requirement::DoesNotExist(k) => write!(f, "!{k}"),
        }
    }
}

/// A label selector: every requirement must hold. The empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector {
    pub requirements: Vec<Requirement>,
}

impl LabelSelector {
    /// Parses `app=web,tier in (a,b),env!=prod,canary,!legacy`.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let err = |msg: String| SelectorError(format!("label selector {s:?}: {msg}"));
        let mut requirements = Vec::new();
        for part in split_top_level(s).map_err(err)? {
            let part = part.trim();
            if part.is_empty() {
                if s.trim().is_empty() {
                    continue;
                }
                return Err(err("empty requirement (a stray ',')".into()));
            }
            requirements.push(parse_requirement(part).map_err(err)?);
        }
        Ok(Self { requirements })
    }

    /// Builds a selector from an object's `matchLabels` and `matchExpressions`
    /// (key, operator, values).
    pub fn from_parts(
        match_labels: &BTreeMap<String, String>,
        match_expressions: &[(String, String, Vec<String>)],
    ) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        for (k, v) in match_labels {
            check_key(k).map_err(|e| SelectorError(format!("matchLabels[{k:?}]: {e}")))?;
            check_value(v).map_err(|e| SelectorError(format!("matchLabels[{k:?}]: {e}")))?;
            requirements.push(Requirement::Equals(k.clone(), v.clone()));
        }
        for (i, (k, op, values)) in match_expressions.iter().enumerate() {
            let at = format!("matchExpressions[{i}]");
            check_key(k).map_err(|e| SelectorError(format!("{at}.key: {e}")))?;
            for v in values {
                check_value(v).map_err(|e| SelectorError(format!("{at}.values: {e}")))?;
            }
            let r = match op.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(SelectorError(format!(
                        "{at}.values: must be non-empty for operator {op}"
                    )));
                }
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(SelectorError(format!(
                        "{at}.values: must be empty for operator {op}"
                    )));
                }
                "In" => Requirement::In(k.clone(), values.clone()),
                "NotIn" => Requirement::NotIn(k.clone(), values.clone()),
                "Exists" => Requirement::Exists(k.clone()),
                "DoesNotExist" => Requirement::DoesNotExist(k.clone()),
                other => {
                    return Err(SelectorError(format!(
                        "{at}.operator: unknown operator {other:?} (In, NotIn, Exists, DoesNotExist)"
                    )));
                }
            };
            requirements.push(r);
        }
        Ok(Self { requirements })
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for LabelSelector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Splits on commas that are not inside parentheses.
fn split_top_level(s: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let mut depth = 0;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => {
                if depth > 0 {
                    return Err(format!("nested '(' at {i}"));
                }
                depth += 1;
            }
            ')' => {
                if depth == 0 {
                    return Err(format!("unexpected ')' at {i}"));
                }
                depth -= 1;
            }
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth > 0 {
        return Err("missing ')'".into());
    }
    parts.push(&s[start..]);
    Ok(parts)
}

fn parse_requirement(part: &str) -> Result<Requirement, String> {
    if let Some(key) = part.strip_prefix('!') {
        let key = key.trim();
        check_key(key).map_err(|e| format!("key {key:?}: {e}"))?;
        return Ok(Requirement::DoesNotExist(key.into()));
    }
    for (op, ctor) in [
        (
            "!=",
            Requirement::NotEquals as fn(String, String) -> Requirement,
        ),
        ("==", Requirement::Equals),
        ("=", Requirement::Equals),
    ] {
        if let Some((k, v)) = part.split_once(op) {
            let (k, v) = (k.trim(), v.trim());
            check_key(k).map_err(|e| format!("key {k:?}: {e}"))?;
            check_value(v).map_err(|e| format!("value {v:?} of {k}: {e}"))?;
            return Ok(ctor(k.into(), v.into()));
        }
    }
    if let Some(open) = part.find('(') {
        let head = part[..open].trim();
        let Some(body) = part[open + 1..].trim_end().strip_suffix(')') else {
            return Err(format!("{part:?}: missing ')'"));
        };
        let (key, op) = head
            .rsplit_once(char::is_whitespace)
            .ok_or_else(|| format!("{part:?}: expected `key in (…)` or `key notin (…)`"))?;
        let key = key.trim();
        check_key(key).map_err(|e| format!("key {key:?}: {e}"))?;
        let values: Vec<String> = body
            .split(',')
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect();
        if values.is_empty() {
            return Err(format!("{part:?}: at least one value is required"));
        }
        for v in &values {
            check_value(v).map_err(|e| format!("value {v:?} of {key}: {e}"))?;
        }
        return match op {
            "in" => Ok(Requirement::In(key.into(), values)),
            "notin" => Ok(Requirement::NotIn(key.into(), values)),
            other => Err(format!("unknown operator {other:?} (in, notin)")),
        };
    }
    if part.contains(char::is_whitespace) {
        return Err(format!("{part:?}: unknown operator"));
    }
    check_key(part).map_err(|e| format!("key {part:?}: {e}"))?;
    Ok(Requirement::Exists(part.into()))
}

fn check_key(k: &str) -> Result<(), String> {
    if k.is_empty() {
        return Err("a key is required".into());
    }
    validate_label_key(k)
}

fn check_value(v: &str) -> Result<(), String> {
    validate_label_value(v)
}

/// A field selector: `spec.nodeName=n1,status.phase!=Failed`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector {
    /// (field, value, equal?)
    pub requirements: Vec<(String, String, bool)>,
}

impl FieldSelector {
    /// Parses a field selector whose fields must be among `allowed`.
    pub fn parse(s: &str, allowed: &[&str]) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        if s.trim().is_empty() {
            return Ok(Self { requirements });
        }
        for part in s.split(',') {
            let part = part.trim();
            let (field, value, equal) = if let Some((f, v)) = part.split_once("!=") {
                (f, v, false)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, v, true)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, v, true)
            } else {
                return Err(SelectorError(format!(
                    "field selector {s:?}: {part:?} is not `field=value` or `field!=value`"
                )));
            };
            let field = field.trim();
            if !allowed.contains(&field) {
                return Err(SelectorError(format!(
                    "field selector {s:?}: field {field:?} is not supported (supported: {})",
                    allowed.join(", ")
                )));
            }
            requirements.push((field.to_string(), value.trim().to_string(), equal));
        }
        Ok(Self { requirements })
    }

    /// Whether the object with these field values matches; a missing field is "".
    pub fn matches(&self, get: impl Fn(&str) -> Option<String>) -> bool {
        self.requirements.iter().all(|(f, v, equal)| {
            let actual = get(f).unwrap_or_default();
            (actual == *v) == *equal
        })
    }

    /// The value an `f=v` requirement pins `field` to.
    pub fn required_value(&self, field: &str) -> Option<&str> {
        self.requirements
            .iter()
            .find(|(f, _, equal)| f == field && *equal)
            .map(|(_, v, _)| v.as_str())
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }
}

impl fmt::Display for FieldSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (field, value, equal)) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{field}{}{value}", if *equal { "=" } else { "!=" })?;
        }
        Ok(())
    }
}

const LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric \
    characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name')";
const SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case \
    alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character \
    (e.g. 'example.com')";
const NAME_MSG: &str = "must consist of alphanumeric characters, '-', '_' or '.', and must \
    start and end with an alphanumeric character (e.g. 'MyName', 'my.name', '123-abc')";

fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// A DNS-1123 label: at most 63 lowercase letters, digits and '-', alphanumeric at both ends.
pub fn validate_dns1123_label(s: &str) -> Result<(), String> {
    if s.len() > 63 {
        return Err("must be no more than 63 characters".into());
    }
    if is_dns_label(s) {
        Ok(())
    } else {
        Err(LABEL_MSG.into())
    }
}

/// A DNS-1123 subdomain: at most 253 characters, dot-separated labels.
pub fn validate_dns1123_subdomain(s: &str) -> Result<(), String> {
    if s.len() > 253 {
        return Err("must be no more than 253 characters".into());
    }
    if !s.is_empty() && s.split('.').all(is_dns_label) {
        Ok(())
    } else {
        Err(SUBDOMAIN_MSG.into())
    }
}

fn is_qualified_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// A label (or annotation) key: an optional DNS subdomain prefix and '/', then a name of at
/// most 63 alphanumeric characters, '-', '_' or '.'.
pub fn validate_label_key(s: &str) -> Result<(), String> {
    let (prefix, name) = match s.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    if let Some(p) = prefix {
        validate_dns1123_subdomain(p).map_err(|e| format!("prefix part {e}"))?;
    }
    if name.len() > 63 {
        return Err("name part must be no more than 63 characters".into());
    }
    if is_qualified_name(name) {
        Ok(())
    } else {
        Err(format!("name part {NAME_MSG}"))
    }
}

/// A label value: empty, or at most 63 alphanumeric characters, '-', '_' or '.'.
pub fn validate_label_value(s: &str) -> Result<(), String> {
    if s.len() > 63 {
        return Err("must be no more than 63 characters".into());
    }
    if s.is_empty() || is_qualified_name(s) {
        Ok(())
    } else {
        Err(format!("a valid label value {NAME_MSG}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn every_operator() {
        let l = labels(&[("app", "web"), ("tier", "front")]);
        for (sel, want) in [
            ("", true),
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("env!=prod", true),
            ("tier in (front, back)", true),
            ("tier notin (front)", false),
            ("env notin (prod)", true),
            ("env in (prod)", false),
            ("app", true),
            ("env", false),
            ("!env", true),
            ("!app", false),
            ("app=web, tier in (front)", true),
            ("app.kubernetes.io/name=x", false),
        ] {
            let s = LabelSelector::parse(sel).unwrap();
            assert_eq!(s.matches(&l), want, "{sel}");
        }
    }

    #[test]
    fn parse_errors_say_what() {
        for (sel, want) in [
            ("app in (a", "missing ')'"),
            ("=web", "a key is required"),
            ("app within (a)", "unknown operator \"within\""),
            ("app in ()", "at least one value"),
            ("-app=x", "key \"-app\""),
            ("app=web,", "stray ','"),
            ("app=we b", "value \"we b\""),
        ] {
            let e = LabelSelector::parse(sel).unwrap_err().to_string();
            assert!(e.contains(want), "{sel}: {e}");
        }
    }

    #[test]
    fn display_round_trips() {
        let s = LabelSelector::parse("a=b,c!=d,e in (f,g),h notin (i),j,!k").unwrap();
        assert_eq!(s.to_string(), "a=b,c!=d,e in (f,g),h notin (i),j,!k");
        assert_eq!(LabelSelector::parse(&s.to_string()).unwrap(), s);
    }

    #[test]
    fn structured_selectors() {
        let ml = labels(&[("app", "web")]);
        let s = LabelSelector::from_parts(&ml, &[("tier".into(), "In".into(), vec!["a".into()])])
            .unwrap();
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "a")])));
        assert!(!s.matches(&labels(&[("app", "web")])));
        let e = LabelSelector::from_parts(&ml, &[("t".into(), "In".into(), vec![])]).unwrap_err();
        assert!(e.0.contains("must be non-empty"), "{e}");
        let e = LabelSelector::from_parts(&ml, &[("t".into(), "Has".into(), vec![])]).unwrap_err();
        assert!(e.0.contains("unknown operator \"Has\""), "{e}");
    }

    #[test]
    fn field_selectors() {
        let allowed = ["metadata.name", "spec.nodeName"];
        let f = FieldSelector::parse("spec.nodeName=n1,metadata.name!=a", &allowed).unwrap();
        let get = |n: &str, node: &str| {
            let (n, node) = (n.to_string(), node.to_string());
            move |f: &str| match f {
                "metadata.name" => Some(n.clone()),
                "spec.nodeName" => Some(node.clone()),
                _ => None,
            }
        };
        assert!(f.matches(get("b", "n1")));
        assert!(!f.matches(get("a", "n1")));
        assert_eq!(f.required_value("spec.nodeName"), Some("n1"));
        assert_eq!(f.required_value("metadata.name"), None);
        assert_eq!(f.to_string(), "spec.nodeName=n1,metadata.name!=a");
        let e = FieldSelector::parse("spec.image=x", &allowed).unwrap_err();
        assert!(e.0.contains("\"spec.image\" is not supported"), "{e}");
        assert!(FieldSelector::parse("nonsense", &allowed).is_err());
    }

    #[test]
    fn names() {
        assert!(validate_dns1123_label("web-1").is_ok());
        assert!(validate_dns1123_label("Web").is_err());
        assert!(validate_dns1123_label("-web").is_err());
        assert!(validate_dns1123_label(&"a".repeat(64)).is_err());
        assert!(validate_dns1123_subdomain("a.b-c.d").is_ok());
        assert!(validate_dns1123_subdomain("a..b").is_err());
        assert!(validate_label_key("app.kubernetes.io/name").is_ok());
        assert!(validate_label_key("App_Name.x").is_ok());
        assert!(validate_label_key("bad/key/x").is_err());
        assert!(validate_label_value("").is_ok());
        assert!(validate_label_value("v1.2_3").is_ok());
        assert!(validate_label_value("has space").is_err());
    }
}
