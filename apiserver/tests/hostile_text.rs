//! Hostile text through every parser a client's input reaches (issue 35's fuzz targets):
//! manifests (YAML and JSON, with aliases and deep nesting), label and field selectors,
//! quantities, and the token file. Each must answer with an error, never a panic, and what
//! it accepts must behave.
//!
//! proptest draws new inputs on every run and keeps any failing input under
//! `proptest-regressions/`, where it is replayed first on every later run: a crash found
//! once stays a regression test. `scripts/fuzz.sh SECONDS` runs these for a fixed time.

use std::collections::BTreeMap;

use flotilla_apiserver::auth::tokens::Tokens;
use flotilla_client::api::quantity::Quantity;
use flotilla_client::api::selector::{FieldSelector, LabelSelector};
use flotilla_client::manifest;
use proptest::prelude::*;

/// Text made of the pieces a parser cares about, so that inputs get past the first check.
fn text_of(pieces: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            4 => prop::sample::select(pieces).prop_map(str::to_string),
            1 => any::<char>().prop_map(|c| c.to_string()),
            1 => "[a-z0-9]{1,8}",
        ],
        0..40,
    )
    .prop_map(|v| v.concat())
}

const SELECTOR: &[&str] = &[
    "app",
    "tier",
    "=",
    "==",
    "!=",
    ",",
    " in ",
    " notin ",
    "(",
    ")",
    "!",
    "a",
    "b",
    "web",
    "example.com/",
    "-",
    ".",
    "_",
    " ",
    "spec.nodeName",
    "metadata.name",
    "status.phase",
];

const QUANTITY: &[&str] = &[
    "0",
    "1",
    "9",
    "250",
    ".",
    "-",
    "+",
    "m",
    "k",
    "M",
    "G",
    "T",
    "P",
    "E",
    "Ki",
    "Mi",
    "Gi",
    "Ti",
    "Pi",
    "Ei",
    "e",
    "E3",
    "e-3",
    "99999999999999999999",
    " ",
];

const YAML: &[&str] = &[
    "apiVersion: v1\n",
    "kind: Pod\n",
    "kind: List\n",
    "metadata:\n",
    "  name: x\n",
    "items:\n",
    "- ",
    "---\n",
    "&a ",
    "*a",
    "[",
    "]",
    "{",
    "}",
    ": ",
    "\n",
    "  ",
    "\"",
    "'",
    "!!binary ",
    "!!str ",
    "~",
    "null",
    "1e309",
    "-1",
    "<<: *a\n",
    "? ",
    "|\n",
    ">\n",
    "#",
    "\t",
    "\u{feff}",
];

const TOKENS: &[&str] = &[
    "tok",
    ",",
    "\"",
    "\"\"",
    "alice",
    "1001",
    "system:masters",
    "\n",
    "#",
    " ",
    "\r\n",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(512)
    ))]

    #[test]
    fn label_selectors_parse_or_refuse(s in text_of(SELECTOR)) {
        if let Ok(sel) = LabelSelector::parse(&s) {
            let labels = BTreeMap::from([("app".to_string(), "web".to_string())]);
            let _ = sel.matches(&labels);
        }
    }

    #[test]
    fn field_selectors_parse_or_refuse(s in text_of(SELECTOR)) {
        let allowed = ["metadata.name", "spec.nodeName", "status.phase"];
        if let Ok(sel) = FieldSelector::parse(&s, &allowed) {
            let _ = sel.matches(|f| (f == "metadata.name").then(|| "web".to_string()));
            let _ = sel.required_value("spec.nodeName");
        }
    }

    #[test]
    fn quantities_parse_or_refuse_and_print_back(s in text_of(QUANTITY)) {
        if let Ok(q) = Quantity::parse(&s) {
            // What is accepted prints as a quantity that parses to the same value.
            let printed = q.to_string();
            let again = Quantity::parse(&printed);
            prop_assert!(again.is_ok(), "{s:?} printed as {printed:?}, which does not parse");
            prop_assert_eq!(again.unwrap().millis(), q.millis());
        }
    }

    #[test]
    fn manifests_parse_or_refuse(s in text_of(YAML)) {
        let _ = manifest::parse(&s);
    }

    #[test]
    fn token_files_parse_or_refuse(s in text_of(TOKENS)) {
        if let Ok(t) = Tokens::parse(&s) {
            let _ = t.get("tok");
        }
    }
}

#[test]
fn deep_nesting_is_refused_without_overflowing_the_stack() {
    // Past the YAML reader's own limit, and then past the bound checked before parsing
    // (without it, 100,000 levels took 44 s to refuse).
    for depth in [200, 100_000] {
        let flow = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let json = format!("{{\"a\":{}}}", flow);
        for text in [flow, json] {
            let err = manifest::parse(&text).unwrap_err();
            assert!(err.message.starts_with("not valid YAML or JSON"), "{err}");
            if depth > 1_000 {
                assert!(
                    err.message.contains("nested deeper than 1000 levels"),
                    "{err}"
                );
            }
        }
    }
    // Brackets inside quoted strings and comments are text.
    let text = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: x\n  labels: {{a: \"{}\"}} # {}\n",
        "[".repeat(2_000),
        "{".repeat(2_000)
    );
    let err = manifest::parse(&text).map(|_| ()).unwrap_err_or_ok();
    assert!(!err.contains("nested deeper"), "{err}");
}

trait ErrText {
    fn unwrap_err_or_ok(self) -> String;
}

impl ErrText for Result<(), manifest::ManifestError> {
    fn unwrap_err_or_ok(self) -> String {
        self.err().map(|e| e.to_string()).unwrap_or_default()
    }
}
