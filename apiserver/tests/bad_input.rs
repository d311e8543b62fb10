//! Random manifests and random protobuf bytes through the decoding and validation paths:
//! no panic anywhere, and a refused request writes nothing.

mod common;

use common::ControlPlane;
use flotilla_apiserver::validate::{FieldErrors, Kind, validate_metadata};
use flotilla_client::api::json::from_value;
use flotilla_client::api::*;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use prost::Message;
use serde_json::{Value, json};

/// Arbitrary JSON, biased toward the field names of a Deployment so that decoding gets deep.
fn arb_json() -> impl Strategy<Value = Value> {
    let names = prop::sample::select(vec![
        "apiVersion",
        "kind",
        "metadata",
        "name",
        "namespace",
        "labels",
        "spec",
        "replicas",
        "selector",
        "matchLabels",
        "template",
        "containers",
        "ports",
        "containerPort",
        "resources",
        "requests",
        "cpu",
        "strategy",
        "rollingUpdate",
        "maxSurge",
        "status",
        "command",
        "livenessProbe",
        "httpGet",
        "port",
        "bogus",
    ]);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        "[a-zA-Z0-9%./-]{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(5, 64, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(names.clone(), inner, 0..6).prop_map(|m| Value::Object(
                m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
            )),
        ]
    })
}

fn validate<K: Kind>(obj: &mut K) -> FieldErrors {
    obj.apply_defaults();
    let mut errs = FieldErrors::default();
    validate_metadata(obj, &mut errs);
    obj.validate(&mut errs);
    errs
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(512)
    ))]

    #[test]
    fn random_manifests_never_panic(v in arb_json()) {
        if let Ok(mut d) = from_value::<Deployment>(v.clone()) {
            let _ = validate(&mut d);
        }
        if let Ok(mut p) = from_value::<Pod>(v.clone()) {
            let _ = validate(&mut p);
        }
        if let Ok(mut s) = from_value::<Service>(v) {
            let _ = validate(&mut s);
        }
    }

    #[test]
    fn random_protobuf_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(mut p) = Pod::decode(bytes.as_slice()) {
            let _ = validate(&mut p);
            let _ = validate(&mut p.clone());
        }
        if let Ok(mut d) = Deployment::decode(bytes.as_slice()) {
            let _ = validate(&mut d);
        }
    }
}

#[tokio::test]
async fn corrupted_objects_sent_to_the_server_are_refused_cleanly() {
    let cp = ControlPlane::start(1).await;
    let c = cp.client();
    let base: Deployment = from_value(json!({
        "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "strategy": {"rollingUpdate": {"maxSurge": 1, "maxUnavailable": "25%"}},
            "template": {"metadata": {"labels": {"app": "web"}},
                         "spec": {"containers": [{"name": "web", "command": ["web"],
                                                  "ports": [{"containerPort": 80}],
                                                  "resources": {"requests": {"cpu": "1"}}}]}},
        },
    }))
    .unwrap();
    let bytes = base.encode_to_vec();
    // Flip a few bytes of a valid object, or cut it short: most results still decode, into
    // objects no manifest would produce.
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let len = bytes.len();
    // Printable replacement bytes keep strings valid UTF-8, so decoding gets further.
    let mutation = (
        prop::collection::vec((0..len, 0x20u8..0x7f), 1..3),
        prop_oneof![3 => Just(len), 1 => 0..len],
    );
    let (mut sent, mut accepted) = (0, 0);
    for _ in 0..600 {
        let (flips, cut) = mutation.new_tree(&mut runner).unwrap().current();
        let mut b = bytes.clone();
        for (at, v) in flips {
            b[at] = v;
        }
        b.truncate(cut);
        let Ok(d) = Deployment::decode(b.as_slice()) else {
            continue;
        };
        sent += 1;
        let before = c
            .list::<Deployment>(&ListRequest::default())
            .await
            .unwrap()
            .0;
        match c.create(&d).await {
            Ok(created) => {
                accepted += 1;
                let _: Deployment = c
                    .delete_named(created.namespace(), created.name())
                    .await
                    .unwrap();
            }
            Err(e) => {
                assert!(
                    matches!(
                        e.code(),
                        tonic::Code::InvalidArgument | tonic::Code::NotFound
                    ),
                    "unexpected {e:?}"
                );
                let after = c
                    .list::<Deployment>(&ListRequest::default())
                    .await
                    .unwrap()
                    .0;
                assert_eq!(before, after, "a refused create wrote something");
            }
        }
    }
    assert!(
        sent >= 100,
        "only {sent} of 600 mutations decoded; the test exercises too little"
    );
    assert!(accepted < sent, "every corrupted object was accepted");
    // The server is still there and well.
    c.get::<Namespace>("", "default").await.unwrap();
}
