//! `flotilla certs`: the CA, the three kinds of certificate read back field by field and
//! verified as rustls (webpki) will verify them, kubeconfigs read by the real kubectl, and
//! mutual-TLS handshakes over loopback with the certificates the binary made: rustls on both
//! sides, and Go's TLS (kubectl) against a rustls server.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer as _, X509Certificate};

const DEADLINE: Duration = Duration::from_secs(30);

fn flotilla(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(args)
        .output()
        .expect("running flotilla")
}

/// Runs `flotilla ARGS`, which must succeed; its stdout.
fn ok(args: &[&str]) -> String {
    let out = flotilla(args);
    assert!(
        out.status.success(),
        "flotilla {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Runs `flotilla ARGS`, which must fail with exit code 1; its stderr.
fn refused(args: &[&str]) -> String {
    let out = flotilla(args);
    assert_eq!(
        out.status.code(),
        Some(1),
        "flotilla {args:?} should have been refused: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stderr).expect("utf-8 output")
}

/// A temporary directory with a CA made by `certs init`: (the temp dir, DIR).
fn pki() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("pki");
    ok(&["certs", "init", "--dir", s(&dir)]);
    (tmp, dir)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn issue(dir: &Path, name: &str, kind: &str, extra: &[&str]) {
    let mut args = vec![
        "certs",
        "issue",
        "--dir",
        s(dir),
        "--name",
        name,
        "--kind",
        kind,
    ];
    args.extend_from_slice(extra);
    ok(&args);
}

fn der(dir: &Path, name: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(dir.join(format!("{name}.crt"))).expect("a PEM certificate")
}

fn key(dir: &Path, name: &str) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_file(dir.join(format!("{name}.key"))).expect("a PEM private key")
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

/// What a certificate says about its holder: CN, O fields, SANs, EKUs, CA flag.
#[derive(Debug, Default)]
struct Fields {
    cn: Vec<String>,
    o: Vec<String>,
    ips: Vec<IpAddr>,
    dns: Vec<String>,
    server_auth: bool,
    client_auth: bool,
    is_ca: bool,
}

fn fields(der: &CertificateDer<'_>) -> Fields {
    let (_, cert) = X509Certificate::from_der(der).expect("an X.509 certificate");
    let attr = |it: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue>| {
        it.map(|a| a.as_str().expect("a string").to_string())
            .collect()
    };
    let mut f = Fields {
        cn: attr(&mut cert.subject().iter_common_name()),
        o: attr(&mut cert.subject().iter_organization()),
        ..Fields::default()
    };
    if let Some(san) = cert.subject_alternative_name().expect("SAN parses") {
        for name in &san.value.general_names {
            match name {
                GeneralName::IPAddress(b) if b.len() == 4 => f
                    .ips
                    .push(IpAddr::from(<[u8; 4]>::try_from(*b).expect("4 bytes"))),
                GeneralName::IPAddress(b) => f
                    .ips
                    .push(IpAddr::from(<[u8; 16]>::try_from(*b).expect("16 bytes"))),
                GeneralName::DNSName(n) => f.dns.push(n.to_string()),
                other => panic!("unexpected SAN {other:?}"),
            }
        }
    }
    if let Some(eku) = cert.extended_key_usage().expect("EKU parses") {
        f.server_auth = eku.value.server_auth;
        f.client_auth = eku.value.client_auth;
    }
    f.is_ca = cert
        .basic_constraints()
        .expect("basic constraints parse")
        .is_some_and(|bc| bc.value.ca);
    f
}

/// The certificate's signature checks against DIR/ca.crt's key.
fn signed_by_ca(dir: &Path, leaf: &CertificateDer<'_>) -> bool {
    let ca_der = der(dir, "ca");
    let (_, ca) = X509Certificate::from_der(&ca_der).expect("ca.crt");
    let (_, cert) = X509Certificate::from_der(leaf).expect("leaf");
    cert.verify_signature(Some(ca.public_key())).is_ok()
}

fn roots(dir: &Path) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    roots.add(der(dir, "ca")).expect("ca.crt is a trust anchor");
    Arc::new(roots)
}

/// Would a rustls client trusting DIR's CA accept `name`'s certificate from server `host`?
fn server_verifies(dir: &Path, name: &str, host: &str) -> Result<(), rustls::Error> {
    let verifier = WebPkiServerVerifier::builder(roots(dir))
        .build()
        .expect("a verifier");
    let server_name = ServerName::try_from(host.to_string()).expect("a server name");
    verifier
        .verify_server_cert(&der(dir, name), &[], &server_name, &[], UnixTime::now())
        .map(|_| ())
}

/// Would a rustls server requiring certificates from DIR's CA accept `name`'s as a client?
fn client_verifies(dir: &Path, name: &str) -> Result<(), rustls::Error> {
    let verifier = WebPkiClientVerifier::builder(roots(dir))
        .build()
        .expect("a verifier");
    verifier
        .verify_client_cert(&der(dir, name), &[], UnixTime::now())
        .map(|_| ())
}

#[test]
fn init_makes_a_ca_and_refuses_to_overwrite_it() {
    let (_tmp, dir) = pki();
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
    assert_eq!(mode(&dir), 0o700);
    let ca = der(&dir, "ca");
    let f = fields(&ca);
    assert_eq!(f.cn, ["flotilla-ca"]);
    assert!(f.is_ca);
    let (_, cert) = X509Certificate::from_der(&ca).expect("ca.crt");
    let usage = cert
        .key_usage()
        .expect("key usage")
        .expect("a key usage")
        .value;
    assert!(usage.key_cert_sign() && usage.crl_sign());
    // Self-signed, valid for ten years.
    assert!(cert.verify_signature(None).is_ok());
    let days = cert
        .validity()
        .time_to_expiration()
        .expect("valid")
        .whole_days();
    assert!((3649..=3650).contains(&days), "{days} days");

    let before = std::fs::read(dir.join("ca.key")).expect("ca.key");
    let err = refused(&["certs", "init", "--dir", s(&dir)]);
    assert!(
        err.contains("ca.crt exists") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(std::fs::read(dir.join("ca.key")).expect("ca.key"), before);

    ok(&["certs", "init", "--dir", s(&dir), "--force", "--days", "30"]);
    assert_ne!(std::fs::read(dir.join("ca.key")).expect("ca.key"), before);
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
    // No temporary file left behind.
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["ca.crt", "ca.key"]);
}

#[test]
fn issue_refuses_without_a_ca() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("empty");
    let err = refused(&[
        "certs",
        "issue",
        "--dir",
        s(&dir),
        "--name",
        "m1",
        "--kind",
        "member",
    ]);
    assert!(
        err.contains("no CA in") && err.contains(&format!("flotilla certs init --dir {}", s(&dir))),
        "{err}"
    );
    assert!(!dir.exists(), "a refused issue creates nothing");
}

#[test]
fn member_certificate_serves_and_peers_on_its_addresses() {
    let (_tmp, dir) = pki();
    issue(
        &dir,
        "m1",
        "member",
        &["--ip", "10.1.2.3", "--ip", "::1", "--dns", "m1.example"],
    );
    assert_eq!(mode(&dir.join("m1.key")), 0o600);
    assert_eq!(mode(&dir.join("m1.crt")), 0o644);
    let cert = der(&dir, "m1");
    let f = fields(&cert);
    assert_eq!(f.cn, ["m1"]);
    assert!(f.o.is_empty(), "{:?}", f.o);
    assert_eq!(
        f.ips,
        [
            "10.1.2.3".parse::<IpAddr>().unwrap(),
            "::1".parse().unwrap()
        ]
    );
    assert_eq!(f.dns, ["m1.example"]);
    assert!(f.server_auth && f.client_auth && !f.is_ca);
    assert!(signed_by_ca(&dir, &cert));
    for host in ["10.1.2.3", "::1", "m1.example"] {
        server_verifies(&dir, "m1", host).unwrap_or_else(|e| panic!("{host}: {e}"));
    }
    assert!(
        server_verifies(&dir, "m1", "127.0.0.1").is_err(),
        "not one of its SANs"
    );
    assert!(server_verifies(&dir, "m1", "other.example").is_err());
    client_verifies(&dir, "m1").expect("a member is a client of its peers");
}

#[test]
fn member_certificate_without_addresses_serves_loopback() {
    let (_tmp, dir) = pki();
    issue(&dir, "m2", "member", &[]);
    let f = fields(&der(&dir, "m2"));
    assert_eq!(f.ips, ["127.0.0.1".parse::<IpAddr>().unwrap()]);
    assert_eq!(f.dns, ["localhost"]);
    server_verifies(&dir, "m2", "127.0.0.1").expect("127.0.0.1");
    server_verifies(&dir, "m2", "localhost").expect("localhost");
}

#[test]
fn agent_certificate_is_user_system_node_in_group_system_nodes() {
    let (_tmp, dir) = pki();
    issue(
        &dir,
        "worker-1",
        "agent",
        &["--ip", "192.0.2.7", "--days", "10"],
    );
    assert_eq!(mode(&dir.join("worker-1.key")), 0o600);
    let cert = der(&dir, "worker-1");
    let f = fields(&cert);
    assert_eq!(f.cn, ["system:node:worker-1"]);
    assert_eq!(f.o, ["system:nodes"]);
    assert_eq!(f.ips, ["192.0.2.7".parse::<IpAddr>().unwrap()]);
    assert!(f.server_auth && f.client_auth && !f.is_ca);
    assert!(signed_by_ca(&dir, &cert));
    let (_, x) = X509Certificate::from_der(&cert).expect("cert");
    let days = x
        .validity()
        .time_to_expiration()
        .expect("valid")
        .whole_days();
    assert!((9..=10).contains(&days), "{days} days");
    client_verifies(&dir, "worker-1").expect("an agent is a client of the members");
    server_verifies(&dir, "worker-1", "192.0.2.7").expect("an agent serves its own port");

    let err = refused(&[
        "certs",
        "issue",
        "--dir",
        s(&dir),
        "--name",
        "w2",
        "--kind",
        "agent",
        "--group",
        "system:masters",
    ]);
    assert!(err.contains("--group is not for --kind agent"), "{err}");
    let err = refused(&[
        "certs",
        "issue",
        "--dir",
        s(&dir),
        "--name",
        "W_2",
        "--kind",
        "agent",
    ]);
    assert!(err.contains("node's name"), "{err}");
}

#[test]
fn user_certificate_is_a_client_certificate_with_its_groups() {
    let (_tmp, dir) = pki();
    issue(
        &dir,
        "alice",
        "user",
        &["--group", "system:masters", "--group", "devs"],
    );
    assert_eq!(mode(&dir.join("alice.key")), 0o600);
    let cert = der(&dir, "alice");
    let f = fields(&cert);
    assert_eq!(f.cn, ["alice"]);
    assert_eq!(f.o, ["system:masters", "devs"]);
    assert!(f.ips.is_empty() && f.dns.is_empty());
    assert!(f.client_auth && !f.server_auth && !f.is_ca);
    assert!(signed_by_ca(&dir, &cert));
    client_verifies(&dir, "alice").expect("a user is a client");
    assert!(
        server_verifies(&dir, "alice", "127.0.0.1").is_err(),
        "no serverAuth"
    );

    let err = refused(&[
        "certs",
        "issue",
        "--dir",
        s(&dir),
        "--name",
        "bob",
        "--kind",
        "user",
        "--ip",
        "127.0.0.1",
    ]);
    assert!(
        err.contains("--ip and --dns are for --kind member and agent"),
        "{err}"
    );
}

#[test]
fn issue_refuses_to_overwrite_without_force_and_bad_names() {
    let (_tmp, dir) = pki();
    issue(&dir, "alice", "user", &[]);
    let before = std::fs::read(dir.join("alice.key")).expect("alice.key");
    let err = refused(&[
        "certs",
        "issue",
        "--dir",
        s(&dir),
        "--name",
        "alice",
        "--kind",
        "user",
    ]);
    assert!(err.contains("alice.crt exists; pass --force"), "{err}");
    assert_eq!(
        std::fs::read(dir.join("alice.key")).expect("alice.key"),
        before
    );

    issue(&dir, "alice", "user", &["--group", "devs", "--force"]);
    assert_ne!(
        std::fs::read(dir.join("alice.key")).expect("alice.key"),
        before
    );
    assert_eq!(mode(&dir.join("alice.key")), 0o600);
    assert_eq!(fields(&der(&dir, "alice")).o, ["devs"]);

    for name in ["../escape", "a/b", "ca", ".hidden", ""] {
        let err = refused(&[
            "certs",
            "issue",
            "--dir",
            s(&dir),
            "--name",
            name,
            "--kind",
            "user",
        ]);
        assert!(err.contains("--name"), "{name}: {err}");
    }
    assert!(!dir.parent().expect("parent").join("escape.crt").exists());
    let err = refused(&[
        "certs",
        "issue",
        "--dir",
        s(&dir),
        "--name",
        "x",
        "--kind",
        "user",
        "--days",
        "0",
    ]);
    assert!(err.contains("--days"), "{err}");
    // The CA was made for ten years: a leaf may not outlive it.
    let err = refused(&[
        "certs",
        "issue",
        "--dir",
        s(&dir),
        "--name",
        "x",
        "--kind",
        "user",
        "--days",
        "4000",
    ]);
    assert!(err.contains("outlive the CA"), "{err}");
    let out = flotilla(&[
        "certs",
        "issue",
        "--dir",
        s(&dir),
        "--name",
        "x",
        "--kind",
        "admin",
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a bad --kind is a bad command line"
    );
}

/// The kubeconfig `certs kubeconfig` prints, written to TMP/NAME.kubeconfig.
fn kubeconfig(tmp: &Path, dir: &Path, user: &str, servers: &str) -> PathBuf {
    let text = ok(&[
        "certs",
        "kubeconfig",
        "--dir",
        s(dir),
        "--user",
        user,
        "--server",
        servers,
    ]);
    let path = tmp.join(format!("{user}.kubeconfig"));
    std::fs::write(&path, text).expect("writing the kubeconfig");
    path
}

fn kubectl_present() -> bool {
    let present = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !present {
        eprintln!("kubectl is not installed: skipping the kubectl checks");
    }
    present
}

/// `kubectl ARGS` with only the given kubeconfig, and a HOME of its own.
fn kubectl(home: &Path, config: &Path, args: &[&str]) -> Output {
    Command::new("kubectl")
        .args(args)
        .arg("--kubeconfig")
        .arg(config)
        .env_remove("KUBECONFIG")
        .env("HOME", home)
        .output()
        .expect("running kubectl")
}

fn kubectl_ok(home: &Path, config: &Path, args: &[&str]) -> String {
    let out = kubectl(home, config, args);
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

#[test]
fn kubeconfig_is_read_by_kubectl() {
    use base64::Engine as _;
    let (tmp, dir) = pki();
    issue(&dir, "admin", "user", &["--group", "system:masters"]);
    let config = kubeconfig(tmp.path(), &dir, "admin", "127.0.0.1:7379,127.0.0.1:7381");

    // Our own reading of it first: the fields Kubernetes defines, with the files' contents.
    let text = std::fs::read_to_string(&config).expect("kubeconfig");
    let v: serde_json::Value = serde_norway::from_str(&text).expect("YAML");
    let b64 = |s: &serde_json::Value| {
        base64::engine::general_purpose::STANDARD
            .decode(s.as_str().expect("a string"))
            .expect("base64")
    };
    let read = |name: &str| std::fs::read(dir.join(name)).expect("file");
    assert_eq!(v["apiVersion"], "v1");
    assert_eq!(v["kind"], "Config");
    assert_eq!(v["current-context"], "admin@flotilla");
    let cluster = &v["clusters"][0];
    assert_eq!(cluster["name"], "flotilla");
    assert_eq!(cluster["cluster"]["server"], "https://127.0.0.1:7379");
    assert_eq!(
        b64(&cluster["cluster"]["certificate-authority-data"]),
        read("ca.crt")
    );
    let ext = &cluster["cluster"]["extensions"][0];
    assert_eq!(ext["name"], "flotilla.io/servers");
    assert_eq!(
        ext["extension"]["servers"],
        serde_json::json!(["https://127.0.0.1:7379", "https://127.0.0.1:7381"])
    );
    assert_eq!(v["users"][0]["name"], "admin");
    assert_eq!(
        b64(&v["users"][0]["user"]["client-certificate-data"]),
        read("admin.crt")
    );
    assert_eq!(
        b64(&v["users"][0]["user"]["client-key-data"]),
        read("admin.key")
    );
    assert_eq!(v["contexts"][0]["context"]["cluster"], "flotilla");
    assert_eq!(v["contexts"][0]["context"]["user"], "admin");

    if !kubectl_present() {
        return;
    }
    // Then kubectl's: it loads it, keeps our extension, and picks our context.
    let home = tmp.path();
    let view = kubectl_ok(home, &config, &["config", "view", "--raw", "-o", "json"]);
    let k: serde_json::Value = serde_json::from_str(&view).expect("kubectl's JSON");
    assert_eq!(k["current-context"], "admin@flotilla");
    assert_eq!(
        k["clusters"][0]["cluster"]["server"],
        "https://127.0.0.1:7379"
    );
    assert_eq!(
        k["clusters"][0]["cluster"]["certificate-authority-data"],
        cluster["cluster"]["certificate-authority-data"]
    );
    assert_eq!(
        k["clusters"][0]["cluster"]["extensions"][0]["extension"]["servers"],
        ext["extension"]["servers"]
    );
    assert_eq!(
        k["users"][0]["user"]["client-key-data"],
        v["users"][0]["user"]["client-key-data"]
    );
    let contexts = kubectl_ok(home, &config, &["config", "get-contexts"]);
    let current = contexts
        .lines()
        .find(|l| l.trim_start().starts_with('*'))
        .unwrap_or_else(|| panic!("no current context in:\n{contexts}"));
    let cols: Vec<&str> = current.split_whitespace().collect();
    assert_eq!(
        cols,
        ["*", "admin@flotilla", "flotilla", "admin"],
        "{contexts}"
    );
}

#[test]
fn kubeconfig_refuses_what_it_cannot_vouch_for() {
    let (tmp, dir) = pki();
    let err = refused(&[
        "certs",
        "kubeconfig",
        "--dir",
        s(&dir),
        "--user",
        "nobody",
        "--server",
        "127.0.0.1:1",
    ]);
    assert!(
        err.contains("nobody.crt is missing") && err.contains("certs issue"),
        "{err}"
    );

    // A certificate from another CA, copied in.
    let other = tmp.path().join("other");
    ok(&["certs", "init", "--dir", s(&other)]);
    issue(&other, "mallory", "user", &[]);
    for ext in ["crt", "key"] {
        std::fs::copy(
            other.join(format!("mallory.{ext}")),
            dir.join(format!("mallory.{ext}")),
        )
        .expect("copy");
    }
    let err = refused(&[
        "certs",
        "kubeconfig",
        "--dir",
        s(&dir),
        "--user",
        "mallory",
        "--server",
        "127.0.0.1:1",
    ]);
    assert!(
        err.contains("not issued by this directory's ca.crt"),
        "{err}"
    );

    issue(&dir, "alice", "user", &[]);
    let err = refused(&[
        "certs",
        "kubeconfig",
        "--dir",
        s(&dir),
        "--user",
        "alice",
        "--server",
        "http://a:1",
    ]);
    assert!(err.contains("speak TLS"), "{err}");
}

fn server_config(dir: &Path, name: &str) -> Arc<ServerConfig> {
    let verifier = WebPkiClientVerifier::builder(roots(dir))
        .build()
        .expect("a client verifier");
    let config = ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![der(dir, name)], key(dir, name))
        .expect("the certificate and key go together");
    Arc::new(config)
}

fn client_config(ca_dir: &Path, dir: &Path, name: &str) -> Arc<ClientConfig> {
    let config = ClientConfig::builder()
        .with_root_certificates(roots(ca_dir))
        .with_client_auth_cert(vec![der(dir, name)], key(dir, name))
        .expect("the certificate and key go together");
    Arc::new(config)
}

/// What a TLS server on loopback saw of one connection: the CN and O of the client's
/// certificate and the request line, or the handshake's error.
type Seen = Result<(Fields, String), String>;

/// A TLS server on loopback: answers every HTTP request with `{}`, and reports each
/// connection (until the test ends).
async fn serve(config: Arc<ServerConfig>) -> (u16, tokio::sync::mpsc::UnboundedReceiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _ = tx.send(answer(acceptor, tcp).await);
            });
        }
    });
    (port, rx)
}

async fn answer(acceptor: tokio_rustls::TlsAcceptor, tcp: TcpStream) -> Seen {
    let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
    let peer = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first().cloned())
        .ok_or("no client certificate")?;
    let mut buf = vec![0u8; 4096];
    let mut request = Vec::new();
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match tls.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let request_line = String::from_utf8_lossy(&request)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    if !request.is_empty() {
        let body = "{}";
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        );
        tls.write_all(response.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        tls.shutdown().await.map_err(|e| e.to_string())?;
    }
    Ok((fields(&peer), request_line))
}

/// The next connection the server saw.
async fn seen(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Seen>) -> Seen {
    tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .expect("a connection in time")
        .expect("the server runs")
}

/// Connects to 127.0.0.1:PORT as `name` of DIR, sends an HTTP request, reads the answer.
async fn call(port: u16, config: Arc<ClientConfig>) -> Result<String, String> {
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let server_name = ServerName::try_from("127.0.0.1").expect("a server name");
    let mut tls = connector
        .connect(server_name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    tls.read_to_string(&mut answer)
        .await
        .map_err(|e| e.to_string())?;
    Ok(answer)
}

#[tokio::test]
async fn member_and_user_certificates_complete_mutual_tls() {
    let (_tmp, dir) = pki();
    issue(&dir, "m1", "member", &[]);
    issue(&dir, "m2", "member", &[]);
    issue(
        &dir,
        "admin",
        "user",
        &["--group", "system:masters", "--group", "ops"],
    );

    // The client port: a member serves, a user presents a client certificate.
    let (port, mut server) = serve(server_config(&dir, "m1")).await;
    let client = client_config(&dir, &dir, "admin");
    let answer = tokio::time::timeout(DEADLINE, call(port, client))
        .await
        .expect("in time")
        .expect("the handshake and the request succeed");
    assert!(answer.ends_with("{}"), "{answer}");
    let (peer, request) = seen(&mut server).await.expect("the server's handshake");
    assert_eq!(peer.cn, ["admin"]);
    assert_eq!(peer.o, ["system:masters", "ops"]);
    assert_eq!(request, "GET / HTTP/1.1");

    // The peer port: a member is the client of another.
    let client = client_config(&dir, &dir, "m2");
    tokio::time::timeout(DEADLINE, call(port, client))
        .await
        .expect("in time")
        .expect("member to member");
    let (peer, _) = seen(&mut server).await.expect("the server's handshake");
    assert_eq!(peer.cn, ["m2"]);
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let (tmp, dir) = pki();
    issue(&dir, "m1", "member", &[]);
    let other = tmp.path().join("other");
    ok(&["certs", "init", "--dir", s(&other)]);
    issue(&other, "mallory", "user", &["--group", "system:masters"]);
    issue(&other, "m9", "member", &[]);

    // A client with a foreign certificate: the server refuses the handshake.
    let (port, mut server) = serve(server_config(&dir, "m1")).await;
    let client = client_config(&dir, &other, "mallory");
    let answer = tokio::time::timeout(DEADLINE, call(port, client))
        .await
        .expect("in time");
    assert!(answer.is_err(), "the client was answered: {answer:?}");
    let err = seen(&mut server).await.expect_err("the server refuses");
    // Every Flotilla CA is CN=flotilla-ca: webpki finds the name and the signature fails.
    assert!(
        err.contains("invalid peer certificate: BadSignature"),
        "{err}"
    );

    // A server with a foreign certificate: the client refuses it.
    let (port, _server) = serve(server_config(&other, "m9")).await;
    let client = client_config(&dir, &dir, "m1");
    let err = tokio::time::timeout(DEADLINE, call(port, client))
        .await
        .expect("in time")
        .expect_err("the client refuses");
    assert!(
        err.contains("invalid peer certificate: BadSignature"),
        "{err}"
    );
}

/// Go's TLS stack (kubectl's) takes the kubeconfig's CA, certificate and ECDSA key, trusts a
/// member's certificate, and presents the user's: what etcdctl will do in a later step.
#[tokio::test]
async fn kubectl_completes_mutual_tls_with_a_member() {
    if !kubectl_present() {
        return;
    }
    let (tmp, dir) = pki();
    issue(&dir, "m1", "member", &[]);
    issue(&dir, "admin", "user", &["--group", "system:masters"]);
    let (port, mut server) = serve(server_config(&dir, "m1")).await;
    let config = kubeconfig(tmp.path(), &dir, "admin", &format!("127.0.0.1:{port}"));
    let home = tmp.path().to_path_buf();
    let args = ["get", "--raw", "/healthz", "--request-timeout", "20s"];
    let out = tokio::time::timeout(
        DEADLINE,
        tokio::task::spawn_blocking(move || kubectl(&home, &config, &args)),
    )
    .await
    .expect("in time")
    .expect("kubectl ran");
    assert!(
        out.status.success(),
        "kubectl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "{}");
    // kubectl asks for /version first, then for what it was told to get; each time as admin.
    let mut requests = Vec::new();
    while !requests
        .iter()
        .any(|r: &String| r.starts_with("GET /healthz"))
    {
        let next = tokio::time::timeout(DEADLINE, server.recv()).await;
        let Ok(Some(seen)) = next else {
            panic!("no request for /healthz; requests: {requests:?}");
        };
        let (peer, request) = seen.expect("the server's handshake");
        assert_eq!(peer.cn, ["admin"], "{request}");
        assert_eq!(peer.o, ["system:masters"], "{request}");
        requests.push(request);
    }
}
