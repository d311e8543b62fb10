//! `flotilla certs init|issue|kubeconfig`: the cluster's PKI, made by the binary itself
//! (rcgen over ring; no openssl, no shell-out).
//!
//! Identities follow Kubernetes: a certificate's CN is the user, its O fields the groups.
//! One directory holds everything (docs/security.md, "Certificates"):
//!
//! - `DIR/ca.crt`, `DIR/ca.key`: the cluster's CA (`certs init`);
//! - `DIR/NAME.crt`, `DIR/NAME.key`: one pair per identity (`certs issue --name NAME`), for
//!   every kind, so `certs kubeconfig --user NAME` finds it by the same name.
//!
//! The functions below are the library `flotilla up` uses: [`Ca::generate`], [`Ca::load`],
//! [`issue`], [`write_pair`] and [`kubeconfig`].

use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use base64::Engine as _;
use clap::{Args, Subcommand, ValueEnum};
use flotilla_client::kubeconfig as kc;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// The CA's lifetime unless `certs init --days` says otherwise (kubeadm's CA: 10 years).
pub const CA_DAYS: u32 = 3650;
/// A leaf certificate's lifetime unless `certs issue --days` says otherwise (kubeadm: 1 year).
pub const LEAF_DAYS: u32 = 365;
/// The user an agent's certificate names is this prefix and the node's name (Kubernetes'
/// Node authorizer recognises nodes by it).
pub const NODE_USER_PREFIX: &str = "system:node:";
/// The group of every agent's certificate (Kubernetes' `system:nodes`).
pub const NODES_GROUP: &str = "system:nodes";
/// The name of the kubeconfig's cluster entry.
pub const KUBECONFIG_CLUSTER: &str = "flotilla";

/// Certificates start this long before they are made, so that a peer whose clock is a little
/// behind does not refuse a fresh one (kubeadm's `CertificateBackdate`).
const BACKDATE: Duration = Duration::minutes(5);

#[derive(Args, Debug)]
pub struct CertsArgs {
    #[command(subcommand)]
    pub command: CertsCommand,
}

#[derive(Subcommand, Debug)]
pub enum CertsCommand {
    /// Create the cluster's CA: DIR/ca.crt and DIR/ca.key (mode 0600). Keep ca.key secret:
    /// whoever holds it can issue any identity, `system:masters` included.
    Init {
        /// The directory of the cluster's certificates (created, mode 0700, if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Days the CA is valid for.
        #[arg(long, default_value_t = CA_DAYS)]
        days: u32,
        /// Replace an existing CA; every certificate it issued stops being trusted.
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate signed by DIR's CA: DIR/NAME.crt and DIR/NAME.key (mode 0600).
    Issue(IssueArgs),
    /// Print a kubeconfig for the user NAME (DIR/NAME.crt and DIR/NAME.key) on stdout.
    Kubeconfig {
        /// The directory of the cluster's certificates.
        #[arg(long)]
        dir: PathBuf,
        /// The name the certificate was issued under (`certs issue --name`).
        #[arg(long)]
        user: String,
        /// The servers, HOST:PORT, comma-separated or repeated, in the order to try them.
        #[arg(long, required = true, value_delimiter = ',', value_name = "HOST:PORT")]
        server: Vec<String>,
    },
}

#[derive(Args, Debug)]
pub struct IssueArgs {
    /// The directory of the cluster's certificates (made by `flotilla certs init`).
    #[arg(long)]
    dir: PathBuf,
    /// The identity's name: the user (CN) for members and users, the node for agents; also
    /// the files' name, DIR/NAME.crt and DIR/NAME.key.
    #[arg(long)]
    name: String,
    /// What the certificate is for.
    #[arg(long, value_enum)]
    kind: Kind,
    /// An IP address the holder serves on (member and agent; repeat for several).
    #[arg(long = "ip", value_name = "IP")]
    ips: Vec<IpAddr>,
    /// A DNS name the holder serves on (member and agent; repeat for several).
    #[arg(long = "dns", value_name = "NAME")]
    dns: Vec<String>,
    /// A group of the identity (the certificate's O; repeat for several). Not for agents,
    /// whose group is always `system:nodes`.
    #[arg(long = "group", value_name = "GROUP")]
    groups: Vec<String>,
    /// Days the certificate is valid for.
    #[arg(long, default_value_t = LEAF_DAYS)]
    days: u32,
    /// Replace DIR/NAME.crt and DIR/NAME.key if they exist.
    #[arg(long)]
    force: bool,
}

/// What a leaf certificate is for; it decides the identity, the usages and the addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// A control-plane member: serves the client port, and is client and server of mutual
    /// TLS between members on the peer port (serverAuth + clientAuth, with SANs).
    Member,
    /// A worker's agent: user `system:node:NAME` in group `system:nodes`; a client of the
    /// members, and the server of the agent's own port (serverAuth + clientAuth, with SANs).
    Agent,
    /// A person or a program: a client certificate (clientAuth), CN NAME, O the groups.
    User,
}

/// The CA that signs the cluster's certificates: its certificate and its key.
pub struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    not_after: OffsetDateTime,
}

/// What to issue: the CLI's `certs issue` flags, for callers such as `flotilla up`.
#[derive(Clone, Debug)]
pub struct LeafSpec {
    /// The user (members, users) or node (agents) name.
    pub name: String,
    /// What the certificate is for.
    pub kind: Kind,
    /// IP SANs (member, agent); with no IP and no DNS name, 127.0.0.1 and localhost.
    pub ips: Vec<IpAddr>,
    /// DNS SANs (member, agent).
    pub dns: Vec<String>,
    /// The O fields (member, user); an agent's group is always `system:nodes`.
    pub groups: Vec<String>,
    /// Days from now it is valid for; at least 1, and no later than the CA.
    pub days: u32,
}

/// A certificate and its private key, both PEM (the key PKCS#8, which rustls, Go and
/// kubectl all read).
#[derive(Clone, Debug)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
}

impl Ca {
    /// A new self-signed CA (ECDSA P-256, CA:true with path length 0, keyCertSign and
    /// cRLSign), valid from now for `days`.
    pub fn generate(days: u32) -> anyhow::Result<Ca> {
        if days == 0 {
            bail!("--days must be at least 1");
        }
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "flotilla-ca");
        params.distinguished_name = dn;
        // Only leaves are issued under it: no intermediate may be.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + Duration::days(i64::from(days));
        let key = KeyPair::generate().context("generating the CA's key")?;
        let cert = params
            .self_signed(&key)
            .context("signing the CA's certificate")?;
        let not_after = params.not_after;
        Ok(Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
            not_after,
        })
    }

    /// The CA of `dir` (`ca.crt`, `ca.key`), checked: the certificate is a CA and the key is
    /// its key.
    pub fn load(dir: &Path) -> anyhow::Result<Ca> {
        let (cert_path, key_path) = pair_paths(dir, "ca");
        for path in [&cert_path, &key_path] {
            if !path.exists() {
                bail!(
                    "no CA in {}: {} is missing; create one with `flotilla certs init --dir {}`",
                    dir.display(),
                    path.display(),
                    dir.display()
                );
            }
        }
        let cert_pem = read(&cert_path)?;
        let key_pem = read(&key_path)?;
        Ca::from_pem(&cert_pem, &key_pem).with_context(|| format!("the CA in {}", dir.display()))
    }

    /// A CA from its certificate and key (PEM), checked as [`Ca::load`] checks them.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> anyhow::Result<Ca> {
        let der = pem_to_der(cert_pem).context("ca.crt")?;
        let (_, x509) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| anyhow!("ca.crt is not an X.509 certificate: {e}"))?;
        let is_ca = x509
            .basic_constraints()
            .ok()
            .flatten()
            .is_some_and(|bc| bc.value.ca);
        if !is_ca {
            bail!("ca.crt is not a CA certificate (no basicConstraints CA:true)");
        }
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| anyhow!("ca.key is not a PEM private key: {e}"))?;
        if key.public_key_raw() != x509.public_key().subject_public_key.data.as_ref() {
            bail!("ca.key is not the key of ca.crt");
        }
        let not_after = x509.validity().not_after.to_datetime();
        let issuer = Issuer::from_ca_cert_der(&der.into(), key)
            .map_err(|e| anyhow!("ca.crt cannot sign: {e}"))?;
        Ok(Ca {
            cert_pem: cert_pem.to_string(),
            issuer,
            not_after,
        })
    }

    /// The CA's certificate, PEM: what every member and client trusts.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key, PEM (PKCS#8).
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// When the CA stops being valid; no certificate it issues may outlive it.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }
}

/// Issues a leaf certificate with a new ECDSA P-256 key, signed by `ca`.
///
/// The identity is Kubernetes': CN the user (`system:node:NAME` for an agent), O the groups
/// (`system:nodes` for an agent). Members and agents get serverAuth + clientAuth and their
/// addresses as SANs (127.0.0.1 and localhost if none are given); users get clientAuth only
/// and no SANs. Refuses a spec that mixes these up (addresses for a user, groups for an
/// agent), an empty lifetime, and one that would outlive the CA.
pub fn issue(ca: &Ca, spec: &LeafSpec) -> anyhow::Result<Issued> {
    check_name(spec.kind, &spec.name)?;
    if spec.days == 0 {
        bail!("--days must be at least 1");
    }
    let now = OffsetDateTime::now_utc();
    let not_after = now + Duration::days(i64::from(spec.days));
    if not_after > ca.not_after {
        bail!(
            "a certificate for {} days would outlive the CA, which expires on {}; give fewer \
             --days, or make a new CA with `flotilla certs init --force` (and issue every \
             certificate again)",
            spec.days,
            ca.not_after.date()
        );
    }
    let mut params = CertificateParams::default();
    params.not_before = now - BACKDATE;
    params.not_after = not_after;
    params.is_ca = IsCa::ExplicitNoCa;
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let (user, groups) = match spec.kind {
        Kind::Member | Kind::User => {
            for group in &spec.groups {
                check_group(group)?;
            }
            (spec.name.clone(), spec.groups.clone())
        }
        Kind::Agent => {
            if !spec.groups.is_empty() {
                bail!(
                    "--group is not for --kind agent: an agent's only group is {NODES_GROUP}, \
                     which the Node authorizer relies on; issue a --kind user certificate for \
                     other groups"
                );
            }
            (
                format!("{NODE_USER_PREFIX}{}", spec.name),
                vec![NODES_GROUP.to_string()],
            )
        }
    };
    // rcgen keeps one value per attribute type (rcgen issue 81), and a user may be in many
    // groups: the subject is written below, and rcgen's only holds its place.
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, user.as_str());
    params.distinguished_name = dn;
    match spec.kind {
        Kind::Member | Kind::Agent => {
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            params.subject_alt_names = sans(&spec.ips, &spec.dns)?;
        }
        Kind::User => {
            if !spec.ips.is_empty() || !spec.dns.is_empty() {
                bail!(
                    "--ip and --dns are for --kind member and agent: a user's certificate is a \
                     client certificate, with no addresses"
                );
            }
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
    }
    let key = KeyPair::generate().context("generating a key")?;
    let cert = params
        .signed_by(&key, &ca.issuer)
        .map_err(|e| anyhow!("{e}"))
        .and_then(|cert| der::with_subject(cert.der(), &der::name(&user, &groups), ca.issuer.key()))
        .with_context(|| format!("signing the certificate of {:?}", spec.name))?;
    Ok(Issued {
        cert_pem: der::pem("CERTIFICATE", &cert),
        key_pem: key.serialize_pem(),
    })
}

/// Just enough DER to give a certificate rcgen made a subject with several O fields: parse
/// the element boundaries, write a Name, splice it in and sign the result again.
mod der {
    use anyhow::{Error, anyhow};
    use base64::Engine as _;
    use rcgen::SigningKey;

    const SEQUENCE: u8 = 0x30;
    const SET: u8 = 0x31;
    const OID: u8 = 0x06;
    const UTF8_STRING: u8 = 0x0c;
    const BIT_STRING: u8 = 0x03;
    /// `[0] EXPLICIT Version`, the first field of a TBSCertificate.
    const VERSION: u8 = 0xa0;
    /// id-at-commonName, 2.5.4.3, and id-at-organizationName, 2.5.4.10, encoded.
    const CN: [u8; 3] = [0x55, 0x04, 0x03];
    const O: [u8; 3] = [0x55, 0x04, 0x0a];

    /// One element: its tag, and its content (`whole` includes tag and length).
    struct Tlv<'a> {
        tag: u8,
        whole: &'a [u8],
        content: &'a [u8],
    }

    fn bad(what: &str) -> Error {
        anyhow!("certificate DER: {what}")
    }

    /// The first element of `input` and what follows it (definite lengths, one-byte tags).
    fn read(input: &[u8]) -> Result<(Tlv<'_>, &[u8]), Error> {
        let [tag, first, rest @ ..] = input else {
            return Err(bad("truncated"));
        };
        if tag & 0x1f == 0x1f {
            return Err(bad("multi-byte tag"));
        }
        let (len, rest) = if *first < 0x80 {
            (usize::from(*first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return Err(bad("bad length"));
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            (len, &rest[n..])
        };
        if rest.len() < len {
            return Err(bad("truncated"));
        }
        let header = input.len() - rest.len();
        Ok((
            Tlv {
                tag: *tag,
                whole: &input[..header + len],
                content: &rest[..len],
            },
            &rest[len..],
        ))
    }

    /// Tag, definite length, content.
    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = content.len();
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes = len.to_be_bytes();
            let skip = bytes.iter().take_while(|b| **b == 0).count();
            out.push(0x80 | (bytes.len() - skip) as u8);
            out.extend_from_slice(&bytes[skip..]);
        }
        out.extend_from_slice(content);
        out
    }

    /// The Name `CN=user, O=group, O=...`: one RDN per attribute, UTF8String values, in
    /// order (what Kubernetes' x509 authenticator reads as user and groups).
    pub fn name(user: &str, groups: &[String]) -> Vec<u8> {
        let rdn = |oid: &[u8], value: &str| {
            let pair = [tlv(OID, oid), tlv(UTF8_STRING, value.as_bytes())].concat();
            tlv(SET, &tlv(SEQUENCE, &pair))
        };
        let mut rdns = rdn(&CN, user);
        for group in groups {
            rdns.extend(rdn(&O, group));
        }
        tlv(SEQUENCE, &rdns)
    }

    /// `cert` with its subject replaced by `subject` and signed again by `key`, which must be
    /// the key that signed it (the signature algorithm is kept).
    pub fn with_subject(
        cert: &[u8],
        subject: &[u8],
        key: &impl SigningKey,
    ) -> Result<Vec<u8>, Error> {
        let (outer, rest) = read(cert)?;
        if outer.tag != SEQUENCE || !rest.is_empty() {
            return Err(bad("not one SEQUENCE"));
        }
        let (tbs, after_tbs) = read(outer.content)?;
        let (signature_algorithm, _) = read(after_tbs)?;
        // TBSCertificate: version, serialNumber, signature, issuer, validity, subject, ...
        let (version, _) = read(tbs.content)?;
        if tbs.tag != SEQUENCE || version.tag != VERSION {
            return Err(bad("not a v3 TBSCertificate"));
        }
        let mut fields = tbs.content;
        for _ in 0..5 {
            fields = read(fields)?.1;
        }
        let before_subject = &tbs.content[..tbs.content.len() - fields.len()];
        let (old_subject, after_subject) = read(fields)?;
        if old_subject.tag != SEQUENCE {
            return Err(bad("the subject is not a Name"));
        }
        let tbs = tlv(SEQUENCE, &[before_subject, subject, after_subject].concat());
        let signature = key.sign(&tbs).map_err(|e| anyhow!("signing: {e}"))?;
        // A BIT STRING of whole bytes: no unused bits.
        let signature = [&[0u8][..], &signature].concat();
        let body = [
            tbs.as_slice(),
            signature_algorithm.whole,
            &tlv(BIT_STRING, &signature),
        ]
        .concat();
        Ok(tlv(SEQUENCE, &body))
    }

    /// PEM: the label, and base64 in lines of 64 columns (RFC 7468).
    pub fn pem(label: &str, der: &[u8]) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let mut out = format!("-----BEGIN {label}-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out.push_str(&format!("-----END {label}-----\n"));
        out
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn lengths_round_trip_across_the_long_forms() {
            for len in [0usize, 1, 127, 128, 255, 256, 65_535, 65_536] {
                let content = vec![7u8; len];
                let element = tlv(0x04, &content);
                let (t, rest) = read(&element).unwrap();
                assert_eq!((t.tag, t.content.len(), rest.len()), (0x04, len, 0));
                assert_eq!(t.whole, element.as_slice());
            }
            assert!(read(&[0x30, 0x05, 1, 2]).is_err());
            assert!(read(&[0x30, 0x80]).is_err());
            assert!(read(&[0x30]).is_err());
        }

        #[test]
        fn a_new_subject_keeps_every_other_field_and_a_valid_signature() {
            use x509_parser::prelude::{FromDer as _, X509Certificate};
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let ca_cert = ca_params.self_signed(&ca_key).unwrap();
            let issuer = rcgen::Issuer::new(ca_params, ca_key);
            let leaf_key = rcgen::KeyPair::generate().unwrap();
            let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
            let original = params.signed_by(&leaf_key, &issuer).unwrap();
            let groups = ["a".to_string(), "b, c".to_string(), "ü".to_string()];
            let spliced = with_subject(original.der(), &name("alice", &groups), issuer.key());
            let spliced = spliced.unwrap();

            let (_, ca) = X509Certificate::from_der(ca_cert.der()).unwrap();
            let (_, before) = X509Certificate::from_der(original.der()).unwrap();
            let (_, after) = X509Certificate::from_der(&spliced).unwrap();
            after.verify_signature(Some(ca.public_key())).unwrap();
            let cn: Vec<_> = after
                .subject()
                .iter_common_name()
                .map(|a| a.as_str().unwrap())
                .collect();
            let o: Vec<_> = after
                .subject()
                .iter_organization()
                .map(|a| a.as_str().unwrap())
                .collect();
            assert_eq!(cn, ["alice"]);
            assert_eq!(o, ["a", "b, c", "ü"]);
            assert_eq!(after.raw_serial(), before.raw_serial());
            assert_eq!(after.issuer().as_raw(), before.issuer().as_raw());
            assert_eq!(after.validity(), before.validity());
            assert_eq!(after.public_key().raw, before.public_key().raw);
            assert_eq!(after.extensions(), before.extensions());
            assert_eq!(after.signature_algorithm, before.signature_algorithm);
        }
    }
}

/// The SANs of a serving certificate: the addresses given, or loopback if none.
fn sans(ips: &[IpAddr], dns: &[String]) -> anyhow::Result<Vec<SanType>> {
    if ips.is_empty() && dns.is_empty() {
        return Ok(vec![
            SanType::IpAddress(IpAddr::from([127, 0, 0, 1])),
            SanType::DnsName("localhost".try_into()?),
        ]);
    }
    let mut out: Vec<SanType> = ips.iter().map(|ip| SanType::IpAddress(*ip)).collect();
    for name in dns {
        check_dns_name(name)?;
        out.push(SanType::DnsName(
            name.as_str()
                .try_into()
                .map_err(|e| anyhow!("--dns {name:?}: {e}"))?,
        ));
    }
    Ok(out)
}

/// A name that is also a file name in DIR: letters, digits, `.`, `-`, `_`, `@`; an agent's
/// must be a node name (a DNS subdomain: lower case, digits, `-`, `.`).
fn check_name(kind: Kind, name: &str) -> anyhow::Result<()> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '@');
    if name.is_empty()
        || name.len() > 253
        || name.starts_with(['.', '-'])
        || !name.chars().all(allowed)
    {
        bail!(
            "--name {name:?}: a name is also the file name DIR/NAME.crt, so it takes 1 to 253 \
             letters, digits, '.', '-', '_' or '@', and starts with a letter or digit"
        );
    }
    if name == "ca" {
        bail!("--name ca: DIR/ca.crt is the CA's certificate; choose another name");
    }
    if kind == Kind::Agent && !is_dns_subdomain(name) {
        bail!(
            "--name {name:?}: an agent's name is its node's name, a DNS subdomain (lower-case \
             letters, digits, '-' and '.', starting and ending with a letter or digit)"
        );
    }
    Ok(())
}

fn check_dns_name(name: &str) -> anyhow::Result<()> {
    let host = name.strip_prefix("*.").unwrap_or(name);
    if !is_dns_subdomain(&host.to_ascii_lowercase()) {
        bail!(
            "--dns {name:?} is not a DNS name (letters, digits, '-' and '.'; '*.' may lead); \
             give IP addresses with --ip"
        );
    }
    Ok(())
}

fn check_group(group: &str) -> anyhow::Result<()> {
    if group.trim().is_empty() || group.chars().any(char::is_control) {
        bail!("--group {group:?}: a group name must be printable and not empty");
    }
    Ok(())
}

/// Kubernetes' DNS-1123 subdomain: the shape of a node's name.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// `DIR/NAME.crt` and `DIR/NAME.key`.
pub fn pair_paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    )
}

/// Writes `DIR/NAME.crt` (mode 0644) and `DIR/NAME.key` (mode 0600), each atomically (a
/// temporary file, synced, then moved into place): a reader never sees half a file. Without
/// `force`, refuses before writing anything if either exists, and never replaces one that
/// appears meanwhile.
pub fn write_pair(dir: &Path, name: &str, issued: &Issued, force: bool) -> anyhow::Result<()> {
    let (cert_path, key_path) = pair_paths(dir, name);
    if !force {
        for path in [&cert_path, &key_path] {
            if path.exists() {
                bail!("{} exists; pass --force to overwrite it", path.display());
            }
        }
    }
    write_atomic(&key_path, issued.key_pem.as_bytes(), 0o600, force)?;
    write_atomic(&cert_path, issued.cert_pem.as_bytes(), 0o644, force)?;
    Ok(())
}

pub fn write_atomic(path: &Path, contents: &[u8], mode: u32, force: bool) -> anyhow::Result<()> {
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("{} is not a file path", path.display()))?;
    let tmp = path.with_file_name(format!(".{file_name}.tmp{}", std::process::id()));
    let result = (|| -> anyhow::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        // The umask may have taken bits away; set exactly the mode asked for.
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()?;
        if force {
            std::fs::rename(&tmp, path)
                .with_context(|| format!("renaming into {}", path.display()))?;
        } else {
            // A link, unlike a rename, fails if the name is taken: no-clobber and atomic.
            match std::fs::hard_link(&tmp, path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    bail!("{} exists; pass --force to overwrite it", path.display())
                }
                Err(e) => return Err(e).with_context(|| format!("writing {}", path.display())),
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(&tmp);
    result?;
    if let Some(dir) = path.parent() {
        // The new name is durable once its directory is.
        if let Ok(d) = std::fs::File::open(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        }) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// The DER of the first certificate in a PEM text.
fn pem_to_der(pem: &str) -> anyhow::Result<Vec<u8>> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| anyhow!("not a PEM certificate: {e}"))?;
    if pem.label != "CERTIFICATE" {
        bail!("not a PEM certificate (found {:?})", pem.label);
    }
    Ok(pem.contents)
}

/// Checks that `cert_pem` was signed by `ca_pem` and that `key_pem` is its key.
fn check_pair(ca_pem: &str, cert_pem: &str, key_pem: &str) -> anyhow::Result<()> {
    let ca_der = pem_to_der(ca_pem).context("ca.crt")?;
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der)
        .map_err(|e| anyhow!("ca.crt is not an X.509 certificate: {e}"))?;
    let der = pem_to_der(cert_pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| anyhow!("not an X.509 certificate: {e}"))?;
    cert.verify_signature(Some(ca.public_key()))
        .map_err(|_| anyhow!("it was not issued by this directory's ca.crt"))?;
    let key = KeyPair::from_pem(key_pem).map_err(|e| anyhow!("its key does not parse: {e}"))?;
    if key.public_key_raw() != cert.public_key().subject_public_key.data.as_ref() {
        bail!("its .key file is not the key of its .crt file");
    }
    Ok(())
}

/// A server address of a kubeconfig: `https://HOST:PORT` from `HOST:PORT` (or from itself).
fn server_url(server: &str) -> anyhow::Result<String> {
    let server = server.trim();
    let hostport = match server.split_once("://") {
        None => server,
        Some(("https", rest)) => rest.trim_end_matches('/'),
        Some((scheme, _)) => bail!(
            "--server {server:?}: the servers speak TLS; give HOST:PORT or https://HOST:PORT, \
             not {scheme}://"
        ),
    };
    let port_ok = hostport
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if !port_ok || hostport.contains('/') {
        bail!("--server {server:?} is not HOST:PORT (e.g. 127.0.0.1:7379 or [::1]:7379)");
    }
    Ok(format!("https://{hostport}"))
}

/// A kubeconfig for `user` that trusts `ca_pem` and authenticates with the certificate and
/// key given, its context `USER@flotilla` current. `server` is the first of `servers`; all of
/// them are in the cluster's `flotilla.io/servers` extension (and a comment at the top).
pub fn kubeconfig(
    ca_pem: &str,
    user: &str,
    issued: &Issued,
    servers: &[String],
) -> anyhow::Result<String> {
    let urls = servers
        .iter()
        .filter(|s| !s.trim().is_empty())
        .map(|s| server_url(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let Some(first) = urls.first().cloned() else {
        bail!("--server: give at least one HOST:PORT");
    };
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let context = format!("{user}@{KUBECONFIG_CLUSTER}");
    let servers = serde_json::to_value(kc::ServersExtension {
        servers: urls.clone(),
    })
    .context("writing the servers extension")?;
    let config = kc::KubeConfig {
        api_version: "v1".into(),
        kind: "Config".into(),
        clusters: vec![kc::NamedCluster {
            name: KUBECONFIG_CLUSTER.into(),
            cluster: kc::Cluster {
                server: first,
                certificate_authority_data: Some(b64(ca_pem)),
                extensions: vec![kc::NamedExtension {
                    name: kc::SERVERS_EXTENSION.into(),
                    extension: servers,
                }],
                ..kc::Cluster::default()
            },
        }],
        users: vec![kc::NamedUser {
            name: user.into(),
            user: kc::User {
                client_certificate_data: Some(b64(&issued.cert_pem)),
                client_key_data: Some(b64(&issued.key_pem)),
                ..kc::User::default()
            },
        }],
        contexts: vec![kc::NamedContext {
            name: context.clone(),
            context: kc::Context {
                cluster: KUBECONFIG_CLUSTER.into(),
                user: user.into(),
                namespace: None,
            },
        }],
        current_context: context,
        preferences: kc::Preferences {},
    };
    let yaml = serde_norway::to_string(&config).context("writing the kubeconfig")?;
    Ok(format!(
        "# Flotilla kubeconfig for {user}. Servers, in the order Flotilla's clients try them \
         (kubectl uses `server` only):\n# {}\n{yaml}",
        urls.join(", ")
    ))
}

pub async fn run(args: CertsArgs) -> anyhow::Result<()> {
    match args.command {
        CertsCommand::Init { dir, days, force } => init(&dir, days, force),
        CertsCommand::Issue(a) => issue_cmd(a),
        CertsCommand::Kubeconfig { dir, user, server } => {
            let ca_path = dir.join("ca.crt");
            if !ca_path.exists() {
                bail!(
                    "no CA in {}: {} is missing; create one with `flotilla certs init --dir {}`",
                    dir.display(),
                    ca_path.display(),
                    dir.display()
                );
            }
            let ca_pem = read(&ca_path)?;
            let (cert_path, key_path) = pair_paths(&dir, &user);
            if !cert_path.exists() {
                bail!(
                    "{} is missing; issue it with `flotilla certs issue --dir {} --name {user} \
                     --kind user`",
                    cert_path.display(),
                    dir.display()
                );
            }
            let issued = Issued {
                cert_pem: read(&cert_path)?,
                key_pem: read(&key_path)?,
            };
            check_pair(&ca_pem, &issued.cert_pem, &issued.key_pem)
                .with_context(|| format!("{}", cert_path.display()))?;
            print!("{}", kubeconfig(&ca_pem, &user, &issued, &server)?);
            Ok(())
        }
    }
}

fn init(dir: &Path, days: u32, force: bool) -> anyhow::Result<()> {
    let ca = create_ca(dir, days, force)?;
    let (cert_path, key_path) = pair_paths(dir, "ca");
    println!(
        "wrote {} and {} (valid until {}); keep ca.key secret: whoever holds it can issue any \
         identity",
        cert_path.display(),
        key_path.display(),
        ca.not_after().date()
    );
    Ok(())
}

/// Makes a CA valid for `days` in `dir` (created mode 0700): `ca.crt` and `ca.key`.
/// Refuses to replace one unless `force` (`certs init`, and `flotilla up`'s first start).
pub fn create_ca(dir: &Path, days: u32, force: bool) -> anyhow::Result<Ca> {
    let (cert_path, key_path) = pair_paths(dir, "ca");
    if !force {
        for path in [&cert_path, &key_path] {
            if path.exists() {
                bail!(
                    "{} exists: {} already has a CA; pass --force to replace it (every \
                     certificate it issued will stop being trusted)",
                    path.display(),
                    dir.display()
                );
            }
        }
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let ca = Ca::generate(days)?;
    let issued = Issued {
        cert_pem: ca.cert_pem().to_string(),
        key_pem: ca.key_pem(),
    };
    write_pair(dir, "ca", &issued, force)?;
    Ok(ca)
}

fn issue_cmd(a: IssueArgs) -> anyhow::Result<()> {
    let spec = LeafSpec {
        name: a.name,
        kind: a.kind,
        ips: a.ips,
        dns: a.dns,
        groups: a.groups,
        days: a.days,
    };
    // The name is checked before anything is read, so a bad one never reaches a path.
    check_name(spec.kind, &spec.name)?;
    let ca = Ca::load(&a.dir)?;
    let (cert_path, key_path) = pair_paths(&a.dir, &spec.name);
    let issued = issue(&ca, &spec)?;
    write_pair(&a.dir, &spec.name, &issued, a.force)?;
    let user = match spec.kind {
        Kind::Agent => format!("{NODE_USER_PREFIX}{}", spec.name),
        Kind::Member | Kind::User => spec.name.clone(),
    };
    let kind = match spec.kind {
        Kind::Member => "member",
        Kind::Agent => "agent",
        Kind::User => "user",
    };
    println!(
        "wrote {} and {} ({kind} certificate of user {user}, valid until {})",
        cert_path.display(),
        key_path.display(),
        (OffsetDateTime::now_utc() + Duration::days(i64::from(spec.days))).date()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls_take_host_port_or_https() {
        assert_eq!(
            server_url("127.0.0.1:7379").unwrap(),
            "https://127.0.0.1:7379"
        );
        assert_eq!(server_url("https://a.b:1/").unwrap(), "https://a.b:1");
        assert_eq!(server_url("[::1]:7379").unwrap(), "https://[::1]:7379");
        assert!(server_url("http://a:1").is_err());
        assert!(server_url("a").is_err());
        assert!(server_url("a:0").is_err());
        assert!(server_url(":7379").is_err());
        assert!(server_url("a:1/x").is_err());
    }

    #[test]
    fn names_are_file_names_and_agents_node_names() {
        assert!(check_name(Kind::User, "alice@example.com").is_ok());
        assert!(check_name(Kind::User, "Alice_1").is_ok());
        assert!(check_name(Kind::User, "../x").is_err());
        assert!(check_name(Kind::User, "a/b").is_err());
        assert!(check_name(Kind::User, ".hidden").is_err());
        assert!(check_name(Kind::User, "").is_err());
        assert!(check_name(Kind::Member, "ca").is_err());
        assert!(check_name(Kind::Agent, "worker-1.rack2").is_ok());
        assert!(check_name(Kind::Agent, "Worker_1").is_err());
        assert!(check_name(Kind::Agent, "w-").is_err());
    }

    #[test]
    fn a_leaf_may_not_outlive_its_ca() {
        let ca = Ca::generate(30).unwrap();
        let spec = LeafSpec {
            name: "m1".into(),
            kind: Kind::Member,
            ips: vec![],
            dns: vec![],
            groups: vec![],
            days: 31,
        };
        let err = issue(&ca, &spec).unwrap_err().to_string();
        assert!(err.contains("outlive the CA"), "{err}");
        assert!(issue(&ca, &LeafSpec { days: 29, ..spec }).is_ok());
    }

    #[test]
    fn a_ca_round_trips_through_pem_and_refuses_a_foreign_key() {
        let ca = Ca::generate(10).unwrap();
        let again = Ca::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(
            again.not_after().unix_timestamp(),
            ca.not_after().unix_timestamp()
        );
        let other = Ca::generate(10).unwrap();
        let err = Ca::from_pem(ca.cert_pem(), &other.key_pem()).err().unwrap();
        assert!(err.to_string().contains("not the key"), "{err}");
        let leaf = issue(
            &ca,
            &LeafSpec {
                name: "u".into(),
                kind: Kind::User,
                ips: vec![],
                dns: vec![],
                groups: vec![],
                days: 1,
            },
        )
        .unwrap();
        let err = Ca::from_pem(&leaf.cert_pem, &leaf.key_pem).err().unwrap();
        assert!(err.to_string().contains("not a CA"), "{err}");
    }
}
