//! Encryption at rest, configured as kube-apiserver's `--encryption-provider-config`: an
//! `EncryptionConfiguration` file names, per resource, the providers to use. The first one
//! writes; every one listed reads what it wrote. Providers: `aesgcm` (AES-GCM with a random
//! 96-bit nonce; keys of 16 or 32 bytes, base64) and `identity` (stored as written).
//!
//! A value `aesgcm` writes is `k8s:enc:aesgcm:v1:<key name>:` then the nonce, then the
//! ciphertext and its tag, as Kubernetes writes it; the object's store key is the
//! additional authenticated data, so a value moved under another key does not decrypt.
//! Everything else about an object (its key, revision, size) stays visible in the store.
//!
//! AES and GCM come from `ring` (already the TLS provider): no cryptography is written
//! here.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use flotilla_proto::api::Resource;
use flotilla_proto::mvccpb::KeyValue;
use ring::aead::{AES_128_GCM, AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::Deserialize;

use crate::errors::{ApiError, ApiResult};

const AESGCM_PREFIX: &str = "k8s:enc:aesgcm:v1:";
/// Every provider's prefix starts so: a value without it was stored as written.
const ENCRYPTED_PREFIX: &[u8] = b"k8s:enc:";

/// The encryption of each resource (none unless configured).
pub struct Encryption {
    rules: Vec<Rule>,
    random: SystemRandom,
}

/// The providers of the resources one entry of the file names.
struct Rule {
    /// `secrets`, `deployments.apps`, `*.` (every core resource), `*.apps`, `*.*`.
    resources: Vec<String>,
    providers: Vec<Provider>,
}

enum Provider {
    Identity,
    AesGcm(Vec<AesKey>),
}

struct AesKey {
    name: String,
    key: LessSafeKey,
}

// The file, as kube-apiserver reads it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct File {
    api_version: String,
    kind: String,
    resources: Vec<FileRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRule {
    resources: Vec<String>,
    providers: Vec<FileProvider>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileProvider {
    identity: Option<serde_json::Value>,
    aesgcm: Option<FileKeys>,
    aescbc: Option<serde_json::Value>,
    secretbox: Option<serde_json::Value>,
    kms: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKeys {
    keys: Vec<FileKey>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKey {
    name: String,
    secret: String,
}

impl Default for Encryption {
    /// No encryption: every object is stored as written.
    fn default() -> Self {
        Encryption {
            rules: Vec::new(),
            random: SystemRandom::new(),
        }
    }
}

impl Encryption {
    /// Reads an `EncryptionConfiguration` file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses an `EncryptionConfiguration`; every error names where in the file it is.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: File = serde_norway::from_str(text).map_err(|e| e.to_string())?;
        if file.api_version != "apiserver.config.k8s.io/v1"
            || file.kind != "EncryptionConfiguration"
        {
            return Err(format!(
                "expected apiVersion apiserver.config.k8s.io/v1 and kind EncryptionConfiguration, \
                 got {} {}",
                file.api_version, file.kind
            ));
        }
        let mut seen = BTreeSet::new();
        let mut rules = Vec::new();
        for (i, rule) in file.resources.into_iter().enumerate() {
            let at = format!("resources[{i}]");
            if rule.resources.is_empty() {
                return Err(format!("{at}.resources: must name at least one resource"));
            }
            for r in &rule.resources {
                if !seen.insert(r.clone()) {
                    return Err(format!("{at}.resources: {r:?} is named twice"));
                }
            }
            if rule.providers.is_empty() {
                return Err(format!("{at}.providers: must list at least one provider"));
            }
            let providers = rule
                .providers
                .into_iter()
                .enumerate()
                .map(|(j, p)| provider(p).map_err(|e| format!("{at}.providers[{j}]{e}")))
                .collect::<Result<Vec<_>, _>>()?;
            // A stored value names its key: two keys of one name could not be told apart.
            let mut names = BTreeSet::new();
            for p in &providers {
                if let Provider::AesGcm(keys) = p {
                    for k in keys {
                        if !names.insert(k.name.as_str()) {
                            return Err(format!(
                                "{at}.providers: key name {:?} is used twice",
                                k.name
                            ));
                        }
                    }
                }
            }
            rules.push(Rule {
                resources: rule.resources,
                providers,
            });
        }
        Ok(Encryption {
            rules,
            random: SystemRandom::new(),
        })
    }

    /// The providers of kind `K`: those of the first entry that names it.
    fn providers<K: Resource>(&self) -> &[Provider] {
        let (group, _) = K::API_VERSION.rsplit_once('/').unwrap_or(("", ""));
        let name = if group.is_empty() {
            K::PLURAL.to_string()
        } else {
            format!("{}.{group}", K::PLURAL)
        };
        let matches =
            |r: &str| r == name || r == "*.*" || r.strip_prefix("*.").is_some_and(|g| g == group);
        self.rules
            .iter()
            .find(|rule| rule.resources.iter().any(|r| matches(r)))
            .map_or(&[], |rule| rule.providers.as_slice())
    }

    /// What the store holds for `value`, stored under `key`.
    fn seal<K: Resource>(&self, key: &[u8], value: Vec<u8>) -> ApiResult<Vec<u8>> {
        match self.providers::<K>().first() {
            None | Some(Provider::Identity) => Ok(value),
            Some(Provider::AesGcm(keys)) => {
                // Parsing refuses a provider without keys.
                let Some(k) = keys.first() else {
                    return Ok(value);
                };
                let mut nonce = [0u8; NONCE_LEN];
                self.random.fill(&mut nonce).map_err(|_| {
                    ApiError::Internal("no random numbers for an encryption nonce".into())
                })?;
                let mut sealed = value;
                k.key
                    .seal_in_place_append_tag(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from(key),
                        &mut sealed,
                    )
                    .map_err(|_| ApiError::Internal("encrypting an object failed".into()))?;
                let mut out = format!("{AESGCM_PREFIX}{}:", k.name).into_bytes();
                out.extend_from_slice(&nonce);
                out.extend_from_slice(&sealed);
                Ok(out)
            }
        }
    }

    /// The object bytes of `stored`, stored under `key`.
    fn open<'a, K: Resource>(&self, key: &[u8], stored: &'a [u8]) -> Result<Cow<'a, [u8]>, String> {
        let providers = self.providers::<K>();
        let Some(rest) = stored.strip_prefix(AESGCM_PREFIX.as_bytes()) else {
            if stored.starts_with(ENCRYPTED_PREFIX) {
                let end = stored.len().min(40);
                return Err(format!(
                    "encrypted by a provider not supported here ({})",
                    String::from_utf8_lossy(&stored[..end])
                ));
            }
            if providers.is_empty() || providers.iter().any(|p| matches!(p, Provider::Identity)) {
                return Ok(Cow::Borrowed(stored));
            }
            return Err(format!(
                "stored unencrypted, and --encryption-provider-config lists no identity \
                 provider for {} (list `identity: {{}}` last while existing objects are \
                 rewritten)",
                K::PLURAL
            ));
        };
        let colon = rest
            .iter()
            .position(|b| *b == b':')
            .ok_or("an aesgcm value without a key name")?;
        let name = String::from_utf8_lossy(&rest[..colon]);
        let body = &rest[colon + 1..];
        let aes = providers
            .iter()
            .filter_map(|p| match p {
                Provider::AesGcm(keys) => Some(keys),
                Provider::Identity => None,
            })
            .flatten()
            .find(|k| k.name == name)
            .ok_or_else(|| {
                format!(
                    "encrypted with aesgcm key {name:?}, which --encryption-provider-config \
                     does not list for {}",
                    K::PLURAL
                )
            })?;
        if body.len() < NONCE_LEN {
            return Err("an aesgcm value too short to hold its nonce".into());
        }
        let (nonce, sealed) = body.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| "a bad nonce")?;
        let mut buf = sealed.to_vec();
        let plain = aes
            .key
            .open_in_place(nonce, Aad::from(key), &mut buf)
            .map_err(|_| {
                format!("aesgcm key {name:?} does not decrypt it (wrong key, or damaged)")
            })?;
        let n = plain.len();
        buf.truncate(n);
        Ok(Cow::Owned(buf))
    }

    /// Whether `stored` (a value of kind `K`) is not what a write would store now: encrypted
    /// with another key or provider than the first, or not encrypted where it would be.
    pub(crate) fn is_stale<K: Resource>(&self, stored: &[u8]) -> bool {
        match self.providers::<K>().first() {
            None | Some(Provider::Identity) => stored.starts_with(ENCRYPTED_PREFIX),
            Some(Provider::AesGcm(keys)) => keys.first().is_some_and(|k| {
                !stored.starts_with(format!("{AESGCM_PREFIX}{}:", k.name).as_bytes())
            }),
        }
    }

    /// The object a stored key-value holds, at `revision`.
    pub(crate) fn decode<K: Resource>(&self, kv: &KeyValue, revision: i64) -> ApiResult<K> {
        let problem = |e: String| {
            ApiError::Internal(format!(
                "stored object {} does not decode: {e}",
                String::from_utf8_lossy(&kv.key)
            ))
        };
        let bytes = self.open::<K>(&kv.key, &kv.value).map_err(problem)?;
        let mut object = K::decode(bytes.as_ref()).map_err(|e| problem(e.to_string()))?;
        object.set_type_meta();
        object.metadata_mut().resource_version = revision.to_string();
        Ok(object)
    }

    /// What the store holds for `object` under `key` (its resourceVersion is left out).
    pub(crate) fn encode<K: Resource>(&self, key: &[u8], object: &K) -> ApiResult<Vec<u8>> {
        let mut copy = object.clone();
        copy.metadata_mut().resource_version.clear();
        self.seal::<K>(key, copy.encode_to_vec())
    }
}

fn provider(p: FileProvider) -> Result<Provider, String> {
    let FileProvider {
        identity,
        aesgcm,
        aescbc,
        secretbox,
        kms,
    } = p;
    let given = [
        identity.is_some(),
        aesgcm.is_some(),
        aescbc.is_some(),
        secretbox.is_some(),
        kms.is_some(),
    ];
    if given.iter().filter(|g| **g).count() != 1 {
        return Err(": must name exactly one provider (identity or aesgcm)".into());
    }
    if identity.is_some() {
        return Ok(Provider::Identity);
    }
    let Some(aesgcm) = aesgcm else {
        let name = if aescbc.is_some() {
            "aescbc"
        } else if secretbox.is_some() {
            "secretbox"
        } else {
            "kms"
        };
        return Err(format!(
            ".{name}: not supported here; use aesgcm (or identity)"
        ));
    };
    if aesgcm.keys.is_empty() {
        return Err(".aesgcm.keys: must hold at least one key".into());
    }
    let mut names = BTreeSet::new();
    let mut keys = Vec::new();
    for (i, k) in aesgcm.keys.into_iter().enumerate() {
        let at = format!(".aesgcm.keys[{i}]");
        if k.name.is_empty() || k.name.contains(':') {
            return Err(format!("{at}.name: must be set, without ':'"));
        }
        if !names.insert(k.name.clone()) {
            return Err(format!("{at}.name: {:?} is used twice", k.name));
        }
        let secret = STANDARD
            .decode(k.secret.trim())
            .map_err(|e| format!("{at}.secret: not base64: {e}"))?;
        let algorithm = match secret.len() {
            16 => &AES_128_GCM,
            32 => &AES_256_GCM,
            n => {
                return Err(format!(
                    "{at}.secret: {n} bytes; an aesgcm key here is 16 or 32 bytes \
                     (`head -c 32 /dev/urandom | base64`)"
                ));
            }
        };
        let key = UnboundKey::new(algorithm, &secret)
            .map_err(|_| format!("{at}.secret: not a usable AES key"))?;
        keys.push(AesKey {
            name: k.name,
            key: LessSafeKey::new(key),
        });
    }
    Ok(Provider::AesGcm(keys))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::api::{ConfigMap, Deployment, ObjectMeta, Secret};
    use prost::Message;

    const KEY1: &str = "c2VjcmV0IGlzIHNlY3VyZSwgMzIgYnl0ZXMgbG9uZyE="; // 32 bytes
    const KEY2: &str = "MTYgYnl0ZSBrZXkhISEhIQ=="; // 16 bytes

    fn config(providers: &str) -> Encryption {
        Encryption::parse(&format!(
            "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\n\
             resources:\n- resources: [secrets]\n  providers:\n{providers}"
        ))
        .unwrap()
    }

    fn aesgcm(names: &[(&str, &str)]) -> String {
        let mut s = "  - aesgcm:\n      keys:\n".to_string();
        for (n, k) in names {
            s.push_str(&format!("      - name: {n}\n        secret: {k}\n"));
        }
        s
    }

    fn secret() -> Secret {
        Secret {
            metadata: Some(ObjectMeta {
                name: "db".into(),
                namespace: "default".into(),
                ..Default::default()
            }),
            data: [("password".to_string(), b"hunter2".to_vec())].into(),
            ..Default::default()
        }
    }

    fn kv(key: &[u8], value: Vec<u8>) -> KeyValue {
        KeyValue {
            key: key.to_vec(),
            value,
            mod_revision: 7,
            ..Default::default()
        }
    }

    #[test]
    fn secrets_are_sealed_with_the_first_key_and_read_with_any_listed() {
        let key = b"/registry/secrets/default/db";
        let old = config(&aesgcm(&[("key1", KEY1)]));
        let stored = old.encode(key, &secret()).unwrap();
        assert!(stored.starts_with(b"k8s:enc:aesgcm:v1:key1:"));
        assert!(!stored.windows(7).any(|w| w == b"hunter2"));
        // Two writes of one object differ (a fresh nonce each).
        assert_ne!(stored, old.encode(key, &secret()).unwrap());
        let back: Secret = old.decode(&kv(key, stored.clone()), 7).unwrap();
        assert_eq!(back.data["password"], b"hunter2");
        assert_eq!(back.metadata.unwrap().resource_version, "7");

        // Rotation: a new first key writes; the old one, listed second, still reads.
        let rotated = config(&aesgcm(&[("key2", KEY2), ("key1", KEY1)]));
        let again: Secret = rotated.decode(&kv(key, stored.clone()), 7).unwrap();
        assert_eq!(again.data["password"], b"hunter2");
        assert!(
            rotated
                .encode(key, &secret())
                .unwrap()
                .starts_with(b"k8s:enc:aesgcm:v1:key2:")
        );

        // Moved under another key, it does not decrypt.
        let e = old
            .decode::<Secret>(&kv(b"/registry/secrets/default/other", stored.clone()), 7)
            .unwrap_err();
        assert!(e.to_string().contains("does not decrypt"), "{e}");
        // A key no longer listed: said plainly.
        let e = config(&aesgcm(&[("key2", KEY2)]))
            .decode::<Secret>(&kv(key, stored), 7)
            .unwrap_err();
        assert!(e.to_string().contains("aesgcm key \"key1\""), "{e}");
    }

    #[test]
    fn plaintext_reads_only_where_identity_is_listed_and_other_kinds_are_untouched() {
        let key = b"/registry/secrets/default/db";
        let plain = Encryption::default().encode(key, &secret()).unwrap();
        let migrating = config(&format!(
            "{}  - identity: {{}}\n",
            aesgcm(&[("key1", KEY1)])
        ));
        let s: Secret = migrating.decode(&kv(key, plain.clone()), 7).unwrap();
        assert_eq!(s.data["password"], b"hunter2");
        let e = config(&aesgcm(&[("key1", KEY1)]))
            .decode::<Secret>(&kv(key, plain), 7)
            .unwrap_err();
        assert!(e.to_string().contains("no identity provider"), "{e}");
        // A kind the file does not name is stored as written.
        let cm = ConfigMap {
            metadata: Some(ObjectMeta {
                name: "c".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let stored = migrating
            .encode(b"/registry/configmaps/default/c", &cm)
            .unwrap();
        assert_eq!(stored, cm.encode_to_vec());
    }

    #[test]
    fn group_and_wildcard_resources_match_as_kubernetes_names_them() {
        let file = |resources: &str| {
            Encryption::parse(&format!(
                "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\n\
                 resources:\n- resources: {resources}\n  providers:\n{}",
                aesgcm(&[("k", KEY1)])
            ))
            .unwrap()
        };
        let sealed = |e: &Encryption| {
            matches!(
                e.providers::<Deployment>().first(),
                Some(Provider::AesGcm(_))
            )
        };
        assert!(sealed(&file("[deployments.apps]")));
        assert!(sealed(&file("['*.apps']")));
        assert!(sealed(&file("['*.*']")));
        assert!(!sealed(&file("['*.']")));
        assert!(!sealed(&file("[deployments]")));
        assert!(matches!(
            file("['*.']").providers::<Secret>().first(),
            Some(Provider::AesGcm(_))
        ));
    }

    #[test]
    fn bad_files_are_refused_naming_the_field() {
        let head = "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\n";
        for (body, want) in [
            (
                "resources:\n- resources: [secrets]\n  providers:\n  - aescbc:\n      keys: []\n",
                "resources[0].providers[0].aescbc: not supported here",
            ),
            (
                "resources:\n- resources: [secrets]\n  providers:\n  - aesgcm:\n      keys:\n      - name: k\n        secret: c2hvcnQ=\n",
                "resources[0].providers[0].aesgcm.keys[0].secret: 5 bytes",
            ),
            (
                "resources:\n- resources: [secrets]\n  providers: []\n",
                "resources[0].providers: must list at least one provider",
            ),
            (
                "resources:\n- resources: [secrets]\n  providers:\n  - identity: {}\n    aesgcm: {keys: []}\n",
                "must name exactly one provider",
            ),
            (
                "resources:\n- resources: [secrets]\n  providerz: []\n",
                "unknown field",
            ),
            (
                "resources:\n- resources: [secrets]\n  providers:\n  - aesgcm:\n      keys:\n      - {name: k, secret: MTYgYnl0ZSBrZXkhISEhIQ==}\n  - aesgcm:\n      keys:\n      - {name: k, secret: MTYgYnl0ZSBrZXkhISEhIQ==}\n",
                "resources[0].providers: key name \"k\" is used twice",
            ),
        ] {
            let e = Encryption::parse(&format!("{head}{body}")).err().unwrap();
            assert!(e.contains(want), "{want} in {e}");
        }
        let e = Encryption::parse("apiVersion: v1\nkind: Secret\nresources: []\n")
            .err()
            .unwrap();
        assert!(e.contains("EncryptionConfiguration"), "{e}");
    }
}
