//! TLS end to end on loopback: certificates from a CA made here (rcgen), a real tonic
//! server on `incoming`, real tonic clients from `Dialer`.

use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use tokio_stream::StreamExt as _;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use super::*;

struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

struct Leaf {
    cert: String,
    key: String,
}

fn ca() -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params
        .distinguished_name
        .push(DnType::CommonName, "test-ca");
    let pem = params.self_signed(&key).unwrap().pem();
    Ca {
        pem,
        issuer: Issuer::new(params, key),
    }
}

/// A leaf like `flotilla certs issue` makes: `serve` adds serverAuth and the loopback SANs.
fn leaf(ca: &Ca, user: &str, groups: &[&str], serve: bool) -> Leaf {
    let sans: &[&str] = if serve {
        &["127.0.0.1", "localhost"]
    } else {
        &[]
    };
    leaf_for(ca, user, groups, serve, sans)
}

/// A leaf naming `sans`.
fn leaf_for(ca: &Ca, user: &str, groups: &[&str], serve: bool, sans: &[&str]) -> Leaf {
    let key = KeyPair::generate().unwrap();
    let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(sans).unwrap();
    params.distinguished_name.push(DnType::CommonName, user);
    for g in groups {
        params.distinguished_name.push(DnType::OrganizationName, *g);
    }
    params.extended_key_usages = if serve {
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ]
    } else {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    };
    Leaf {
        cert: params.signed_by(&key, &ca.issuer).unwrap().pem(),
        key: key.serialize_pem(),
    }
}

type Seen = Arc<Mutex<Vec<Option<Arc<Peer>>>>>;

/// Serves gRPC health on loopback with `tls`; returns the address and the peers of the
/// connections the server took.
async fn serve(tls: Option<ServerTls>) -> (String, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let conns = incoming(listener, tls, "test").map(move |c| {
        if let Ok(c) = &c {
            record.lock().unwrap().push(c.info().peer.clone());
        }
        c
    });
    let (_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(conns),
    );
    (addr, seen)
}

async fn check(dialer: &Dialer, addr: &str) -> Result<(), String> {
    let channel = dialer
        .endpoint(addr)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| source_chain(&e))?;
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map(|_| ())
        .map_err(|s| s.to_string())
}

fn server(ca: &Ca, auth: ClientAuth) -> ServerTls {
    let me = leaf(ca, "m1", &[], true);
    ServerTls::new(
        me.cert.as_bytes(),
        me.key.as_bytes(),
        Some(ca.pem.as_bytes()),
        auth,
    )
    .unwrap()
}

fn dialer(ca: &Ca, who: Option<&Leaf>) -> Dialer {
    Dialer::tls(
        ca.pem.as_bytes(),
        who.map(|l| (l.cert.as_bytes(), l.key.as_bytes())),
    )
    .unwrap()
}

#[tokio::test]
async fn a_client_certificate_names_the_user_and_groups() {
    let ca = ca();
    let (addr, seen) = serve(Some(server(&ca, ClientAuth::Required))).await;
    // (rcgen keeps one O per name; `flotilla certs` writes several, see cli/src/certs.rs.)
    let alice = leaf(&ca, "alice", &["system:masters"], false);
    check(&dialer(&ca, Some(&alice)), &addr).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    let peer = seen[0].as_deref().unwrap();
    assert_eq!(peer.user, "alice");
    assert_eq!(peer.groups, ["system:masters"]);
    assert!(!peer.server_auth && !peer.is_member());
}

#[tokio::test]
async fn a_required_certificate_refuses_clients_without_one_or_from_another_ca() {
    let ca = ca();
    let (addr, seen) = serve(Some(server(&ca, ClientAuth::Required))).await;
    assert!(check(&dialer(&ca, None), &addr).await.is_err());
    let other = self::ca();
    let stranger = leaf(&other, "alice", &["system:masters"], false);
    // The stranger trusts our CA (it knows the server) but its own certificate is not ours.
    assert!(check(&dialer(&ca, Some(&stranger)), &addr).await.is_err());
    // Plaintext to a TLS port.
    assert!(check(&Dialer::plain(), &addr).await.is_err());
    assert!(
        seen.lock().unwrap().is_empty(),
        "no connection reached the server"
    );
}

#[tokio::test]
async fn an_optional_certificate_lets_anonymous_clients_in() {
    let ca = ca();
    let (addr, seen) = serve(Some(server(&ca, ClientAuth::Optional))).await;
    check(&dialer(&ca, None), &addr).await.unwrap();
    assert_eq!(*seen.lock().unwrap(), [None]);
    let stranger = leaf(&self::ca(), "alice", &[], false);
    assert!(check(&dialer(&ca, Some(&stranger)), &addr).await.is_err());
}

#[tokio::test]
async fn the_members_port_takes_only_members_certificates() {
    let ca = ca();
    let (addr, seen) = serve(Some(server(&ca, ClientAuth::Members))).await;
    let m2 = leaf(&ca, "m2", &[], true);
    check(&dialer(&ca, Some(&m2)), &addr).await.unwrap();
    let admin = leaf(&ca, "admin", &["system:masters"], false);
    assert!(check(&dialer(&ca, Some(&admin)), &addr).await.is_err());
    let node = leaf(&ca, "system:node:w1", &["system:nodes"], true);
    assert!(check(&dialer(&ca, Some(&node)), &addr).await.is_err());
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].as_deref().unwrap().user, "m2");
}

#[tokio::test]
async fn a_client_checks_the_servers_certificate() {
    let ca = ca();
    let (addr, _) = serve(Some(server(&ca, ClientAuth::None))).await;
    check(&dialer(&ca, None), &addr).await.unwrap();
    // A client trusting another CA refuses this server.
    let err = check(&dialer(&self::ca(), None), &addr).await.unwrap_err();
    assert!(err.contains("certificate"), "{err}");
    // A certificate from the right CA that names another host is refused too.
    let elsewhere = leaf_for(&ca, "m9", &[], true, &["10.9.9.9", "m9.example"]);
    let tls = ServerTls::new(
        elsewhere.cert.as_bytes(),
        elsewhere.key.as_bytes(),
        None,
        ClientAuth::None,
    )
    .unwrap();
    let (addr, _) = serve(Some(tls)).await;
    let err = check(&dialer(&ca, None), &addr).await.unwrap_err();
    assert!(err.contains("not valid for name"), "{err}");
}

#[tokio::test]
async fn plain_serves_plain() {
    let (addr, seen) = serve(None).await;
    check(&Dialer::plain(), &addr).await.unwrap();
    assert_eq!(*seen.lock().unwrap(), [None]);
    let ca = ca();
    assert!(check(&dialer(&ca, None), &addr).await.is_err());
}

#[test]
fn bad_files_are_refused_with_what_they_are() {
    let ca = ca();
    let m = leaf(&ca, "m1", &[], true);
    let e = Dialer::tls(b"not a pem", None).unwrap_err().to_string();
    assert!(e.contains("CA certificate"), "{e}");
    let e = Dialer::tls(ca.pem.as_bytes(), Some((m.cert.as_bytes(), b"nope")))
        .unwrap_err()
        .to_string();
    assert!(e.contains("client key"), "{e}");
    let e = ServerTls::new(
        m.cert.as_bytes(),
        m.key.as_bytes(),
        None,
        ClientAuth::Required,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("trusted CA"), "{e}");
    let e = Dialer::plain()
        .endpoint("https://127.0.0.1:1")
        .unwrap_err()
        .to_string();
    assert!(e.contains("CA certificate"), "{e}");
    assert_eq!(Dialer::plain().url("a:1"), "http://a:1");
    assert_eq!(dialer(&ca, None).url("a:1"), "https://a:1");
    assert_eq!(dialer(&ca, None).url("http://a:1"), "http://a:1");
}
