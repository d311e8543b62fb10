//! A pod's volumes, as the kubelet makes them, under `<data-dir>/pods/<uid>/volumes/<name>`.
//!
//! - `emptyDir`: a directory that lives and dies with the pod; `medium: Memory` is a tmpfs
//!   (of `sizeLimit`, else half the node's memory), which needs the agent to run as root.
//! - `hostPath`: the node's own path; `DirectoryOrCreate` and `FileOrCreate` make it,
//!   `Directory` and `File` check it.
//! - `configMap`, `secret`, `downwardAPI`, `projected` (several of those in one
//!   directory): files projected from the source, written as the
//!   kubelet's atomic writer does: into a fresh hidden directory, then one `rename` of the
//!   `..data` symlink to it, so a reader sees either the old files or the new ones, never
//!   a mix; each top-level name is a symlink through `..data`. They are written again when
//!   their source changes ([`PodVolumes::refresh`]).
//!
//! A container's `volumeMounts` become [`Mount`]s for its runtime: the host path (joined
//! with `subPath`) and the path in the container.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use flotilla_proto::api::{ConfigMap, Container, KeyToPath, Pod, Resource, Secret, Volume};

use crate::env::Context;

/// One directory or file of the node mounted into a container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub host_path: PathBuf,
    pub container_path: String,
    pub read_only: bool,
}

/// Files of a projected volume: relative path → (bytes, mode).
type Files = BTreeMap<String, (Vec<u8>, u32)>;

const DEFAULT_MODE: u32 = 0o644;
const DATA: &str = "..data";

/// The volumes of one pod on this node.
pub struct PodVolumes {
    root: PathBuf,
    /// Per projected volume, the files last written (written again only when they change).
    written: BTreeMap<String, Files>,
    /// tmpfs mounted for `emptyDir.medium: Memory`, unmounted when the pod goes.
    tmpfs: Vec<PathBuf>,
}

fn volume_error(name: &str, message: impl std::fmt::Display) -> String {
    format!("MountVolume.SetUp failed for volume {name:?}: {message}")
}

impl PodVolumes {
    /// The volumes of a pod, kept under `root` (`<pods dir>/<uid>/volumes`).
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            written: BTreeMap::new(),
            tmpfs: Vec::new(),
        }
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Makes every volume of the pod (those already made are left, projected ones are
    /// brought up to date). `Err` is the kubelet's `MountVolume.SetUp failed` message.
    pub async fn prepare(&mut self, cx: &Context<'_>) -> Result<(), String> {
        let volumes = cx
            .pod
            .spec
            .as_ref()
            .map(|s| s.volumes.clone())
            .unwrap_or_default();
        // Only root on the node reads what the pod's volumes hold (Secrets among them).
        private_dir(&self.root).map_err(|e| format!("MountVolume.SetUp failed: {e}"))?;
        for v in &volumes {
            if let Some(e) = &v.empty_dir {
                let dir = self.dir(&v.name);
                if !dir.exists() {
                    fs::create_dir(&dir).map_err(|e| volume_error(&v.name, e))?;
                    // Any user of the container may write it, as in Kubernetes.
                    fs::set_permissions(&dir, fs::Permissions::from_mode(0o777))
                        .map_err(|e| volume_error(&v.name, e))?;
                }
                // A tmpfs from before (an agent restart) is kept; a failed mount is tried again.
                if e.medium == "Memory" && !self.tmpfs.contains(&dir) {
                    if !is_tmpfs(&dir) {
                        mount_tmpfs(&dir, &e.size_limit).map_err(|e| volume_error(&v.name, e))?;
                    }
                    self.tmpfs.push(dir);
                }
            } else if let Some(h) = &v.host_path {
                host_path(&h.path, &h.r#type).map_err(|e| volume_error(&v.name, e))?;
            }
        }
        self.refresh(cx, &volumes).await
    }

    /// Writes the projected volumes whose source changed since they were last written;
    /// one that fails does not hold the others back (the first failure is returned).
    pub async fn refresh(&mut self, cx: &Context<'_>, volumes: &[Volume]) -> Result<(), String> {
        let mut first = Ok(());
        for v in volumes {
            let files = match projected(cx, v).await {
                Ok(Some(files)) => files,
                Ok(None) => continue,
                Err(e) => {
                    first = first.and(Err(e));
                    continue;
                }
            };
            if self.written.get(&v.name) == Some(&files) {
                continue;
            }
            match write_atomically(&self.dir(&v.name), &files) {
                Ok(()) => {
                    self.written.insert(v.name.clone(), files);
                }
                Err(e) => first = first.and(Err(volume_error(&v.name, e))),
            }
        }
        first
    }

    /// Whether the pod has volumes whose files follow a source.
    pub fn has_projected(pod: &Pod) -> bool {
        pod.spec.as_ref().is_some_and(|s| {
            s.volumes.iter().any(|v| {
                v.config_map.is_some()
                    || v.secret.is_some()
                    || v.downward_api.is_some()
                    || v.projected.is_some()
            })
        })
    }

    /// The mounts of container `c`; `Err` names a subPath that cannot be mounted.
    pub fn mounts(&self, pod: &Pod, c: &Container) -> Result<Vec<Mount>, String> {
        let volumes = pod
            .spec
            .as_ref()
            .map(|s| s.volumes.as_slice())
            .unwrap_or_default();
        c.volume_mounts
            .iter()
            .filter_map(|m| {
                let v = volumes.iter().find(|v| v.name == m.name)?;
                let base = match &v.host_path {
                    Some(h) => PathBuf::from(&h.path),
                    None => self.dir(&v.name),
                };
                let host_path = if m.sub_path.is_empty() {
                    base
                } else {
                    // The kubelet makes a missing subPath of a writable volume.
                    let create = v.empty_dir.is_some() || v.host_path.is_some();
                    match resolve_sub_path(&base, &m.sub_path, create) {
                        Ok(p) => p,
                        Err(e) => {
                            return Some(Err(format!(
                                "failed to prepare subPath {:?} of volume {:?}: {e}",
                                m.sub_path, v.name
                            )));
                        }
                    }
                };
                Some(Ok(Mount {
                    host_path,
                    container_path: m.mount_path.clone(),
                    // Projected volumes are read-only, as the kubelet mounts them.
                    read_only: m.read_only
                        || v.config_map.is_some()
                        || v.secret.is_some()
                        || v.downward_api.is_some()
                        || v.projected.is_some(),
                }))
            })
            .collect()
    }

    /// Removes the pod's volumes (after its containers are gone). hostPath volumes are the
    /// node's and stay.
    pub fn remove(&mut self) {
        self.tmpfs.clear();
        self.written.clear();
        if let Some(pod_dir) = self.root.parent() {
            remove_pod_dir(pod_dir);
        }
    }
}

/// The files a projected volume should hold now, or `None` for other volumes.
async fn projected(cx: &Context<'_>, v: &Volume) -> Result<Option<Files>, String> {
    let mode_or = |m: Option<i32>| m.map(|m| m as u32).unwrap_or(DEFAULT_MODE);
    if let Some(c) = &v.config_map {
        let mode = mode_or(c.default_mode);
        let optional = c.optional == Some(true);
        return config_map_files(cx, &v.name, &c.name, &c.items, mode, optional)
            .await
            .map(Some);
    }
    if let Some(s) = &v.secret {
        let mode = mode_or(s.default_mode);
        let optional = s.optional == Some(true);
        return secret_files(cx, &v.name, &s.secret_name, &s.items, mode, optional)
            .await
            .map(Some);
    }
    if let Some(d) = &v.downward_api {
        return downward_files(cx, &v.name, &d.items, mode_or(d.default_mode))
            .await
            .map(Some);
    }
    if let Some(p) = &v.projected {
        let mode = mode_or(p.default_mode);
        let mut files = Files::new();
        for src in &p.sources {
            let more = if let Some(c) = &src.config_map {
                let optional = c.optional == Some(true);
                config_map_files(cx, &v.name, &c.name, &c.items, mode, optional).await?
            } else if let Some(s) = &src.secret {
                let optional = s.optional == Some(true);
                secret_files(cx, &v.name, &s.name, &s.items, mode, optional).await?
            } else if let Some(d) = &src.downward_api {
                downward_files(cx, &v.name, &d.items, mode).await?
            } else {
                continue;
            };
            files.extend(more);
        }
        return Ok(Some(files));
    }
    Ok(None)
}

async fn config_map_files(
    cx: &Context<'_>,
    volume: &str,
    name: &str,
    items: &[KeyToPath],
    mode: u32,
    optional: bool,
) -> Result<Files, String> {
    let ns = cx.pod.namespace();
    match crate::env::fetch::<ConfigMap>(cx, name).await? {
        None if optional => Ok(Files::new()),
        None => Err(volume_error(
            volume,
            format!("configmap {name:?} not found"),
        )),
        Some(cm) => {
            let mut all: BTreeMap<String, Vec<u8>> = cm
                .data
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect();
            all.extend(cm.binary_data);
            pick(volume, &all, items, mode, optional, || {
                format!("ConfigMap {ns}/{name}")
            })
        }
    }
}

async fn secret_files(
    cx: &Context<'_>,
    volume: &str,
    name: &str,
    items: &[KeyToPath],
    mode: u32,
    optional: bool,
) -> Result<Files, String> {
    let ns = cx.pod.namespace();
    match crate::env::fetch::<Secret>(cx, name).await? {
        None if optional => Ok(Files::new()),
        None => Err(volume_error(volume, format!("secret {name:?} not found"))),
        Some(secret) => pick(volume, &secret.data, items, mode, optional, || {
            format!("Secret {ns}/{name}")
        }),
    }
}

async fn downward_files(
    cx: &Context<'_>,
    volume: &str,
    items: &[flotilla_proto::api::DownwardApiVolumeFile],
    mode: u32,
) -> Result<Files, String> {
    let first = cx
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first().cloned())
        .unwrap_or_default();
    let mut files = Files::new();
    for item in items {
        let value = if let Some(f) = &item.field_ref {
            downward_field(cx, &f.field_path).map_err(|e| volume_error(volume, e))?
        } else if let Some(r) = &item.resource_field_ref {
            crate::env::resource(cx, &first, r)
                .await
                .map_err(|e| volume_error(volume, e))?
        } else {
            continue;
        };
        let mode = item.mode.map(|m| m as u32).unwrap_or(mode);
        files.insert(item.path.clone(), (value.into_bytes(), mode));
    }
    Ok(files)
}

/// A downward API file's content: a field of the pod; all labels or annotations are
/// `key="value"` lines, sorted, as the kubelet writes them.
fn downward_field(cx: &Context<'_>, path: &str) -> Result<String, String> {
    let meta = cx.pod.metadata.clone().unwrap_or_default();
    let lines = |map: &BTreeMap<String, String>| {
        map.iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    match path {
        "metadata.labels" => Ok(lines(&meta.labels)),
        "metadata.annotations" => Ok(lines(&meta.annotations)),
        other => crate::env::field(cx, other),
    }
}

/// The keys `items` asks for (every key at its own name when empty).
fn pick(
    volume: &str,
    all: &BTreeMap<String, Vec<u8>>,
    items: &[KeyToPath],
    mode: u32,
    optional: bool,
    source: impl Fn() -> String,
) -> Result<Files, String> {
    if items.is_empty() {
        return Ok(all
            .iter()
            .map(|(k, v)| (k.clone(), (v.clone(), mode)))
            .collect());
    }
    let mut files = Files::new();
    for item in items {
        match all.get(&item.key) {
            Some(bytes) => {
                let mode = item.mode.map(|m| m as u32).unwrap_or(mode);
                files.insert(item.path.clone(), (bytes.clone(), mode));
            }
            None if optional => {}
            None => {
                return Err(volume_error(
                    volume,
                    format!("couldn't find key {} in {}", item.key, source()),
                ));
            }
        }
    }
    Ok(files)
}

/// Writes `files` into `dir` as the kubelet's atomic writer does: a fresh hidden
/// directory, the `..data` symlink swapped to it with one rename, a symlink through
/// `..data` per top-level name, then the old directory and stale names removed.
pub fn write_atomically(dir: &Path, files: &Files) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let result = write_generation(dir, files);
    if let Err((fresh, e)) = result {
        // A generation half written (Secret bytes among it) is not left behind.
        let _ = fs::remove_dir_all(fresh);
        return Err(e);
    }
    Ok(())
}

/// One generation: `Err` carries the directory to remove (a fresh one never swapped in).
fn write_generation(dir: &Path, files: &Files) -> Result<(), (PathBuf, io::Error)> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let stamp = format!(
        "..{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    );
    let fresh = dir.join(&stamp);
    let written = (|| -> io::Result<()> {
        fs::create_dir(&fresh)?;
        for (path, (bytes, mode)) in files {
            let target = fresh.join(path);
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent)?;
            }
            // Created with its mode: never readable by others, even for an instant.
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(*mode)
                .open(&target)?
                .write_all(bytes)?;
            fs::set_permissions(&target, fs::Permissions::from_mode(*mode))?;
        }
        let tmp = dir.join("..data_tmp");
        let _ = fs::remove_file(&tmp);
        symlink(&stamp, &tmp)
    })();
    if let Err(e) = written {
        return Err((fresh, e));
    }
    let old = fs::read_link(dir.join(DATA)).ok();
    let gone = |e| (PathBuf::new(), e);
    fs::rename(dir.join("..data_tmp"), dir.join(DATA)).map_err(|e| (fresh.clone(), e))?;
    let top: std::collections::BTreeSet<String> = files
        .keys()
        .filter_map(|p| p.split('/').next().map(str::to_string))
        .collect();
    for name in &top {
        let link = dir.join(name);
        if fs::symlink_metadata(&link).is_err() {
            symlink(Path::new(DATA).join(name), &link).map_err(gone)?;
        }
    }
    for entry in fs::read_dir(dir).map_err(gone)?.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if !name.starts_with("..") && !top.contains(&name) {
            let _ = fs::remove_file(entry.path());
        }
    }
    if let Some(old) = old
        && old != Path::new(&stamp)
    {
        let _ = fs::remove_dir_all(dir.join(old));
    }
    Ok(())
}

/// Makes `dir` (and what leads to it) readable by root only.
fn private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    // The pods' directory too, when it was made before with the default mode.
    if let Some(pods) = dir.parent().and_then(Path::parent) {
        fs::set_permissions(pods, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Whether `dir` is a tmpfs mount point.
fn is_tmpfs(dir: &Path) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(path.as_ptr(), &mut st) == 0 && st.f_type as i64 == TMPFS_MAGIC
    }
}

/// Removes a pod's directory (`<pods dir>/<uid>`), unmounting its tmpfs volumes first; for
/// a pod gone while the agent was down too.
pub fn remove_pod_dir(pod_dir: &Path) {
    if let Ok(volumes) = fs::read_dir(pod_dir.join("volumes")) {
        for v in volumes.flatten() {
            if is_tmpfs(&v.path()) {
                unmount(&v.path());
            }
        }
    }
    let _ = fs::remove_dir_all(pod_dir);
}

/// `base/sub` with every symlink resolved, refused if it leads out of `base` (a container
/// that can write the volume could plant a symlink to reach the node's files), as the
/// kubelet checks a subPath; with `create`, missing directories are made one by one, each
/// only inside `base`. (The kubelet also holds the resolved path open until it is bound;
/// here a container that swaps a checked directory for a symlink in the instant before the
/// bind could still win: see docs/security.md.)
pub fn resolve_sub_path(base: &Path, sub: &str, create: bool) -> io::Result<PathBuf> {
    use std::path::Component;
    let base = base.canonicalize()?;
    let mut p = base.clone();
    for part in Path::new(sub).components() {
        let name = match part {
            Component::Normal(name) => name,
            Component::CurDir => continue,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a subPath is relative, without '..'",
                ));
            }
        };
        let next = p.join(name);
        if create && fs::symlink_metadata(&next).is_err() {
            fs::create_dir(&next)?;
        }
        p = next.canonicalize()?;
        if !p.starts_with(&base) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("it leads out of the volume (to {})", p.display()),
            ));
        }
    }
    Ok(p)
}

/// Makes or checks a hostPath volume's path as its type says.
fn host_path(path: &str, kind: &str) -> io::Result<()> {
    let p = Path::new(path);
    let missing = |what: &str| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("hostPath type check failed: {path} is not a {what}"),
        )
    };
    match kind {
        "DirectoryOrCreate" => fs::create_dir_all(p),
        "Directory" if p.is_dir() => Ok(()),
        "Directory" => Err(missing("directory")),
        "FileOrCreate" if p.exists() => Ok(()),
        "FileOrCreate" => fs::write(p, b"").map(|_| ()),
        "File" if p.is_file() => Ok(()),
        "File" => Err(missing("file")),
        _ => Ok(()),
    }
}

fn mount_tmpfs(dir: &Path, size_limit: &str) -> io::Result<()> {
    use std::ffi::CString;
    let bytes = flotilla_proto::api::quantity::parse_bytes(size_limit)
        .ok()
        .filter(|b| *b > 0);
    let options = match bytes {
        Some(b) => format!("size={b}"),
        None => "size=50%".to_string(),
    };
    let target = CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let data = CString::new(options).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!(
                "mounting a tmpfs (emptyDir medium Memory) needs the agent to run as root: {e}"
            ),
        ));
    }
    Ok(())
}

fn unmount(dir: &Path) {
    if let Ok(target) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) {
        // SAFETY: a valid NUL-terminated path; failure leaves the mount (reported nowhere).
        unsafe {
            libc::umount2(target.as_ptr(), libc::MNT_DETACH);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(pairs: &[(&str, &str)]) -> Files {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), (v.as_bytes().to_vec(), 0o644)))
            .collect()
    }

    #[test]
    fn projected_files_are_swapped_in_at_once_and_stale_names_go() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("config");
        write_atomically(&dir, &files(&[("a.conf", "one"), ("sub/b", "two")])).unwrap();
        assert_eq!(fs::read_to_string(dir.join("a.conf")).unwrap(), "one");
        assert_eq!(fs::read_to_string(dir.join("sub/b")).unwrap(), "two");
        assert!(
            fs::symlink_metadata(dir.join("a.conf"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        let first = fs::read_link(dir.join(DATA)).unwrap();

        write_atomically(&dir, &files(&[("a.conf", "uno"), ("c", "tres")])).unwrap();
        assert_eq!(fs::read_to_string(dir.join("a.conf")).unwrap(), "uno");
        assert_eq!(fs::read_to_string(dir.join("c")).unwrap(), "tres");
        assert!(
            !dir.join("sub").exists(),
            "a name no longer in the source goes"
        );
        assert!(!dir.join(&first).exists(), "the old generation is removed");
        let names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| !n.starts_with(".."))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(names, ["a.conf", "c"]);
        let mode = fs::metadata(dir.join("c")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
    }

    #[test]
    fn a_sub_path_never_leads_out_of_its_volume() {
        let tmp = tempfile::tempdir().unwrap();
        let vol = tmp.path().join("scratch");
        fs::create_dir(&vol).unwrap();
        let secret = tmp.path().join("node-secret");
        fs::create_dir(&secret).unwrap();
        // What a container that can write the volume could plant.
        symlink(&secret, vol.join("out")).unwrap();
        symlink("/", vol.join("root")).unwrap();
        for sub in ["out", "root", "out/deeper", "root/etc"] {
            let e = resolve_sub_path(&vol, sub, true).unwrap_err();
            assert!(
                e.to_string().contains("leads out of the volume"),
                "{sub}: {e}"
            );
        }
        assert!(
            !secret.join("deeper").exists(),
            "nothing made outside the volume"
        );
        // Inside: made as needed; a symlink that stays inside is fine (a ConfigMap's keys
        // are symlinks through ..data).
        let made = resolve_sub_path(&vol, "a/b", true).unwrap();
        assert!(made.is_dir() && made.starts_with(vol.canonicalize().unwrap()));
        symlink("a", vol.join("inside")).unwrap();
        assert_eq!(resolve_sub_path(&vol, "inside/b", false).unwrap(), made);
        assert!(resolve_sub_path(&vol, "missing", false).is_err());
    }

    #[test]
    fn items_pick_keys_and_a_missing_key_is_an_error_unless_optional() {
        let all: BTreeMap<String, Vec<u8>> = [
            ("k".to_string(), b"v".to_vec()),
            ("x".to_string(), b"y".to_vec()),
        ]
        .into();
        let item = |key: &str, path: &str| KeyToPath {
            key: key.into(),
            path: path.into(),
            mode: Some(0o600),
        };
        let picked = pick("cfg", &all, &[item("k", "dir/k.txt")], 0o644, false, || {
            "ConfigMap d/c".into()
        })
        .unwrap();
        assert_eq!(
            picked,
            [("dir/k.txt".to_string(), (b"v".to_vec(), 0o600))].into()
        );
        let e = pick("cfg", &all, &[item("nope", "n")], 0o644, false, || {
            "ConfigMap d/c".into()
        })
        .unwrap_err();
        assert_eq!(
            e,
            "MountVolume.SetUp failed for volume \"cfg\": couldn't find key nope in ConfigMap d/c"
        );
        assert!(
            pick("cfg", &all, &[item("nope", "n")], 0o644, true, || {
                String::new()
            })
            .unwrap()
            .is_empty()
        );
        assert_eq!(
            pick("cfg", &all, &[], 0o640, false, String::new)
                .unwrap()
                .len(),
            2
        );
    }
}
