//! The on-disk key store.
//!
//! ```text
//! /var/lib/wgmesh/            0700
//!   state.json                0600  which keys exist and their roles (the commit point)
//!   key-<generation>.key      0600  a private key, base64 + newline (`wg genkey` format)
//!   audit.jsonl               0600  the hash-chained audit log (see `audit`)
//!   audit.head                0600  {"seq":N,"hash":"…"}: the end of the chain
//!   .lock                     0600  flock: one writer at a time (agent and CLI)
//! ```
//!
//! Key files are named by generation, so a rotation step changes roles by
//! rewriting `state.json` alone: every write is a single atomic rename (temp file,
//! fsync, rename, fsync of the directory), and a crash leaves either the old or
//! the new state. A key file that no state references (left by a crash between
//! writing it and committing `state.json`, or before its destruction finished) is
//! an orphan: `keys show` reports it and the next key operation destroys it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::audit::{self, AuditRecord, Context, Entry, EventKind, Head, VerifyError};
use super::rotation::{KeyMeta, KeyState, RotationError, Transition};
use super::{KeyError, PrivateKey};

/// Where the store lives unless configured otherwise.
pub const DEFAULT_DIR: &str = "/var/lib/wgmesh";
/// `state.json`'s format version.
pub const FORMAT: u32 = 1;

const STATE_FILE: &str = "state.json";
const AUDIT_FILE: &str = "audit.jsonl";
const HEAD_FILE: &str = "audit.head";
const LOCK_FILE: &str = ".lock";

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Everything that can go wrong with the store. Messages name the file and the
/// fix; none ever contains key material.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no key store at {dir}: run `wgmesh keys init --store {dir}` first")]
    NotInitialized { dir: PathBuf },
    #[error("a key store already exists at {dir} (active key {fingerprint}, generation {generation}); use `wgmesh keys rotate` for a new key, or `--if-missing` to accept the existing one")]
    AlreadyInitialized {
        dir: PathBuf,
        fingerprint: String,
        generation: u64,
    },
    #[error("{file} is readable or writable by group/others (mode {mode:04o}); a key must be 0600. Fix: `chmod 600 {file}`, then consider the key exposed and run `wgmesh keys revoke --reason ...`")]
    InsecurePermissions { file: PathBuf, mode: u32 },
    #[error("{file} is corrupt: {detail}. Fix: {fix}")]
    Corrupt {
        file: PathBuf,
        detail: String,
        fix: String,
    },
    #[error("{file}: {source}")]
    Io {
        file: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Rotation(#[from] RotationError),
    #[error("the audit log {file} does not verify, so no key operation will append to it: {error}. Inspect it with `wgmesh keys audit verify`")]
    AuditBroken { file: PathBuf, error: VerifyError },
}

/// The contents of `state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    format: u32,
    node: String,
    #[serde(flatten)]
    keys: KeyState,
}

/// An opened key store. Holds metadata only; private keys are read from disk when
/// asked for and zeroized when dropped.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    node: String,
    state: KeyState,
    orphans: Vec<PathBuf>,
}

/// How an operation is attributed in the audit log.
#[derive(Debug, Clone)]
pub struct Attribution {
    pub actor: String,
    pub reason: String,
}

impl Store {
    /// Creates the store with a fresh key (generation 1).
    pub fn init(dir: &Path, node: &str, who: &Attribution) -> Result<Self> {
        create_dir_0700(dir)?;
        let _lock = lock(dir)?;
        if dir.join(STATE_FILE).exists() {
            let existing = Self::load(dir)?;
            return Err(StoreError::AlreadyInitialized {
                dir: dir.to_path_buf(),
                fingerprint: existing.state.active.fingerprint.to_string(),
                generation: existing.state.active.generation,
            });
        }
        // A half-finished earlier init may have left a log: never overwrite history.
        let head = read_verified_head(dir)?;
        let now = now_seconds();
        let key = PrivateKey::generate();
        let meta = KeyMeta::new(1, now, key.public_key());
        write_key(dir, &meta, &key)?;
        let (state, events) = KeyState::initial(meta);
        let store = Self {
            dir: dir.to_path_buf(),
            node: node.to_string(),
            state,
            orphans: Vec::new(),
        };
        store.commit_state()?;
        store.append(&head, who, now, events.iter().map(Entry::from_key_event))?;
        Ok(store)
    }

    /// Opens an existing store, refusing insecure or corrupt key files.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.join(STATE_FILE).exists() {
            return Err(StoreError::NotInitialized {
                dir: dir.to_path_buf(),
            });
        }
        Self::load(dir)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn state(&self) -> &KeyState {
        &self.state
    }

    /// Key files present on disk that no state references.
    pub fn orphans(&self) -> &[PathBuf] {
        &self.orphans
    }

    pub fn audit_path(&self) -> PathBuf {
        self.dir.join(AUDIT_FILE)
    }

    /// The active private key, read from disk.
    pub fn active_private(&self) -> Result<PrivateKey> {
        read_key(&self.dir, &self.state.active)
    }

    /// The staged next private key, if a rotation is staged.
    pub fn staged_private(&self) -> Result<Option<PrivateKey>> {
        self.state
            .staged
            .as_ref()
            .map(|m| read_key(&self.dir, m))
            .transpose()
    }

    /// Generates the next key and stages it.
    pub fn stage(&mut self, who: &Attribution) -> Result<()> {
        self.mutate(who, |state, now| {
            let key = PrivateKey::generate();
            let meta = KeyMeta::new(state.next_generation(), now, key.public_key());
            let t = state.stage(meta.clone())?;
            Ok((t, Some((meta, key))))
        })
    }

    /// Makes the staged key the active one.
    pub fn activate(&mut self, who: &Attribution) -> Result<()> {
        self.mutate(who, |state, _| Ok((state.activate()?, None)))
    }

    /// Destroys the previous key after an activation.
    pub fn destroy_old(&mut self, who: &Attribution) -> Result<()> {
        self.mutate(who, |state, _| Ok((state.destroy_old()?, None)))
    }

    /// Emergency: destroys every key now and activates a fresh one.
    pub fn revoke(&mut self, who: &Attribution) -> Result<()> {
        self.mutate(who, |state, now| {
            let key = PrivateKey::generate();
            let meta = KeyMeta::new(state.next_generation(), now, key.public_key());
            let t = state.revoke(meta.clone())?;
            Ok((t, Some((meta, key))))
        })
    }

    /// Records that a peer confirmed it accepts `generation` of this node's key.
    pub fn record_peer_confirmed(&mut self, peer: &str, who: &Attribution) -> Result<()> {
        let _lock = lock(&self.dir)?;
        let head = read_verified_head(&self.dir)?;
        let active = &self.state.active;
        let entry = Entry {
            event: EventKind::PeerConfirmed,
            old_fingerprint: self.state.previous.as_ref().map(|k| k.fingerprint),
            new_fingerprint: Some(active.fingerprint),
            generation: active.generation,
            peer: Some(peer.to_string()),
        };
        self.append(&head, who, Timestamp::now(), [entry])
    }

    /// Reads and verifies the audit log (shared helper for the CLI).
    pub fn verify_audit(dir: &Path) -> Result<std::result::Result<audit::Verified, VerifyError>> {
        let log = read_optional(&dir.join(AUDIT_FILE))?.unwrap_or_default();
        let head = read_head(dir)?;
        Ok(audit::verify(&log, head.as_ref()))
    }

    /// One locked read-modify-write: re-reads the state (another process may have
    /// changed it), runs the pure transition, then writes the new key file, the
    /// state (the commit point), the audit records, and destroys what the
    /// transition retired plus any orphans.
    fn mutate<F>(&mut self, who: &Attribution, step: F) -> Result<()>
    where
        F: FnOnce(&KeyState, Timestamp) -> Result<(Transition, Option<(KeyMeta, PrivateKey)>)>,
    {
        let _lock = lock(&self.dir)?;
        *self = Self::load(&self.dir)?;
        let head = read_verified_head(&self.dir)?;
        let now = now_seconds();
        let (transition, new_key) = step(&self.state, now)?;
        if let Some((meta, key)) = &new_key {
            write_key(&self.dir, meta, key)?;
        }
        let previous_orphans = std::mem::take(&mut self.orphans);
        self.state = transition.state;
        self.commit_state()?;
        self.append(
            &head,
            who,
            now,
            transition.events.iter().map(Entry::from_key_event),
        )?;
        for meta in &transition.destroy {
            destroy_file(&self.dir, &key_path(&self.dir, meta.generation))?;
        }
        for orphan in previous_orphans {
            tracing::warn!(file = %orphan.display(), "destroying orphaned key file left by an interrupted operation");
            destroy_file(&self.dir, &orphan)?;
        }
        Ok(())
    }

    fn load(dir: &Path) -> Result<Self> {
        check_dir(dir)?;
        let path = dir.join(STATE_FILE);
        let text = read_optional(&path)?.ok_or_else(|| StoreError::NotInitialized {
            dir: dir.to_path_buf(),
        })?;
        let file: StateFile = serde_json::from_slice(&text).map_err(|e| StoreError::Corrupt {
            file: path.clone(),
            detail: format!("not a valid state file ({e})"),
            fix: "restore it from a backup; `wgmesh keys audit show` lists the keys it should name"
                .into(),
        })?;
        if file.format != FORMAT {
            return Err(StoreError::Corrupt {
                file: path,
                detail: format!(
                    "format {} is not supported (this wgmesh reads format {FORMAT})",
                    file.format
                ),
                fix: "run the wgmesh version that wrote it".into(),
            });
        }
        for meta in file.keys.keys() {
            if meta.fingerprint != meta.public_key.fingerprint() {
                return Err(StoreError::Corrupt {
                    file: path,
                    detail: format!(
                        "generation {} lists fingerprint {} for a key whose fingerprint is {}",
                        meta.generation,
                        meta.fingerprint,
                        meta.public_key.fingerprint()
                    ),
                    fix: "restore it from a backup".into(),
                });
            }
            // Reading the key checks its permissions and that it matches.
            drop(read_key(dir, meta)?);
        }
        let referenced: Vec<PathBuf> = file
            .keys
            .keys()
            .map(|m| key_path(dir, m.generation))
            .collect();
        let mut orphans = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err(dir))? {
            let path = entry.map_err(io_err(dir))?.path();
            let is_key = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("key-") && n.ends_with(".key"));
            if is_key && !referenced.contains(&path) {
                orphans.push(path);
            }
        }
        orphans.sort();
        Ok(Self {
            dir: dir.to_path_buf(),
            node: file.node,
            state: file.keys,
            orphans,
        })
    }

    fn commit_state(&self) -> Result<()> {
        let file = StateFile {
            format: FORMAT,
            node: self.node.clone(),
            keys: self.state.clone(),
        };
        let mut text = serde_json::to_vec_pretty(&file).unwrap_or_default();
        text.push(b'\n');
        write_atomic(&self.dir.join(STATE_FILE), &text)
    }

    fn append(
        &self,
        head: &Head,
        who: &Attribution,
        time: Timestamp,
        entries: impl IntoIterator<Item = Entry>,
    ) -> Result<()> {
        let ctx = Context {
            node: self.node.clone(),
            actor: who.actor.clone(),
            reason: who.reason.clone(),
            time,
        };
        let records = audit::chain(head, &ctx, entries.into_iter().collect());
        let Some(last) = records.last() else {
            return Ok(());
        };
        let mut text = String::new();
        for r in &records {
            text.push_str(&r.to_line());
            text.push('\n');
        }
        let path = self.dir.join(AUDIT_FILE);
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?;
        file.write_all(text.as_bytes()).map_err(io_err(&path))?;
        file.sync_all().map_err(io_err(&path))?;
        write_head(&self.dir, &last.head())
    }
}

/// Now, truncated to whole seconds: key creation times are published in the
/// `key-created` annotation at second precision, and the store agrees with it.
fn now_seconds() -> Timestamp {
    let now = Timestamp::now();
    Timestamp::from_second(now.as_second()).unwrap_or(now)
}

/// The path of generation `n`'s key file.
pub fn key_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("key-{generation}.key"))
}

/// Writes `data` to `path` atomically with mode 0600: a temp file in the same
/// directory, fsync, rename over `path`, fsync of the directory.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(data)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

fn write_key(dir: &Path, meta: &KeyMeta, key: &PrivateKey) -> Result<()> {
    let mut text = Zeroizing::new(key.to_base64().as_bytes().to_vec());
    text.push(b'\n');
    write_atomic(&key_path(dir, meta.generation), &text)
}

/// Reads a key file, refusing group/other permissions, bad content, and a key
/// that does not match the public key the state records for it.
fn read_key(dir: &Path, meta: &KeyMeta) -> Result<PrivateKey> {
    let path = key_path(dir, meta.generation);
    let mut file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(StoreError::Corrupt {
                file: path,
                detail: format!("missing, but state.json lists generation {} (fingerprint {}) here", meta.generation, meta.fingerprint),
                fix: "restore the file from a backup, or run `wgmesh keys revoke --reason ...` to replace every key".into(),
            })
        }
        Err(e) => return Err(io_err(&path)(e)),
    };
    let mode = file.metadata().map_err(io_err(&path))?.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(StoreError::InsecurePermissions { file: path, mode });
    }
    let mut text = Zeroizing::new(String::new());
    file.read_to_string(&mut text)
        .map_err(|_| StoreError::Corrupt {
            file: path.clone(),
            detail: "not text (expected one line of base64)".into(),
            fix: "restore it from a backup, or run `wgmesh keys revoke --reason ...`".into(),
        })?;
    let key = PrivateKey::from_base64(&text).map_err(|e: KeyError| StoreError::Corrupt {
        file: path.clone(),
        detail: format!("the private key {e}"),
        fix: "restore it from a backup, or run `wgmesh keys revoke --reason ...`".into(),
    })?;
    if key.public_key() != meta.public_key {
        return Err(StoreError::Corrupt {
            file: path,
            detail: format!(
                "holds the key with fingerprint {}, but state.json lists {} for generation {}",
                key.fingerprint(),
                meta.fingerprint,
                meta.generation
            ),
            fix:
                "restore the matching file from a backup, or run `wgmesh keys revoke --reason ...`"
                    .into(),
        });
    }
    Ok(key)
}

/// Overwrites a key file with zeros, syncs, and removes it. Overwriting is best
/// effort on copy-on-write or journalled file systems; the memory copy is zeroized
/// by the key types regardless.
fn destroy_file(dir: &Path, path: &Path) -> Result<()> {
    match OpenOptions::new().write(true).open(path) {
        Ok(mut file) => {
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            let zeros = vec![0u8; usize::try_from(len).unwrap_or(0)];
            file.write_all(&zeros).map_err(io_err(path))?;
            file.sync_all().map_err(io_err(path))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(path)(e)),
    }
    fs::remove_file(path).map_err(io_err(path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

fn create_dir_0700(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))?;
    check_dir(dir)
}

/// The directory must be private to its owner. Its files are 0600 anyway, so a
/// wider directory (kubelet creates hostPath directories 0755) exposes no key: it
/// is tightened with a warning instead of refused.
fn check_dir(dir: &Path) -> Result<()> {
    let meta = match fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(StoreError::NotInitialized {
                dir: dir.to_path_buf(),
            })
        }
        Err(e) => return Err(io_err(dir)(e)),
    };
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        tracing::warn!(dir = %dir.display(), mode = format!("{mode:04o}"), "key store directory is accessible by group/others; setting it to 0700");
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
    }
    Ok(())
}

/// An exclusive advisory lock on the store, held until the returned file drops.
fn lock(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(io_err(&path))?;
    file.lock().map_err(io_err(&path))?;
    Ok(file)
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(data) => Ok(Some(data)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn read_head(dir: &Path) -> Result<Option<Head>> {
    let path = dir.join(HEAD_FILE);
    let Some(text) = read_optional(&path)? else {
        return Ok(None);
    };
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|e| StoreError::Corrupt {
            file: path,
            detail: format!("not a valid audit head ({e})"),
            fix: "compare with your off-host copy of the head hash; the log cannot be trusted until then".into(),
        })
}

fn write_head(dir: &Path, head: &Head) -> Result<()> {
    let mut text = serde_json::to_vec(head).unwrap_or_default();
    text.push(b'\n');
    write_atomic(&dir.join(HEAD_FILE), &text)
}

/// The head to append after. Refuses a log that does not verify (appending to a
/// tampered log would bury the evidence), except for the one benign case: the
/// last append wrote its records but died before updating `audit.head`, so the
/// log is an intact chain that extends the recorded head.
fn read_verified_head(dir: &Path) -> Result<Head> {
    let path = dir.join(AUDIT_FILE);
    let log = read_optional(&path)?.unwrap_or_default();
    let head = read_head(dir)?;
    let error = match (audit::verify(&log, head.as_ref()), &head) {
        (Ok(v), _) => return Ok(v.head),
        // A store that never logged anything: start the chain, and anchor it
        // before the first append so that an interrupted first append is
        // recognised like any other.
        (Err(_), None) if log.is_empty() => {
            write_head(dir, &Head::empty())?;
            return Ok(Head::empty());
        }
        (Err(error), _) => error,
    };
    if let (Some(anchor), Ok(v)) = (&head, chain_only(&log)) {
        let extends = anchor.seq < v.head.seq
            && (anchor.seq == 0
                || v.records
                    .get(anchor.seq as usize - 1)
                    .is_some_and(|r| r.hash == anchor.hash));
        if extends {
            tracing::warn!(file = %path.display(), from = anchor.seq, to = v.head.seq, "finalizing an audit append that was interrupted before audit.head was updated");
            write_head(dir, &v.head)?;
            return Ok(v.head);
        }
    }
    Err(StoreError::AuditBroken { file: path, error })
}

/// Verifies the chain alone, taking the log's own last record as the anchor.
fn chain_only(log: &[u8]) -> std::result::Result<audit::Verified, VerifyError> {
    let text = String::from_utf8_lossy(log);
    let last = text
        .lines()
        .last()
        .and_then(|l| serde_json::from_str::<AuditRecord>(l).ok())
        .map(|r| r.head());
    audit::verify(log, last.as_ref())
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        file: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::rotation::Phase;

    fn who(reason: &str) -> Attribution {
        Attribution {
            actor: "cli:test".into(),
            reason: reason.into(),
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn events(dir: &Path) -> Vec<String> {
        Store::verify_audit(dir)
            .unwrap()
            .unwrap()
            .records
            .iter()
            .map(|r| r.event.to_string())
            .collect()
    }

    #[test]
    fn init_writes_a_private_store() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("store");
        let store = Store::init(&dir, "node-a", &who("first key")).unwrap();
        assert_eq!(mode(&dir), 0o700);
        for f in ["key-1.key", STATE_FILE, AUDIT_FILE, HEAD_FILE] {
            assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
        }
        let text = fs::read_to_string(dir.join("key-1.key")).unwrap();
        assert_eq!(
            text.len(),
            45,
            "wg genkey format: 44 base64 chars + newline"
        );
        let key = PrivateKey::from_base64(&text).unwrap();
        assert_eq!(key.public_key(), store.state().active.public_key);
        // The state file names keys by public key only.
        let state = fs::read_to_string(dir.join(STATE_FILE)).unwrap();
        assert!(!state.contains(text.trim()));
        assert_eq!(events(&dir), ["generated"]);

        let again = Store::init(&dir, "node-a", &who("again")).unwrap_err();
        assert!(
            matches!(again, StoreError::AlreadyInitialized { .. }),
            "{again}"
        );
    }

    #[test]
    fn a_group_readable_key_is_refused_naming_the_file_and_fix() {
        let tmp = tempfile::tempdir().unwrap();
        Store::init(tmp.path(), "node-a", &who("t")).unwrap();
        let key = tmp.path().join("key-1.key");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let err = Store::open(tmp.path()).unwrap_err();
        let text = err.to_string();
        assert!(matches!(
            err,
            StoreError::InsecurePermissions { mode: 0o644, .. }
        ));
        assert!(text.contains(&key.display().to_string()), "{text}");
        assert!(text.contains("chmod 600"), "{text}");
    }

    #[test]
    fn a_corrupt_or_swapped_key_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        Store::init(tmp.path(), "node-a", &who("t")).unwrap();
        let key = tmp.path().join("key-1.key");
        fs::write(&key, "garbage\n").unwrap();
        let err = Store::open(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("key-1.key is corrupt"), "{err}");

        let other = PrivateKey::generate();
        fs::write(&key, format!("{}\n", other.to_base64().as_str())).unwrap();
        let err = Store::open(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("state.json lists"), "{err}");
        assert!(!err.contains(other.to_base64().as_str()));

        fs::remove_file(&key).unwrap();
        let err = Store::open(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");

        fs::write(tmp.path().join(STATE_FILE), "{").unwrap();
        let err = Store::open(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("state.json is corrupt"), "{err}");
    }

    #[test]
    fn rotation_steps_move_files_and_log_each_event() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut store = Store::init(dir, "node-a", &who("t")).unwrap();
        let first = store.state().active.clone();

        store.stage(&who("quarterly")).unwrap();
        assert_eq!(store.state().phase(), Phase::Staged);
        assert!(dir.join("key-2.key").exists());
        assert_eq!(mode(&dir.join("key-2.key")), 0o600);
        assert_eq!(store.state().active, first);
        assert!(store.staged_private().unwrap().is_some());

        store.activate(&who("quarterly")).unwrap();
        assert_eq!(store.state().phase(), Phase::Activated);
        assert_eq!(store.state().active.generation, 2);
        assert!(dir.join("key-1.key").exists(), "kept until destroy-old");

        store.destroy_old(&who("quarterly")).unwrap();
        assert_eq!(store.state().phase(), Phase::Idle);
        assert!(!dir.join("key-1.key").exists());

        let reopened = Store::open(dir).unwrap();
        assert_eq!(reopened.state(), store.state());
        assert_eq!(
            events(dir),
            ["generated", "generated", "staged", "activated", "destroyed"]
        );
    }

    #[test]
    fn revoke_leaves_only_a_fresh_key() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut store = Store::init(dir, "node-a", &who("t")).unwrap();
        store.stage(&who("t")).unwrap();
        store.revoke(&who("laptop stolen")).unwrap();
        assert_eq!(store.state().active.generation, 3);
        assert_eq!(store.state().phase(), Phase::Idle);
        assert!(!dir.join("key-1.key").exists());
        assert!(!dir.join("key-2.key").exists());
        assert!(dir.join("key-3.key").exists());
        let log = Store::verify_audit(dir).unwrap().unwrap();
        let last = log.records.last().unwrap();
        assert_eq!(last.reason, "laptop stolen");
        assert!(events(dir).contains(&"revoked".to_string()));
    }

    #[test]
    fn out_of_order_steps_change_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let mut store = Store::init(tmp.path(), "node-a", &who("t")).unwrap();
        let before = fs::read(tmp.path().join(AUDIT_FILE)).unwrap();
        assert!(store.activate(&who("t")).is_err());
        assert!(store.destroy_old(&who("t")).is_err());
        assert_eq!(fs::read(tmp.path().join(AUDIT_FILE)).unwrap(), before);
    }

    #[test]
    fn orphans_are_reported_then_destroyed_by_the_next_operation() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        Store::init(dir, "node-a", &who("t")).unwrap();
        let orphan = key_path(dir, 7);
        write_atomic(&orphan, b"x\n").unwrap();
        let mut store = Store::open(dir).unwrap();
        assert_eq!(store.orphans(), std::slice::from_ref(&orphan));
        store.stage(&who("t")).unwrap();
        assert!(!orphan.exists());
        assert!(store.orphans().is_empty());
    }

    #[test]
    fn an_interrupted_append_is_finalized_but_a_tampered_log_blocks_writes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut store = Store::init(dir, "node-a", &who("t")).unwrap();
        let old_head = fs::read(dir.join(HEAD_FILE)).unwrap();
        store.stage(&who("t")).unwrap();
        // Simulate a crash between the log append and the head update.
        fs::write(dir.join(HEAD_FILE), &old_head).unwrap();
        assert!(Store::verify_audit(dir).unwrap().is_err());
        store.activate(&who("t")).unwrap();
        assert!(Store::verify_audit(dir).unwrap().is_ok());

        // Now tamper: the next operation must refuse to append.
        let log = fs::read_to_string(dir.join(AUDIT_FILE)).unwrap();
        fs::write(
            dir.join(AUDIT_FILE),
            log.replacen("\"reason\":\"t\"", "\"reason\":\"x\"", 1),
        )
        .unwrap();
        let err = store.destroy_old(&who("t")).unwrap_err();
        assert!(matches!(err, StoreError::AuditBroken { .. }), "{err}");
        assert!(dir.join("key-1.key").exists(), "nothing destroyed");
    }

    #[test]
    fn a_wide_directory_is_tightened() {
        let tmp = tempfile::tempdir().unwrap();
        Store::init(tmp.path(), "node-a", &who("t")).unwrap();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
        Store::open(tmp.path()).unwrap();
        assert_eq!(mode(tmp.path()), 0o700);
    }
}
