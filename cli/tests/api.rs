//! The real binary's API: a cross-language client (Python, generated with grpcio-tools from
//! the repository's `.proto` files) and the kubectl-like verbs of the `flotilla` CLI.

use std::path::Path;
use std::process::{Command, Output, Stdio};

mod common;

use common::*;

/// The Python with grpcio and grpcio-tools (`scripts/test.sh` makes a venv with them).
fn python() -> String {
    std::env::var("FLOTILLA_PYTHON").unwrap_or_else(|_| "python3".into())
}

#[test]
fn a_generated_python_client_creates_lists_and_watches() {
    let c = Cluster::start();
    let out_dir = tempfile::tempdir().unwrap();
    let protos = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto/proto");
    // Every published file of the API package, as a user would compile them.
    let mut files: Vec<String> = std::fs::read_dir(protos.join("flotilla/api/v1"))
        .unwrap()
        .map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().to_string();
            format!("flotilla/api/v1/{name}")
        })
        .filter(|f| f.ends_with(".proto"))
        .collect();
    files.sort();
    let gen_out = Command::new(python())
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(&protos)
        .arg(format!("--python_out={}", out_dir.path().display()))
        .arg(format!("--grpc_python_out={}", out_dir.path().display()))
        .args(&files)
        .output()
        .expect("python runs");
    assert!(
        gen_out.status.success(),
        "grpcio-tools could not compile the published protos (run scripts/test.sh, which \
         installs them): {}",
        String::from_utf8_lossy(&gen_out.stderr)
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/api_client.py");
    let run = Command::new(python())
        .arg(script)
        .arg(&c.members[1].client)
        .arg(out_dir.path())
        .output()
        .expect("python runs");
    assert!(
        run.status.success(),
        "the Python client failed:\n{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
}

fn flotilla(server: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(args)
        .env("FLOTILLA_SERVER", server)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("flotilla runs");
    if let Some(input) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    child.wait_with_output().unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn success(out: Output) -> String {
    assert!(
        out.status.success(),
        "flotilla failed: {}{}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

const MANIFEST: &str = r#"
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
  labels: {app: web}
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  strategy:
    rollingUpdate: {maxSurge: 1, maxUnavailable: 0}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        command: ["python3", "-m", "http.server", "8080"]
        ports: [{containerPort: 8080}]
        resources:
          requests: {cpu: 100m, memory: 64Mi}
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  selector: {app: web}
  ports:
  - port: 80
    targetPort: 8080
"#;

#[test]
fn the_cli_applies_gets_scales_and_deletes() {
    let c = Cluster::start();
    let server = c.endpoints();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), MANIFEST).unwrap();
    let path = file.path().to_str().unwrap();

    let first = success(flotilla(&server, &["apply", "-f", path], None));
    assert_eq!(
        first,
        "namespace/shop created\ndeployment.apps/web created\nservice/web created\n"
    );
    // The same file again (here through stdin) changes nothing.
    let rv = |kind: &str| {
        let out = success(flotilla(
            &server,
            &["get", kind, "web", "-n", "shop", "-o", "json"],
            None,
        ));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let before = rv("deployment");
    let service_before = rv("service");
    let second = success(flotilla(&server, &["apply", "-f", "-"], Some(MANIFEST)));
    assert_eq!(
        second,
        "namespace/shop unchanged\ndeployment.apps/web unchanged\nservice/web unchanged\n"
    );
    // Nothing wrote the service; the deployment's status is the controllers' to write, but
    // no write since `before` is the apply's: none leaves spec, metadata and status as they
    // were.
    assert_eq!(rv("service"), service_before);
    assert_no_empty_writes(&c, &before);

    // Every get form.
    let table = success(flotilla(
        &server,
        &["get", "deployments", "-n", "shop"],
        None,
    ));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    assert!(
        lines[0].starts_with("NAME   READY   UP-TO-DATE   AVAILABLE   AGE"),
        "{table}"
    );
    // No agent runs the pods: none ready or available; UP-TO-DATE is the controller's
    // progress so far.
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(row[..2], ["web", "0/2"], "{table}");
    assert!(["0", "1", "2"].contains(&row[2]), "{table}");
    assert_eq!(row[3], "0", "{table}");
    assert_eq!(lines[1].find("0/2"), lines[0].find("READY"), "{table}");
    let wide = success(flotilla(
        &server,
        &["get", "deploy", "-n", "shop", "-o", "wide"],
        None,
    ));
    assert!(
        wide.contains("SELECTOR") && wide.contains("app=web"),
        "{wide}"
    );
    let yaml = success(flotilla(
        &server,
        &["get", "deploy", "web", "-n", "shop", "-o", "yaml"],
        None,
    ));
    assert!(
        yaml.contains("kind: Deployment") && yaml.contains("maxSurge: 1"),
        "{yaml}"
    );
    let all = success(flotilla(&server, &["get", "svc", "-A", "-o", "json"], None));
    let v: serde_json::Value = serde_json::from_str(&all).unwrap();
    assert_eq!(v["kind"], "List");
    assert_eq!(v["items"][0]["metadata"]["name"], "web");
    assert!(
        v["items"][0]["spec"]["clusterIP"]
            .as_str()
            .unwrap()
            .starts_with("10.")
    );
    let labeled = success(flotilla(
        &server,
        &["get", "deploy", "-A", "-l", "app=web", "-o", "name"],
        None,
    ));
    assert_eq!(labeled, "deployment.apps/web\n");
    let none = flotilla(
        &server,
        &["get", "deploy", "-n", "shop", "-l", "app=db"],
        None,
    );
    assert!(none.status.success());
    assert_eq!(stderr(&none), "No resources found in shop namespace.\n");

    // Scale is a merge patch; the deployment's generation moves on.
    assert_eq!(
        success(flotilla(
            &server,
            &[
                "scale",
                "deployment",
                "web",
                "-n",
                "shop",
                "--replicas",
                "5"
            ],
            None
        )),
        "deployment.apps/web scaled\n"
    );
    let scaled = rv("deployment");
    let spec_of = || {
        let out = success(flotilla(
            &server,
            &["get", "deployment", "web", "-n", "shop", "-o", "json"],
            None,
        ));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        (v["spec"].clone(), v["metadata"]["generation"].clone())
    };
    let scaled_spec = spec_of();
    let desc = success(flotilla(
        &server,
        &["describe", "deployment", "web", "-n", "shop"],
        None,
    ));
    assert!(
        desc.contains("replicas: 5") && desc.contains("Events:"),
        "{desc}"
    );

    // Errors a script can rely on: exit 1 and kubectl's wording.
    let missing = flotilla(&server, &["get", "pod", "nope"], None);
    assert_eq!(missing.status.code(), Some(1));
    assert_eq!(
        stderr(&missing),
        "Error from server (NotFound): pods \"nope\" not found\n"
    );
    let bad = flotilla(
        &server,
        &["apply", "-f", "-"],
        Some(&MANIFEST.replace("replicas: 2", "replicas: -2")),
    );
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        stderr(&bad).contains("spec.replicas: must be >= 0"),
        "{}",
        stderr(&bad)
    );
    let unknown = flotilla(
        &server,
        &["apply", "-f", "-"],
        Some(&MANIFEST.replace("containerPort", "containerPorts")),
    );
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        stderr(&unknown).contains(
            "document 2: spec.template.spec.containers[0].ports[0].containerPorts: unknown field"
        ),
        "{}",
        stderr(&unknown)
    );
    // Nothing of the bad files was written (the controllers may have written the status).
    assert_ne!(scaled, before);
    assert_eq!(spec_of(), scaled_spec);

    assert_eq!(
        success(flotilla(&server, &["delete", "-f", path], None)),
        "service \"web\" deleted\ndeployment.apps \"web\" deleted\nnamespace \"shop\" deleted\n"
    );
    let gone = flotilla(&server, &["get", "deployment", "web", "-n", "shop"], None);
    assert_eq!(gone.status.code(), Some(1));
}

/// Every change to deployment shop/web after revision `since` changed something.
fn assert_no_empty_writes(c: &Cluster, since: &str) {
    use flotilla_client::Client;
    use flotilla_proto::api::{Deployment, WatchRequest};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = Client::new(&[c.members[0].client.clone()]).unwrap();
        let now = client.get::<Deployment>("shop", "web").await.unwrap();
        let now_rv: i64 = now
            .metadata
            .as_ref()
            .unwrap()
            .resource_version
            .parse()
            .unwrap();
        let since: i64 = since.parse().unwrap();
        if now_rv == since {
            return;
        }
        // The object as it was at `since`, then every change after it.
        let mut stream = client
            .watch_once::<Deployment>(&WatchRequest {
                namespace: "shop".into(),
                field_selector: "metadata.name=web".into(),
                resource_version: (since - 1).to_string(),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut previous: Option<Deployment> = None;
        loop {
            let event = stream.message().await.unwrap().expect("the watch goes on");
            let mut object = event.object.unwrap();
            let rv: i64 = object
                .metadata
                .as_ref()
                .unwrap()
                .resource_version
                .parse()
                .unwrap();
            object.metadata.as_mut().unwrap().resource_version.clear();
            if let Some(p) = &previous {
                assert!(
                    rv <= since || *p != object,
                    "an empty write at revision {rv}"
                );
                assert_eq!(p.spec, object.spec, "the spec changed at revision {rv}");
            }
            previous = Some(object);
            if rv >= now_rv {
                break;
            }
        }
    });
}

#[test]
fn configuration_and_secrets_apply_list_and_describe_without_showing_secret_values() {
    let c = Cluster::start();
    let server = c.endpoints();
    let manifest = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: app}
data:
  app.properties: "color=blue"
binaryData:
  logo.png: iVBORw0K
---
apiVersion: v1
kind: Secret
metadata: {name: db}
type: kubernetes.io/basic-auth
stringData:
  username: admin
  password: hunter2-not-shown
"#;
    assert_eq!(
        success(flotilla(&server, &["apply", "-f", "-"], Some(manifest))),
        "configmap/app created\nsecret/db created\n"
    );
    let cms = success(flotilla(&server, &["get", "cm"], None));
    assert!(
        cms.starts_with("NAME   DATA   AGE\napp    2      "),
        "{cms}"
    );
    let secrets = success(flotilla(&server, &["get", "secrets"], None));
    assert!(
        secrets.starts_with("NAME   TYPE                       DATA   AGE\ndb     kubernetes.io/basic-auth   2      "),
        "{secrets}"
    );
    // Stored as data, base64 in YAML as Kubernetes prints it.
    let yaml = success(flotilla(
        &server,
        &["get", "secret", "db", "-o", "yaml"],
        None,
    ));
    assert!(
        yaml.contains("password: aHVudGVyMi1ub3Qtc2hvd24="),
        "{yaml}"
    );
    // describe gives sizes, never values.
    let described = success(flotilla(&server, &["describe", "secret", "db"], None));
    assert!(described.contains("password:  17 bytes"), "{described}");
    assert!(described.contains("username:  5 bytes"), "{described}");
    assert!(!described.contains("hunter2"), "{described}");
    assert!(!described.contains("aHVudGVy"), "{described}");
    let described = success(flotilla(&server, &["describe", "configmap", "app"], None));
    assert!(
        described.contains("app.properties:\n----\ncolor=blue"),
        "{described}"
    );
    assert!(
        described.contains("logo.png: 6 bytes (binary)"),
        "{described}"
    );
    // The type's rules hold through the CLI, by field.
    let bad = flotilla(
        &server,
        &["apply", "-f", "-"],
        Some("apiVersion: v1\nkind: Secret\nmetadata: {name: t}\ntype: kubernetes.io/tls\n"),
    );
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        stderr(&bad).contains("data[tls.crt]: Required value"),
        "{}",
        stderr(&bad)
    );
}

/// An EncryptionConfiguration for secrets with `keys` (name, base64 secret) in order, then
/// the identity provider when `identity`.
fn encryption_config(dir: &Path, file: &str, keys: &[(&str, &str)], identity: bool) -> String {
    let mut text = "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\n\
                    resources:\n- resources: [secrets]\n  providers:\n  - aesgcm:\n      keys:\n"
        .to_string();
    for (name, secret) in keys {
        text.push_str(&format!("      - name: {name}\n        secret: {secret}\n"));
    }
    if identity {
        text.push_str("  - identity: {}\n");
    }
    let path = dir.join(file);
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

/// The raw value of `key` in the store, through etcdctl.
fn raw(endpoints: &str, key: &str) -> Vec<u8> {
    let out = etcdctl(endpoints, &["get", key, "--print-value-only"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn secrets_are_encrypted_at_rest_and_their_keys_rotate_member_by_member() {
    const KEY1: &str = "c2VjcmV0IGlzIHNlY3VyZSwgMzIgYnl0ZXMgbG9uZyE=";
    const KEY2: &str = "MTYgYnl0ZSBrZXkhISEhIQ==";
    let files = tempfile::tempdir().unwrap();
    let first = encryption_config(files.path(), "1.yaml", &[("key1", KEY1)], true);
    let mut c = Cluster::start_with(&["--encryption-provider-config", &first]);
    let server = c.endpoints();
    let manifest = "apiVersion: v1\nkind: Secret\nmetadata: {name: db}\n\
                    stringData: {password: hunter2-at-rest}\n";
    success(flotilla(&server, &["apply", "-f", "-"], Some(manifest)));
    let key = "/registry/secrets/default/db";
    let stored = raw(&server, key);
    assert!(stored.starts_with(b"k8s:enc:aesgcm:v1:key1:"), "{stored:?}");
    assert!(!stored.windows(7).any(|w| w == b"hunter2"));
    let yaml = success(flotilla(
        &server,
        &["get", "secret", "db", "-o", "yaml"],
        None,
    ));
    assert!(yaml.contains("password: aHVudGVyMi1hdC1yZXN0"), "{yaml}");

    // Rotation, as docs/security.md gives it: the new key first, the old one still listed,
    // on every member in turn; every Secret rewritten; then the old key dropped.
    let restart_all = |c: &mut Cluster, config: &str| {
        let initial = c.initial.clone();
        for i in 0..c.members.len() {
            c.members[i].kill9();
            c.members[i].extra = vec!["--encryption-provider-config".into(), config.into()];
            c.members[i].start(&initial);
            let ep = c.members[i].client.clone();
            c.wait_healthy(&ep);
        }
    };
    let second = encryption_config(
        files.path(),
        "2.yaml",
        &[("key2", KEY2), ("key1", KEY1)],
        true,
    );
    restart_all(&mut c, &second);
    let yaml = success(flotilla(&server, &["get", "secrets", "-o", "yaml"], None));
    assert!(yaml.contains("password: aHVudGVyMi1hdC1yZXN0"), "{yaml}");
    assert_eq!(
        success(flotilla(&server, &["replace", "-f", "-"], Some(&yaml))),
        "secret/db replaced\n"
    );
    assert!(raw(&server, key).starts_with(b"k8s:enc:aesgcm:v1:key2:"));
    let third = encryption_config(files.path(), "3.yaml", &[("key2", KEY2)], false);
    restart_all(&mut c, &third);
    let yaml = success(flotilla(
        &server,
        &["get", "secret", "db", "-o", "yaml"],
        None,
    ));
    assert!(yaml.contains("password: aHVudGVyMi1hdC1yZXN0"), "{yaml}");

    // A member given a bad file refuses to start, saying where the file is wrong.
    let bad = files.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n\
         - resources: [secrets]\n  providers:\n  - aesgcm:\n      keys:\n      - name: k\n        secret: c2hvcnQ=\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["server", "--name", "x", "--data-dir"])
        .arg(files.path().join("x"))
        .args(["--client-addr", &format!("127.0.0.1:{}", free_port())])
        .args(["--peer-addr", &format!("127.0.0.1:{}", free_port())])
        .arg("--encryption-provider-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--encryption-provider-config: ")
            && err.contains("resources[0].providers[0].aesgcm.keys[0].secret: 5 bytes"),
        "{err}"
    );
}
