//! Kubernetes' kubeconfig (`v1` `Config`), as far as Flotilla writes and reads one: the
//! file `flotilla certs kubeconfig` and `flotilla up` write, and the CLI and the agent read
//! to find the servers and their credentials.
//!
//! Where the file is ([`find`]): `--kubeconfig FILE`, else the first file of `KUBECONFIG`
//! (a `:`-separated list, as kubectl's; Flotilla reads one file, it does not merge), else
//! `./flotilla-data/admin.kubeconfig` when it exists.
//!
//! What is read: the current context's cluster (`server`, and every server in the cluster
//! extension `flotilla.io/servers`, in the order to try them; `certificate-authority-data`
//! or `certificate-authority`) and user (`client-certificate-data` / `client-certificate`
//! and `client-key-data` / `client-key`). Relative file names are relative to the
//! kubeconfig's directory, as kubectl takes them.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use flotilla_transport::Dialer;
use serde::{Deserialize, Serialize};

/// The cluster extension that lists every server, in the order to try them (kubectl reads
/// only `server`, and keeps extensions when it rewrites the file).
pub const SERVERS_EXTENSION: &str = "flotilla.io/servers";
/// Where `flotilla up` writes the administrator's kubeconfig (relative to its directory).
pub const UP_KUBECONFIG: &str = "flotilla-data/admin.kubeconfig";

#[derive(Serialize, Deserialize, Debug, Default)]
pub struct KubeConfig {
    #[serde(rename = "apiVersion", default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub clusters: Vec<NamedCluster>,
    #[serde(default)]
    pub users: Vec<NamedUser>,
    #[serde(default)]
    pub contexts: Vec<NamedContext>,
    #[serde(rename = "current-context", default)]
    pub current_context: String,
    #[serde(default)]
    pub preferences: Preferences,
}

#[derive(Serialize, Deserialize, Debug, Default)]
pub struct Preferences {}

#[derive(Serialize, Deserialize, Debug)]
pub struct NamedCluster {
    pub name: String,
    pub cluster: Cluster,
}

#[derive(Serialize, Deserialize, Debug, Default)]
#[serde(rename_all = "kebab-case")]
pub struct Cluster {
    pub server: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_authority_data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_authority: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_tls_verify: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extensions: Vec<NamedExtension>,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct NamedExtension {
    pub name: String,
    /// Other extensions' content is kept as it is.
    pub extension: serde_json::Value,
}

/// The content of [`SERVERS_EXTENSION`].
#[derive(Serialize, Deserialize, Debug)]
pub struct ServersExtension {
    pub servers: Vec<String>,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct NamedUser {
    pub name: String,
    pub user: User,
}

#[derive(Serialize, Deserialize, Debug, Default)]
#[serde(rename_all = "kebab-case")]
pub struct User {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate_data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key_data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<PathBuf>,
    /// A bearer token (from the members' `--token-auth-file`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct NamedContext {
    pub name: String,
    pub context: Context,
}

#[derive(Serialize, Deserialize, Debug, Default)]
pub struct Context {
    pub cluster: String,
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// What a client needs from a kubeconfig.
#[derive(Debug)]
pub struct Target {
    /// Every server, in the order to try them (URLs).
    pub servers: Vec<String>,
    /// TLS with the cluster's CA and the user's certificate.
    pub dialer: Dialer,
    /// The context's namespace, when it names one.
    pub namespace: Option<String>,
    /// The cluster's CA (PEM), when the kubeconfig has one.
    pub ca_pem: Option<Vec<u8>>,
    /// The user's certificate and key (PEM), when it has them: an agent also serves its own
    /// port with its node's certificate.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// The kubeconfig to use: `explicit` (`--kubeconfig`), else the first file of `KUBECONFIG`,
/// else `./flotilla-data/admin.kubeconfig` when it exists. None: no kubeconfig.
pub fn find(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    if let Some(list) = std::env::var_os("KUBECONFIG")
        && let Some(first) = std::env::split_paths(&list).find(|p| !p.as_os_str().is_empty())
    {
        return Some(first);
    }
    let up = PathBuf::from(UP_KUBECONFIG);
    up.exists().then_some(up)
}

/// Reads the kubeconfig at `path` for its current context.
pub fn load(path: &Path) -> Result<Target, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the kubeconfig {}: {e}", path.display()))?;
    let config: KubeConfig = serde_norway::from_str(&text)
        .map_err(|e| format!("the kubeconfig {} is not valid: {e}", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    target(&config, dir).map_err(|e| format!("kubeconfig {}: {e}", path.display()))
}

/// The current context's servers and credentials; files are relative to `dir`.
pub fn target(config: &KubeConfig, dir: &Path) -> Result<Target, String> {
    let name = &config.current_context;
    if name.is_empty() {
        return Err("current-context is not set".into());
    }
    let context = &config
        .contexts
        .iter()
        .find(|c| &c.name == name)
        .ok_or_else(|| format!("context {name:?} (current-context) is not in contexts"))?
        .context;
    let cluster = &config
        .clusters
        .iter()
        .find(|c| c.name == context.cluster)
        .ok_or_else(|| format!("cluster {:?} is not in clusters", context.cluster))?
        .cluster;
    let user = match context.user.as_str() {
        "" => None,
        name => Some(
            &config
                .users
                .iter()
                .find(|u| u.name == name)
                .ok_or_else(|| format!("user {name:?} is not in users"))?
                .user,
        ),
    };
    if cluster.insecure_skip_tls_verify {
        return Err(
            "insecure-skip-tls-verify is not supported: give the cluster's CA \
             (certificate-authority-data)"
                .into(),
        );
    }
    let mut servers = Vec::new();
    for e in &cluster.extensions {
        if e.name == SERVERS_EXTENSION {
            let ext: ServersExtension = serde_json::from_value(e.extension.clone())
                .map_err(|err| format!("extension {SERVERS_EXTENSION}: {err}"))?;
            servers = ext.servers;
        }
    }
    if servers.is_empty() && !cluster.server.is_empty() {
        servers.push(cluster.server.clone());
    }
    if servers.is_empty() {
        return Err(format!("cluster {:?} names no server", context.cluster));
    }
    let ca = data_or_file(
        cluster.certificate_authority_data.as_deref(),
        cluster.certificate_authority.as_deref(),
        dir,
        "certificate-authority",
    )?;
    let identity = match user {
        None => None,
        Some(u) => {
            let cert = data_or_file(
                u.client_certificate_data.as_deref(),
                u.client_certificate.as_deref(),
                dir,
                "client-certificate",
            )?;
            let key = data_or_file(
                u.client_key_data.as_deref(),
                u.client_key.as_deref(),
                dir,
                "client-key",
            )?;
            match (cert, key) {
                (Some(c), Some(k)) => Some((c, k)),
                (None, None) => None,
                _ => {
                    return Err(format!(
                        "user {:?} has a client certificate or key without the other",
                        context.user
                    ));
                }
            }
        }
    };
    let dialer = match &ca {
        Some(ca) => Dialer::tls(
            ca,
            identity.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())),
        )
        .map_err(|e| e.to_string())?,
        None if servers.iter().any(|s| s.starts_with("https://")) => {
            return Err(format!(
                "cluster {:?} has https servers but no certificate-authority-data",
                context.cluster
            ));
        }
        None => Dialer::plain(),
    };
    let dialer = match user.and_then(|u| u.token.as_deref()) {
        Some(_) if !dialer.is_tls() => {
            return Err(format!(
                "user {:?} has a token and cluster {:?} no certificate-authority-data: a token \
                 is sent only over TLS",
                context.user, context.cluster
            ));
        }
        Some(token) => dialer.with_token(token.trim()),
        None => dialer,
    };
    Ok(Target {
        servers,
        dialer,
        namespace: context.namespace.clone(),
        ca_pem: ca,
        identity,
    })
}

fn data_or_file(
    data: Option<&str>,
    file: Option<&Path>,
    dir: &Path,
    what: &str,
) -> Result<Option<Vec<u8>>, String> {
    if let Some(d) = data {
        return base64::engine::general_purpose::STANDARD
            .decode(d.trim())
            .map(Some)
            .map_err(|e| format!("{what}-data is not base64: {e}"));
    }
    match file {
        None => Ok(None),
        Some(f) => {
            let f = dir.join(f);
            std::fs::read(&f)
                .map(Some)
                .map_err(|e| format!("{what} {}: {e}", f.display()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = r#"
apiVersion: v1
kind: Config
clusters:
- name: flotilla
  cluster:
    server: https://10.0.0.1:7379
    certificate-authority: ca.crt
    extensions:
    - name: other.example/x
      extension: {a: 1}
    - name: flotilla.io/servers
      extension:
        servers: [https://10.0.0.1:7379, https://10.0.0.2:7379]
users:
- name: bob
  user: {}
contexts:
- name: bob@flotilla
  context: {cluster: flotilla, user: bob, namespace: shop}
current-context: bob@flotilla
"#;

    #[test]
    fn files_are_relative_to_the_kubeconfigs_directory() {
        let config: KubeConfig = serde_norway::from_str(YAML).unwrap();
        // No ca.crt in this directory: named, relative to it.
        let dir = std::env::temp_dir().join("flotilla-kubeconfig-test-missing");
        let e = target(&config, &dir).unwrap_err();
        assert!(
            e.contains("certificate-authority") && e.contains("ca.crt"),
            "{e}"
        );
    }

    #[test]
    fn plain_servers_need_no_ca_and_the_context_must_exist() {
        let mut config: KubeConfig = serde_norway::from_str(YAML).unwrap();
        config.clusters[0].cluster.certificate_authority = None;
        let e = target(&config, Path::new(".")).unwrap_err();
        assert!(e.contains("no certificate-authority-data"), "{e}");
        config.clusters[0].cluster.extensions.clear();
        config.clusters[0].cluster.server = "http://127.0.0.1:7379".into();
        let t = target(&config, Path::new(".")).unwrap();
        assert_eq!(t.servers, ["http://127.0.0.1:7379"]);
        assert!(!t.dialer.is_tls());
        assert_eq!(t.namespace.as_deref(), Some("shop"));
        config.current_context = "nobody".into();
        let e = target(&config, Path::new(".")).unwrap_err();
        assert!(e.contains("\"nobody\""), "{e}");
    }

    #[test]
    fn insecure_skip_tls_verify_is_refused() {
        let mut config: KubeConfig = serde_norway::from_str(YAML).unwrap();
        config.clusters[0].cluster.insecure_skip_tls_verify = true;
        let e = target(&config, Path::new(".")).unwrap_err();
        assert!(e.contains("insecure-skip-tls-verify"), "{e}");
    }
}
