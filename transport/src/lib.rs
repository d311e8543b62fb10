//! Every connection Flotilla makes or accepts is built here (issue 35's "one channel
//! factory"): plain TCP or TLS, the client certificate a caller presents, and the identity
//! a server reads from it.
//!
//! - [`Dialer`] makes client endpoints: `https://` with the cluster's CA (and a client
//!   certificate when the caller has one), or `http://` when the cluster is plaintext.
//! - [`ServerTls`] and [`incoming`] accept connections: TLS handshakes run beside the
//!   accept loop (a slow or hostile client holds up nobody else), a refused handshake is
//!   logged with its address and reason, and each connection carries a [`ConnInfo`] with
//!   the [`Peer`] its verified certificate names (Kubernetes' x509 rule: CN is the user,
//!   each O a group), parsed once per connection rather than per request.

use std::{
    io,
    net::SocketAddr,
    path::Path,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, server::Connected};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
}

fn invalid(what: impl Into<String>, reason: impl ToString) -> Error {
    Error::Invalid {
        what: what.into(),
        reason: reason.to_string(),
    }
}

/// Reads a file named by a flag or a kubeconfig.
pub fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        path: path.display().to_string(),
        source,
    })
}

/// How clients connect: the channel factory every caller uses (CLI, agents, peers, the
/// leader's own client, bench and tests).
#[derive(Clone, Default)]
pub struct Dialer {
    tls: Option<ClientTlsConfig>,
    /// A bearer token sent with every request (kube-apiserver's token file).
    token: Option<Arc<str>>,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match (self.tls.is_some(), self.token.is_some()) {
            (true, false) => "Dialer(tls)",
            (true, true) => "Dialer(tls, token)",
            (false, false) => "Dialer(plain)",
            (false, true) => "Dialer(plain, token)",
        })
    }
}

impl Dialer {
    /// Plaintext: `http://`.
    pub fn plain() -> Self {
        Self::default()
    }

    /// TLS, trusting the CA in `ca_pem`, presenting `identity` (certificate and key, PEM)
    /// when given. The PEM is checked here, so a bad file fails at start, not at first use.
    pub fn tls(ca_pem: &[u8], identity: Option<(&[u8], &[u8])>) -> Result<Self, Error> {
        certs(ca_pem, "the CA certificate")?;
        // Every certificate in the PEM is trusted (a bundle during a CA change).
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
        if let Some((cert, key)) = identity {
            certs(cert, "the client certificate")?;
            PrivateKeyDer::from_pem_slice(key).map_err(|e| invalid("the client key", e))?;
            config = config.identity(Identity::from_pem(cert, key));
        }
        Endpoint::from_static("https://localhost")
            .tls_config(config.clone())
            .map_err(|e| invalid("the TLS client settings", source_chain(&e)))?;
        Ok(Self {
            tls: Some(config),
            token: None,
        })
    }

    /// Sends `token` as `authorization: Bearer TOKEN` with every request made through
    /// clients that honour [`Dialer::token`] (the Flotilla client does).
    pub fn with_token(mut self, token: &str) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The bearer token, if one was given.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// TLS from files: the CA (`--cacert`, `--trusted-ca-file`) and, optionally, a
    /// certificate and its key.
    pub fn from_files(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<Self, Error> {
        let ca = read(ca)?;
        match identity {
            None => Self::tls(&ca, None),
            Some((cert, key)) => Self::tls(&ca, Some((&read(cert)?, &read(key)?))),
        }
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The URL of `addr`: as given when it names a scheme, else `https://` or `http://`.
    pub fn url(&self, addr: &str) -> String {
        let addr = addr.trim();
        if addr.contains("://") {
            addr.to_string()
        } else if self.tls.is_some() {
            format!("https://{addr}")
        } else {
            format!("http://{addr}")
        }
    }

    /// An endpoint for `addr` (`HOST:PORT`, or a URL), with TLS set up for `https://`. The
    /// caller adds its own timeouts and windows.
    pub fn endpoint(&self, addr: &str) -> Result<Endpoint, Error> {
        let url = self.url(addr);
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| invalid(format!("the server address {addr:?}"), e))?;
        match (&self.tls, url.starts_with("https://")) {
            (Some(tls), true) => endpoint
                .tls_config(tls.clone())
                .map_err(|e| invalid(format!("TLS to {addr}"), source_chain(&e))),
            // A caller set up for TLS never falls back to plaintext because an address
            // (a kubeconfig's, a Node annotation's) says so.
            (Some(_), false) => Err(invalid(
                format!("the server address {addr:?}"),
                "plaintext (http) where TLS is set up: the server must serve TLS",
            )),
            (None, true) => Err(invalid(
                format!("the server address {addr:?}"),
                "https needs the cluster's CA certificate (a kubeconfig, or --cacert)",
            )),
            (None, false) => Ok(endpoint),
        }
    }
}

/// An error with its causes (`transport error: tls handshake: invalid peer certificate`):
/// tonic's own `Display` stops at "transport error".
pub fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(inner) = next {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        next = inner.source();
    }
    s
}

fn certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(what, e))?;
    if certs.is_empty() {
        return Err(invalid(what, "no PEM certificate in it"));
    }
    Ok(certs)
}

/// What a server asks of its clients' certificates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// None asked for.
    None,
    /// Verified against the CA when one is presented; a client without one still connects
    /// (and is anonymous).
    Optional,
    /// Every client must present a certificate from the CA (etcd's `--client-cert-auth`).
    Required,
    /// Required, and it must be a member's (the peer port): a certificate for both server
    /// and client use that is not a node's. Agents' and users' certificates are refused.
    Members,
}

/// A server's TLS: its certificate and key, and what it asks of clients.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: tokio_rustls::TlsAcceptor,
    auth: ClientAuth,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServerTls({:?})", self.auth)
    }
}

impl ServerTls {
    pub fn new(
        cert_pem: &[u8],
        key_pem: &[u8],
        client_ca_pem: Option<&[u8]>,
        auth: ClientAuth,
    ) -> Result<Self, Error> {
        let chain = certs(cert_pem, "the server certificate")?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| invalid("the server key", e))?;
        let builder = rustls::ServerConfig::builder();
        let builder = match (client_ca_pem, auth) {
            (_, ClientAuth::None) => builder.with_no_client_auth(),
            (None, _) => {
                return Err(invalid(
                    "client certificates",
                    "verifying them needs a trusted CA file",
                ));
            }
            (Some(ca), auth) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in certs(ca, "the trusted CA certificate")? {
                    roots
                        .add(c)
                        .map_err(|e| invalid("the trusted CA certificate", e))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots));
                let verifier = if auth == ClientAuth::Optional {
                    verifier.allow_unauthenticated()
                } else {
                    verifier
                };
                builder.with_client_cert_verifier(
                    verifier
                        .build()
                        .map_err(|e| invalid("the trusted CA certificate", e))?,
                )
            }
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|e| invalid("the server certificate and key", e))?;
        // gRPC (HTTP/2) and, on the client port, plain HTTP/1.1 for /metrics and /healthz.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            auth,
        })
    }

    /// From files: etcd's `--cert-file`, `--key-file` and `--trusted-ca-file` (or their
    /// `--peer-` forms).
    pub fn from_files(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
        auth: ClientAuth,
    ) -> Result<Self, Error> {
        let ca = client_ca.map(read).transpose()?;
        Self::new(&read(cert)?, &read(key)?, ca.as_deref(), auth)
    }

    pub fn client_auth(&self) -> ClientAuth {
        self.auth
    }
}

/// Who is at the other end of a connection, from its verified client certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The certificate's CN.
    pub user: String,
    /// Its O fields, in order.
    pub groups: Vec<String>,
    /// Whether it may serve (extended key usage serverAuth): members' and agents'
    /// certificates do, users' do not.
    pub server_auth: bool,
}

impl Peer {
    /// Reads the identity from a certificate (DER).
    pub fn from_der(der: &[u8]) -> Result<Self, Error> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| invalid("a certificate", e))?;
        let text = |a: &x509_parser::x509::AttributeTypeAndValue<'_>| {
            a.as_str()
                .map(str::to_string)
                .map_err(|e| invalid("a certificate's subject", e))
        };
        let user = cert
            .subject()
            .iter_common_name()
            .next()
            .map(text)
            .transpose()?
            .unwrap_or_default();
        let groups = cert
            .subject()
            .iter_organization()
            .map(text)
            .collect::<Result<Vec<_>, _>>()?;
        let server_auth = cert
            .extended_key_usage()
            .map_err(|e| invalid("a certificate's extended key usage", e))?
            .is_some_and(|eku| eku.value.server_auth);
        Ok(Self {
            user,
            groups,
            server_auth,
        })
    }

    /// Reads the identity from the first certificate of a PEM file.
    pub fn from_pem(pem: &[u8]) -> Result<Self, Error> {
        let first = certs(pem, "the certificate")?.swap_remove(0);
        Self::from_der(&first)
    }

    /// A member's certificate: one for serving, and not a node's (agents' certificates
    /// also serve, their own port).
    pub fn is_member(&self) -> bool {
        self.server_auth && !self.user.starts_with("system:node:")
    }
}

/// What a server knows about a connection: put into every request's extensions.
#[derive(Clone, Debug, Default)]
pub struct ConnInfo {
    pub remote: Option<SocketAddr>,
    /// From the client certificate, when one was presented and verified.
    pub peer: Option<Arc<Peer>>,
}

impl ConnInfo {
    /// The connection a gRPC request came on (None for one that came another way).
    pub fn of<T>(request: &tonic::Request<T>) -> Option<&ConnInfo> {
        request.extensions().get::<ConnInfo>()
    }
}

/// An accepted connection, plain or TLS.
pub struct Conn {
    io: Io,
    info: ConnInfo,
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Conn {
    pub fn info(&self) -> &ConnInfo {
        &self.info
    }
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections accepted and not yet taken by the server.
const BACKLOG: usize = 128;
/// TLS handshakes in flight at once per listener: a connection accepted beyond them is
/// closed at once, so a flood of silent connections holds a bounded number of sockets.
const MAX_HANDSHAKES: usize = 256;

/// At most one warning a second per listener (the rest are counted and said with the
/// next), so a flood of bad connections cannot flood the log.
#[derive(Default)]
struct LogLimit {
    last_second: std::sync::atomic::AtomicU64,
    suppressed: std::sync::atomic::AtomicU64,
}

impl LogLimit {
    fn warn(&self, what: std::fmt::Arguments<'_>) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if self.last_second.swap(now, Relaxed) == now {
            self.suppressed.fetch_add(1, Relaxed);
            return;
        }
        match self.suppressed.swap(0, Relaxed) {
            0 => tracing::warn!("{what}"),
            n => tracing::warn!("{what} (and {n} more in the second before)"),
        }
    }
}

/// The connections `listener` accepts, for `tonic`'s `serve_with_incoming`: plain, or
/// TLS after a handshake (each in its own task). `port` names the port in logs ("client",
/// "peer"). The accepting task runs on the current runtime and ends when the stream is
/// dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Option<ServerTls>,
    port: &'static str,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(BACKLOG);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let log = Arc::new(LogLimit::default());
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                a = listener.accept() => a,
            };
            let (tcp, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    log.warn(format_args!(
                        "accepting a connection on the {port} port failed: {e}"
                    ));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let Some(tls) = tls.clone() else {
                let info = ConnInfo {
                    remote: Some(remote),
                    peer: None,
                };
                let conn = Conn {
                    io: Io::Plain(tcp),
                    info,
                };
                if tx.send(Ok(conn)).await.is_err() {
                    return;
                }
                continue;
            };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                log.warn(format_args!(
                    "closed a connection on the {port} port from {remote}: \
                     {MAX_HANDSHAKES} TLS handshakes are already in progress"
                ));
                continue;
            };
            let (tx, log) = (tx.clone(), log.clone());
            tokio::spawn(async move {
                let result = handshake(tls, tcp, remote).await;
                drop(permit);
                match result {
                    Ok(conn) => {
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Err(reason) => log.warn(format_args!(
                        "refused a connection on the {port} port from {remote}: {reason}"
                    )),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

async fn handshake(tls: ServerTls, tcp: TcpStream, remote: SocketAddr) -> Result<Conn, String> {
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.acceptor.accept(tcp))
        .await
        .map_err(|_| format!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}"))?
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    let peer = match stream.get_ref().1.peer_certificates() {
        Some([leaf, ..]) => Some(Arc::new(Peer::from_der(leaf).map_err(|e| e.to_string())?)),
        _ => None,
    };
    if tls.auth == ClientAuth::Members {
        match &peer {
            Some(p) if p.is_member() => {}
            Some(p) => {
                return Err(format!(
                    "its certificate (user {:?}) is not a member's; only members may use this port",
                    p.user
                ));
            }
            None => return Err("no client certificate".into()),
        }
    }
    Ok(Conn {
        io: Io::Tls(Box::new(stream)),
        info: ConnInfo {
            remote: Some(remote),
            peer,
        },
    })
}

#[cfg(test)]
mod tests;
