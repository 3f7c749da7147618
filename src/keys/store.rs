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
//! rewriting `state.json` alone: every write is a single atomic rename (a uniquely
//! named temp file, fsync, rename, fsync of the directory), and a crash leaves
//! either the old or the new state.
//!
//! Every operation is write-ahead, in this order: the new key file (if any), the
//! audit records that describe the change, `state.json` (the commit point), then
//! the destruction of the key files the change retired. A crash therefore never
//! leaves a key change the log does not show. A crash between the records and the
//! commit leaves records describing a change that did not happen; the next open or
//! key operation detects it (the log's last record is not reflected by
//! `state.json`) and appends an `aborted` record naming those records, so the log
//! stays true and still verifies. A key file that no state references (left by an
//! aborted operation, or by a crash before its destruction finished) is an orphan:
//! `keys show` reports it and the next key operation destroys it. Temp files a
//! crash left behind are destroyed like keys when the store is opened.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::audit::{
    self, AuditHead, AuditRecord, Context, Entry, EventKind, Head, Verified, VerifyError,
};
use super::rotation::{KeyMeta, KeyState, RotationError, Transition};
use super::{KeyError, PrivateKey, PublicKey};

/// Where the store lives unless configured otherwise.
pub const DEFAULT_DIR: &str = "/var/lib/wgmesh";
/// `state.json`'s format version.
pub const FORMAT: u32 = 1;
/// The `actor` of the `aborted` records that recovery appends.
pub const RECOVERY_ACTOR: &str = "wgmesh:recovery";

/// The commit point of every operation (see the module docs).
pub const STATE_FILE: &str = "state.json";
const AUDIT_FILE: &str = "audit.jsonl";
const HEAD_FILE: &str = "audit.head";
const LOCK_FILE: &str = ".lock";
/// Temp files are `.<target>.tmp.<random>` (the random part from `tempfile`).
const TEMP_MARK: &str = ".tmp.";

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
    /// An audit record would lack what every record must say.
    #[error("the {field} of an audit record must not be empty: every key event says who did it, why, and (for a peer's confirmation) how it was proven")]
    EmptyField { field: &'static str },
    /// serde_json refused an audit record (it never does for the record's
    /// plain fields); the log is left as it was.
    #[error("cannot encode an audit record, so nothing was appended to the log: {0}")]
    AuditEncode(#[from] serde_json::Error),
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
    /// SHA-256 of the `state.json` bytes this handle last loaded or wrote: how
    /// [`Store::reload_if_changed`] notices a commit by another process.
    state_digest: [u8; 32],
}

/// How an operation is attributed in the audit log.
#[derive(Debug, Clone)]
pub struct Attribution {
    pub actor: String,
    pub reason: String,
}

/// The last operation in the audit log when `state.json` does not reflect it:
/// its records were written ahead of a commit that never happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uncommitted {
    /// The operation's records, in log order (never empty).
    pub records: Vec<AuditRecord>,
}

impl Uncommitted {
    pub fn first_seq(&self) -> u64 {
        self.records.first().map_or(0, |r| r.seq)
    }

    pub fn last_seq(&self) -> u64 {
        self.records.last().map_or(0, |r| r.seq)
    }

    /// The command that wrote the records, as the operator knows it.
    pub fn operation(&self) -> &'static str {
        let events: Vec<EventKind> = self.records.iter().map(|r| r.event).collect();
        match events.as_slice() {
            [EventKind::Generated] => "init",
            [EventKind::Generated, EventKind::Staged] => "rotate --stage",
            [EventKind::Activated] => "rotate --activate",
            [EventKind::GraceEnded, EventKind::Destroyed] | [EventKind::Destroyed] => {
                "rotate --destroy-old"
            }
            [EventKind::Aborted, EventKind::Destroyed] => "rotate --abort",
            [EventKind::Revoked, ..] => "revoke",
            _ => "a key operation",
        }
    }

    /// A one-line description naming the records.
    pub fn describe(&self) -> String {
        let events: Vec<String> = self.records.iter().map(|r| r.event.to_string()).collect();
        let range = if self.first_seq() == self.last_seq() {
            format!("seq {}", self.first_seq())
        } else {
            format!("seq {}..{}", self.first_seq(), self.last_seq())
        };
        format!(
            "`{}` ({range}: {}) by {}",
            self.operation(),
            events.join(", "),
            self.records.last().map_or("?", |r| r.actor.as_str())
        )
    }

    /// The `aborted` record's fields: those of the operation's main record (the
    /// activation of a revoke, else its last record).
    fn aborted_entry(&self) -> Entry {
        let main = self
            .records
            .iter()
            .rev()
            .find(|r| r.event == EventKind::Activated)
            .or(self.records.last());
        Entry {
            old_fingerprint: main.and_then(|r| r.old_fingerprint),
            new_fingerprint: main.and_then(|r| r.new_fingerprint),
            ..Entry::new(EventKind::Aborted, main.map_or(0, |r| r.generation))
        }
    }
}

impl Store {
    /// Creates the store with a fresh key (generation 1, or the first generation
    /// an earlier, aborted init did not use).
    pub fn init(dir: &Path, node: &str, who: &Attribution) -> Result<Self> {
        create_dir_0700(dir)?;
        let _lock = lock(dir)?;
        sweep_temp_files(dir)?;
        if dir.join(STATE_FILE).exists() {
            let existing = Self::load(dir)?;
            return Err(StoreError::AlreadyInitialized {
                dir: dir.to_path_buf(),
                fingerprint: existing.state.active.fingerprint.to_string(),
                generation: existing.state.active.generation,
            });
        }
        // A half-finished earlier init may have left a log: never overwrite
        // history, mark what it never committed as aborted, and never reuse a
        // generation it names.
        let log = recover(dir, node, None, read_verified(dir)?)?;
        let now = now_seconds();
        let key = PrivateKey::generate();
        let generation = log
            .records
            .iter()
            .map(|r| r.generation)
            .max()
            .unwrap_or(0)
            .saturating_add(1);
        let meta = KeyMeta::new(generation, now, key.public_key());
        write_key(dir, &meta, &key)?;
        let (state, events) = KeyState::initial(meta);
        let mut store = Self {
            dir: dir.to_path_buf(),
            node: node.to_string(),
            state: state.clone(),
            orphans: Vec::new(),
            state_digest: [0; 32],
        };
        store.append(
            &log.head,
            who,
            now,
            events.iter().map(Entry::from_key_event),
        )?;
        crash_point()?;
        store.commit_state(state)?;
        for orphan in find_orphans(dir, &store.state)? {
            tracing::warn!(file = %orphan.display(), "destroying orphaned key file left by an interrupted operation");
            destroy_file(dir, &orphan)?;
        }
        Ok(store)
    }

    /// Opens an existing store, refusing insecure or corrupt key files. Under the
    /// store lock it first destroys temp files a crashed write left, finalizes an
    /// interrupted audit append, and records an operation that was logged but
    /// never committed as aborted (see the module docs).
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.join(STATE_FILE).exists() {
            return Err(StoreError::NotInitialized {
                dir: dir.to_path_buf(),
            });
        }
        check_dir(dir)?;
        let _lock = lock(dir)?;
        sweep_temp_files(dir)?;
        let store = Self::load(dir)?;
        // Recovery appends, so it needs a log that verifies. A broken log is left
        // exactly as found: every key operation refuses it, and `keys audit
        // verify` names the bad line.
        match read_verified(dir) {
            Ok(log) => drop(recover(dir, &store.node, Some(&store.state), log)?),
            Err(StoreError::AuditBroken { .. }) => {}
            Err(e) => return Err(e),
        }
        Ok(store)
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

    /// Re-reads the store when `state.json` changed on disk since this handle
    /// last read or wrote it (another process ran a key operation: `wgmesh keys
    /// revoke`, a rotation step). Returns true when the active, staged or
    /// previous key changed.
    ///
    /// Changes are detected by content, not by mtime, length or inode: every
    /// commit is a rename of a fresh file, but a freed inode number is reused at
    /// once, two states can have the same length, and mtime is coarse (one
    /// second on some file systems), so only the bytes tell two commits apart.
    /// `state.json` is small, so reading it on every call is cheap. The reload
    /// itself takes the store lock (a writer holds it for milliseconds) so it
    /// never sees a key file a concurrent operation is destroying. On error the
    /// handle keeps its old state and the next call tries again.
    pub fn reload_if_changed(&mut self) -> Result<bool> {
        let path = self.dir.join(STATE_FILE);
        let text = read_optional(&path)?.ok_or_else(|| StoreError::NotInitialized {
            dir: self.dir.clone(),
        })?;
        if digest(&text) == self.state_digest {
            return Ok(false);
        }
        let _lock = lock(&self.dir)?;
        let fresh = Self::load(&self.dir)?;
        let changed = fresh.state != self.state;
        *self = fresh;
        Ok(changed)
    }

    /// Whether `key` is one of the keys (active, staged or previous) this handle
    /// holds, as of its last load, write or [`Store::reload_if_changed`].
    pub fn holds(&self, key: &PublicKey) -> bool {
        self.state.keys().any(|k| k.public_key == *key)
    }

    /// Whether `key` is one of the keys `state.json` lists right now. Reads and
    /// parses that one small file, without the lock or the key files: the commit
    /// point decides, so a key whose destruction is committed is reported gone
    /// even while its file is still being overwritten.
    pub fn holds_now(&self, key: &PublicKey) -> Result<bool> {
        let path = self.dir.join(STATE_FILE);
        let text = read_optional(&path)?.ok_or_else(|| StoreError::NotInitialized {
            dir: self.dir.clone(),
        })?;
        let held = parse_state(&path, &text)?
            .keys
            .keys()
            .any(|k| k.public_key == *key);
        Ok(held)
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

    /// The previous private key, kept after an activation until the grace
    /// period ends.
    pub fn previous_private(&self) -> Result<Option<PrivateKey>> {
        self.state
            .previous
            .as_ref()
            .map(|m| read_key(&self.dir, m))
            .transpose()
    }

    /// What the audit log says about the rotation in progress: the peers
    /// that confirmed the staged key (or, once activated, the active key)
    /// and when the active key was activated. For the agent's rotation
    /// driver, which must pick up where it left off after a restart.
    pub fn rotation_progress(&self) -> Result<RotationProgress> {
        let log = read_optional(&self.dir.join(AUDIT_FILE))?.unwrap_or_default();
        let head = read_head(&self.dir)?;
        let records = match audit::verify(&log, head.as_ref()) {
            Ok(v) => v.records,
            Err(error) => {
                return Err(StoreError::AuditBroken {
                    file: self.dir.join(AUDIT_FILE),
                    error,
                })
            }
        };
        let target = self
            .state
            .staged
            .as_ref()
            .unwrap_or(&self.state.active)
            .fingerprint;
        let confirmed = records
            .iter()
            .filter(|r| r.event == EventKind::PeerConfirmed)
            .filter(|r| r.new_fingerprint == Some(target))
            .filter_map(|r| r.peer.clone())
            .collect();
        let activated_at = records
            .iter()
            .rev()
            .find(|r| {
                r.event == EventKind::Activated
                    && r.new_fingerprint == Some(self.state.active.fingerprint)
            })
            .map(|r| r.time);
        let last_activation = records
            .iter()
            .rev()
            .find(|r| r.event == EventKind::Activated)
            .map(|r| (r.time, r.unconfirmed.clone()));
        Ok(RotationProgress {
            confirmed,
            activated_at,
            last_activation,
        })
    }

    /// Generates the next key and stages it.
    pub fn stage(&mut self, who: &Attribution) -> Result<()> {
        self.mutate(who, no_edit, |state, generation, now| {
            let key = PrivateKey::generate();
            let meta = KeyMeta::new(generation, now, key.public_key());
            let t = state.stage(meta.clone())?;
            Ok((t, Some((meta, key))))
        })
    }

    /// Makes the staged key the active one. `unconfirmed` is recorded in the
    /// `activated` record: the peers that had not confirmed the new key
    /// (`Some(&[])`: every peer had), or `None` when the caller does not
    /// track confirmations (an activation by hand), which the record then
    /// says by leaving the field out. Why it was activated now (all confirmed,
    /// or the deadline passed) belongs in `who.reason`.
    pub fn activate(&mut self, unconfirmed: Option<&[String]>, who: &Attribution) -> Result<()> {
        let mut unconfirmed: Option<Vec<String>> = unconfirmed.map(<[String]>::to_vec);
        if let Some(peers) = unconfirmed.as_mut() {
            // One spelling per set, so two logs of the same facts read alike.
            peers.sort();
            peers.dedup();
        }
        let edit = move |entries: &mut [Entry]| {
            for e in entries.iter_mut() {
                if e.event == EventKind::Activated {
                    e.unconfirmed = unconfirmed.clone();
                }
            }
        };
        self.mutate(who, edit, |state, _, _| Ok((state.activate()?, None)))
    }

    /// Ends the previous key's grace period and destroys it, after an
    /// activation: records `grace-ended` (the old key is no longer accepted;
    /// the caller removes it from the device first) and `destroyed`.
    pub fn destroy_old(&mut self, who: &Attribution) -> Result<()> {
        self.mutate(who, no_edit, |state, _, _| Ok((state.destroy_old()?, None)))
    }

    /// Abandons a staged rotation: the staged key is withdrawn and destroyed
    /// (records `aborted` then `destroyed`, with `who`'s reason); the active
    /// key stays. The withdrawn key's generation is never used again. Refused
    /// (nothing written) when no rotation is staged.
    pub fn abort_staged(&mut self, who: &Attribution) -> Result<()> {
        self.mutate(who, no_edit, |state, _, _| Ok((state.abort()?, None)))
    }

    /// Emergency: destroys every key now and activates a fresh one.
    pub fn revoke(&mut self, who: &Attribution) -> Result<()> {
        self.mutate(who, no_edit, |state, generation, now| {
            let key = PrivateKey::generate();
            let meta = KeyMeta::new(generation, now, key.public_key());
            let t = state.revoke(meta.clone())?;
            Ok((t, Some((meta, key))))
        })
    }

    /// Records that `peer` confirmed this node's new key, and how that was
    /// proven (`proof`: cryptographic evidence only, e.g. "handshake under key
    /// <fp> completed with peer <node> (<peer key fp>) at <time>"; never a
    /// timer). The key confirmed is the staged one while a rotation is staged
    /// (the userspace protocol: peers confirm before activation), else the
    /// active one (kernel peers follow after the switch); `old_fingerprint` is
    /// the key it succeeds, if the node still holds it.
    pub fn record_peer_confirmed(
        &mut self,
        peer: &str,
        proof: &str,
        who: &Attribution,
    ) -> Result<()> {
        require("peer", peer)?;
        require("proof", proof)?;
        let _lock = lock(&self.dir)?;
        // Another process may have rotated since this handle loaded: record the
        // keys as they are now.
        *self = Self::load(&self.dir)?;
        let log = recover(
            &self.dir,
            &self.node,
            Some(&self.state),
            read_verified(&self.dir)?,
        )?;
        let state = &self.state;
        let (old, new) = match &state.staged {
            Some(staged) => (Some(&state.active), staged),
            None => (state.previous.as_ref(), &state.active),
        };
        let entry = Entry {
            old_fingerprint: old.map(|k| k.fingerprint),
            new_fingerprint: Some(new.fingerprint),
            peer: Some(peer.to_string()),
            proof: Some(proof.to_string()),
            ..Entry::new(EventKind::PeerConfirmed, new.generation)
        };
        self.append(&log.head, who, Timestamp::now(), [entry])
    }

    /// The head this node publishes on its Node (`wgmesh.dev/audit-head`):
    /// its log's last record other than `peer-head` (see
    /// [`audit::published_head`] for why witness records do not move it).
    /// Reads only. Fails when the log does not verify: a node must not vouch
    /// for a log it cannot check.
    pub fn audit_head(&self) -> Result<AuditHead> {
        let path = self.dir.join(AUDIT_FILE);
        let log = Self::verify_audit(&self.dir)?.map_err(|error| StoreError::AuditBroken {
            file: path.clone(),
            error,
        })?;
        let head = audit::published_head(&log.records).ok_or_else(|| StoreError::Corrupt {
            file: path.clone(),
            detail: "the audit log holds no key event, so there is no head to publish".into(),
            fix: "an initialized store always logs its first key; restore the log from a backup"
                .into(),
        })?;
        AuditHead::from_head(&head).map_err(|e| StoreError::Corrupt {
            file: path,
            detail: format!("its record seq {} has no usable head ({e})", head.seq),
            fix: "inspect it with `wgmesh keys audit verify`".into(),
        })
    }

    /// The node a store directory belongs to, from its `state.json` (`None`
    /// without one). Reads only: no lock, no recovery, no key file.
    pub fn node_of(dir: &Path) -> Result<Option<String>> {
        let path = dir.join(STATE_FILE);
        match read_optional(&path)? {
            Some(text) => Ok(Some(parse_state(&path, &text)?.node)),
            None => Ok(None),
        }
    }

    /// Records, as a witness, that `node` published `head`, appending a
    /// `peer-head` record only when it differs from the last head recorded
    /// for that node (the agent calls this whenever it sees a Node's head;
    /// repeats cost nothing). Returns whether a record was appended. The
    /// store's own node is never witnessed (returns false): a node vouching
    /// for itself proves nothing.
    pub fn record_peer_head(
        &mut self,
        node: &str,
        head: &AuditHead,
        who: &Attribution,
    ) -> Result<bool> {
        require("node", node)?;
        if node == self.node {
            return Ok(false);
        }
        let _lock = lock(&self.dir)?;
        *self = Self::load(&self.dir)?;
        let log = recover(
            &self.dir,
            &self.node,
            Some(&self.state),
            read_verified(&self.dir)?,
        )?;
        let last = log
            .records
            .iter()
            .rev()
            .filter(|r| r.event == EventKind::PeerHead && r.peer.as_deref() == Some(node))
            .find_map(|r| r.peer_head.as_ref());
        let head = head.to_head();
        if last == Some(&head) {
            return Ok(false);
        }
        if let Some(last) = last.filter(|l| l.seq >= head.seq) {
            // A log only grows: a head that does not move forward means that
            // node's log was cut, restored from an older copy or rewritten.
            // Recorded all the same; verification against witnesses names it.
            tracing::warn!(
                node,
                from_seq = last.seq,
                to_seq = head.seq,
                "a node's published audit head did not move forward: its log was cut, restored or rewritten"
            );
        }
        let entry = Entry {
            peer: Some(node.to_string()),
            peer_head: Some(head),
            // Not about a key of this node.
            ..Entry::new(EventKind::PeerHead, 0)
        };
        self.append(&log.head, who, Timestamp::now(), [entry])?;
        Ok(true)
    }

    /// Reads and verifies the audit log (shared helper for the CLI).
    pub fn verify_audit(dir: &Path) -> Result<std::result::Result<audit::Verified, VerifyError>> {
        let log = read_optional(&dir.join(AUDIT_FILE))?.unwrap_or_default();
        let head = read_head(dir)?;
        Ok(audit::verify(&log, head.as_ref()))
    }

    /// The log's last operation, if `state.json` does not reflect it (a crash
    /// between the write-ahead records and the commit, not yet recovered). Reads
    /// only; `None` when the chain itself is broken (`verify_audit` reports that).
    /// For `wgmesh keys audit verify`, which must not hide such records.
    pub fn uncommitted(dir: &Path) -> Result<Option<Uncommitted>> {
        let log = read_optional(&dir.join(AUDIT_FILE))?.unwrap_or_default();
        let Ok(chain) = chain_only(&log) else {
            return Ok(None);
        };
        let path = dir.join(STATE_FILE);
        let state = match read_optional(&path)? {
            Some(text) => Some(parse_state(&path, &text)?.keys),
            None => None,
        };
        Ok(uncommitted(&chain.records, state.as_ref()))
    }

    /// One locked read-modify-write: re-reads the state (another process may have
    /// changed it), recovers an uncommitted earlier operation, runs the pure
    /// transition, then writes the new key file, the audit records, the state
    /// (the commit point), and destroys what the transition retired plus any
    /// orphans. `step` gets the lowest generation a new key may take.
    fn mutate<E, F>(&mut self, who: &Attribution, edit: E, step: F) -> Result<()>
    where
        E: FnOnce(&mut [Entry]),
        F: FnOnce(&KeyState, u64, Timestamp) -> Result<(Transition, Option<(KeyMeta, PrivateKey)>)>,
    {
        let _lock = lock(&self.dir)?;
        sweep_temp_files(&self.dir)?;
        *self = Self::load(&self.dir)?;
        let log = recover(
            &self.dir,
            &self.node,
            Some(&self.state),
            read_verified(&self.dir)?,
        )?;
        let now = now_seconds();
        // An aborted operation's generation exists only in the log; skipping it
        // keeps "one generation names one key" true.
        let logged = log.records.iter().map(|r| r.generation).max().unwrap_or(0);
        let generation = self.state.next_generation().max(logged.saturating_add(1));
        let (transition, new_key) = step(&self.state, generation, now)?;
        let mut entries: Vec<Entry> = transition
            .events
            .iter()
            .map(Entry::from_key_event)
            .collect();
        edit(&mut entries);
        // Checked before anything is written: a refused operation leaves no trace.
        require("actor", &who.actor)?;
        require("reason", &who.reason)?;
        if let Some((meta, key)) = &new_key {
            write_key(&self.dir, meta, key)?;
        }
        let previous_orphans = std::mem::take(&mut self.orphans);
        // Write-ahead: the records go to the log before state.json commits the
        // change, so no crash can leave a key change the log does not show.
        self.append(&log.head, who, now, entries)?;
        crash_point()?;
        self.commit_state(transition.state)?;
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
        let file = parse_state(&path, &text)?;
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
        let orphans = find_orphans(dir, &file.keys)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            node: file.node,
            state: file.keys,
            orphans,
            state_digest: digest(&text),
        })
    }

    /// Writes `state` as `state.json` (the commit point) and adopts it.
    fn commit_state(&mut self, state: KeyState) -> Result<()> {
        let file = StateFile {
            format: FORMAT,
            node: self.node.clone(),
            keys: state,
        };
        let path = self.dir.join(STATE_FILE);
        // An error, never an empty state.json in its place.
        let mut text =
            serde_json::to_vec_pretty(&file).map_err(|e| io_err(&path)(io::Error::other(e)))?;
        text.push(b'\n');
        write_atomic(&path, &text)?;
        self.state = file.keys;
        self.state_digest = digest(&text);
        Ok(())
    }

    fn append(
        &self,
        head: &Head,
        who: &Attribution,
        time: Timestamp,
        entries: impl IntoIterator<Item = Entry>,
    ) -> Result<()> {
        require("actor", &who.actor)?;
        require("reason", &who.reason)?;
        let ctx = Context {
            node: self.node.clone(),
            actor: who.actor.clone(),
            reason: who.reason.clone(),
            time,
        };
        let records = audit::chain(head, &ctx, entries.into_iter().collect())?;
        append_records(&self.dir, &records)
    }
}

/// The no-op entry edit, for operations that record the transition as it is.
fn no_edit(_: &mut [Entry]) {}

/// Refuses an empty (or all-whitespace) audit field.
fn require(field: &'static str, value: &str) -> Result<()> {
    if value.trim().is_empty() {
        return Err(StoreError::EmptyField { field });
    }
    Ok(())
}

/// Now, truncated to whole seconds: key creation times are published in the
/// `key-created` annotation at second precision, and the store agrees with it.
fn now_seconds() -> Timestamp {
    let now = Timestamp::now();
    Timestamp::from_second(now.as_second()).unwrap_or(now)
}

/// The path of generation `n`'s key file.
/// See [`Store::rotation_progress`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RotationProgress {
    pub confirmed: std::collections::BTreeSet<String>,
    pub activated_at: Option<jiff::Timestamp>,
    /// The latest activation in the log: when, and the peers it named as
    /// unconfirmed (`None`: the activation did not track confirmations,
    /// e.g. by hand).
    pub last_activation: Option<(jiff::Timestamp, Option<Vec<String>>)>,
}

pub fn key_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("key-{generation}.key"))
}

/// Writes `data` to `path` atomically with mode 0600: a temp file in the same
/// directory, fsync, rename over `path`, fsync of the directory.
///
/// The temp file has a unique random name (`.<name>.tmp.<random>`, created
/// exclusively by `tempfile`): a name derived from the PID would be the same for
/// every run in a container (PID 1), so a temp file left by a crash would block
/// every later write. Leftovers are destroyed when the store is opened.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let prefix = format!(".{name}{TEMP_MARK}");
    let mut tmp = tempfile::Builder::new()
        .prefix(&prefix)
        .rand_bytes(8)
        .permissions(fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)
        .map_err(io_err(path))?;
    if let Err(e) = tmp.write_all(data).and_then(|()| tmp.as_file().sync_all()) {
        // The data may be a key: zero it before the drop unlinks the file.
        scrub(tmp.as_file_mut());
        return Err(io_err(path)(e));
    }
    if let Err(e) = tmp.persist(path) {
        let mut tmp = e.file;
        scrub(tmp.as_file_mut());
        return Err(io_err(path)(e.error));
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Best effort, on a write that already failed: overwrite the file's content
/// with zeros and sync.
fn scrub(file: &mut File) {
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let zeros = vec![0u8; usize::try_from(len).unwrap_or(0)];
    let _ = file
        .rewind()
        .and_then(|()| file.write_all(&zeros))
        .and_then(|()| file.sync_all());
}

fn write_key(dir: &Path, meta: &KeyMeta, key: &PrivateKey) -> Result<()> {
    let mut text = Zeroizing::new(key.to_base64().as_bytes().to_vec());
    text.push(b'\n');
    write_atomic(&key_path(dir, meta.generation), &text)
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn parse_state(path: &Path, text: &[u8]) -> Result<StateFile> {
    let file: StateFile = serde_json::from_slice(text).map_err(|e| StoreError::Corrupt {
        file: path.to_path_buf(),
        detail: format!("not a valid state file ({e})"),
        fix: "restore it from a backup; `wgmesh keys audit show` lists the keys it should name"
            .into(),
    })?;
    if file.format != FORMAT {
        return Err(StoreError::Corrupt {
            file: path.to_path_buf(),
            detail: format!(
                "format {} is not supported (this wgmesh reads format {FORMAT})",
                file.format
            ),
            fix: "run the wgmesh version that wrote it".into(),
        });
    }
    Ok(file)
}

fn is_key_file_name(name: &str) -> bool {
    name.starts_with("key-") && name.ends_with(".key")
}

/// A temp file of ours: `.<state.json|audit.head|key-N.key>.tmp.<anything>`
/// (also the PID-suffixed names older versions wrote).
fn is_temp_file_name(name: &str) -> bool {
    let Some((target, _)) = name
        .strip_prefix('.')
        .and_then(|rest| rest.split_once(TEMP_MARK))
    else {
        return false;
    };
    target == STATE_FILE || target == HEAD_FILE || is_key_file_name(target)
}

/// Key files on disk that `state` does not reference.
fn find_orphans(dir: &Path, state: &KeyState) -> Result<Vec<PathBuf>> {
    let referenced: Vec<PathBuf> = state.keys().map(|m| key_path(dir, m.generation)).collect();
    let mut orphans = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        let is_key = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(is_key_file_name);
        if is_key && !referenced.contains(&path) {
            orphans.push(path);
        }
    }
    orphans.sort();
    Ok(orphans)
}

/// Destroys the temp files an interrupted write left (any may hold a key, so
/// each is overwritten with zeros, synced and removed, like a key file). Must be
/// called with the store lock held: then no write of ours is in flight, and a
/// temp file is certainly a leftover. Logged by name only.
fn sweep_temp_files(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        // Regular files only: never follow a symlink planted under our name.
        if !is_temp_file_name(name) || !entry.file_type().map_err(io_err(dir))?.is_file() {
            continue;
        }
        tracing::warn!(dir = %dir.display(), file = name, "destroying a temp file left by an interrupted write");
        destroy_file(dir, &entry.path())?;
    }
    Ok(())
}

/// Whether `state` (None: no `state.json`) reflects the change `record` logs.
/// Every operation's last record is one `state.json` shows once committed.
fn reflected(record: &AuditRecord, state: Option<&KeyState>) -> bool {
    let holds = |fp: Option<crate::keys::Fingerprint>| {
        state.is_some_and(|s| fp.is_some_and(|fp| s.keys().any(|k| k.fingerprint == fp)))
    };
    match record.event {
        // Change nothing state.json holds. (A withdrawn stage's `aborted` is
        // followed by a `destroyed`, which is what gets checked.)
        EventKind::PeerConfirmed | EventKind::Aborted | EventKind::PeerHead => true,
        EventKind::Generated => holds(record.new_fingerprint),
        EventKind::Staged => state.is_some_and(|s| {
            s.staged.as_ref().map(|k| k.fingerprint) == record.new_fingerprint
                && record.new_fingerprint.is_some()
        }),
        EventKind::Activated => {
            state.is_some_and(|s| Some(s.active.fingerprint) == record.new_fingerprint)
        }
        EventKind::Destroyed | EventKind::Revoked | EventKind::GraceEnded => {
            state.is_some() && !holds(record.old_fingerprint)
        }
    }
}

/// The log's last operation if `state` does not reflect it.
fn uncommitted(records: &[AuditRecord], state: Option<&KeyState>) -> Option<Uncommitted> {
    let last = records.last()?;
    if reflected(last, state) {
        return None;
    }
    let start = operation_start(records);
    Some(Uncommitted {
        records: records[start..].to_vec(),
    })
}

/// Where the last operation's records begin. One operation's records share
/// time, actor and reason, and come in the shapes the rotation state machine
/// emits: `generated` (init), `generated, staged`, `activated`, `grace-ended,
/// destroyed` (or a lone `destroyed` in logs from before `grace-ended`),
/// `aborted, destroyed` (a withdrawn stage), and `revoked, generated,
/// activated, destroyed…` (revoke).
fn operation_start(records: &[AuditRecord]) -> usize {
    let n = records.len();
    let Some(last) = records.last() else {
        return 0;
    };
    let same =
        |r: &AuditRecord| r.time == last.time && r.actor == last.actor && r.reason == last.reason;
    let is = |i: usize, event: EventKind| records[i].event == event && same(&records[i]);
    match last.event {
        EventKind::Staged if n >= 2 && is(n - 2, EventKind::Generated) => n - 2,
        EventKind::Destroyed => {
            let mut i = n - 1;
            while i > 0 && is(i - 1, EventKind::Destroyed) {
                i -= 1;
            }
            let revoke = i >= 3
                && is(i - 3, EventKind::Revoked)
                && is(i - 2, EventKind::Generated)
                && is(i - 1, EventKind::Activated);
            // The key a grace-ended or a withdrawn stage is about is the one
            // the `destroyed` after it destroys.
            let before_last_is = |event: EventKind| {
                n >= 2 && is(n - 2, event) && {
                    let r = &records[n - 2];
                    r.old_fingerprint.or(r.new_fingerprint) == last.old_fingerprint
                }
            };
            if revoke {
                i - 3
            } else if before_last_is(EventKind::GraceEnded) || before_last_is(EventKind::Aborted) {
                n - 2
            } else {
                n - 1
            }
        }
        _ => n - 1,
    }
}

/// If the log's last operation was never committed to `state.json` (`state`;
/// None when it is absent), appends an `aborted` record for it and returns the
/// log with that record. Aborting, not completing: `state.json` is the commit
/// point, so an operation it does not show did not happen, and the operator
/// (or the agent) simply runs it again. The keys that operation generated are
/// orphans, destroyed by the next key operation.
fn recover(
    dir: &Path,
    node: &str,
    state: Option<&KeyState>,
    mut log: Verified,
) -> Result<Verified> {
    let Some(op) = uncommitted(&log.records, state) else {
        return Ok(log);
    };
    tracing::warn!(
        dir = %dir.display(),
        operation = op.operation(),
        first_seq = op.first_seq(),
        last_seq = op.last_seq(),
        "an operation was logged but never committed to state.json (interrupted); recording it as aborted"
    );
    let ctx = Context {
        node: node.to_string(),
        actor: RECOVERY_ACTOR.to_string(),
        reason: format!(
            "recovery: {} was logged ahead of its state.json commit, which never happened (the operation was interrupted, or state.json was replaced by an older copy); state.json is unchanged, so that change did not take effect",
            op.describe()
        ),
        time: Timestamp::now(),
    };
    let records = audit::chain(&log.head, &ctx, vec![op.aborted_entry()])?;
    append_records(dir, &records)?;
    if let Some(last) = records.last() {
        log.head = last.head();
    }
    log.records.extend(records);
    Ok(log)
}

/// Appends chained records to the log (one write, fsync), then moves
/// `audit.head` to the last of them.
fn append_records(dir: &Path, records: &[AuditRecord]) -> Result<()> {
    let Some(last) = records.last() else {
        return Ok(());
    };
    let mut text = String::new();
    for r in records {
        text.push_str(&r.to_line()?);
        text.push('\n');
    }
    let path = dir.join(AUDIT_FILE);
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&path)
        .map_err(io_err(&path))?;
    file.write_all(text.as_bytes()).map_err(io_err(&path))?;
    file.sync_all().map_err(io_err(&path))?;
    write_head(dir, &last.head())
}

#[cfg(test)]
thread_local! {
    /// Test hook: the next operation on this thread fails between its audit
    /// records and its state commit, exactly where a crash would stop it.
    static CRASH_BEFORE_COMMIT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn crash_point() -> Result<()> {
    #[cfg(test)]
    if CRASH_BEFORE_COMMIT.with(|c| c.replace(false)) {
        return Err(StoreError::Io {
            file: PathBuf::from(STATE_FILE),
            source: io::Error::other("simulated crash before the state commit"),
        });
    }
    Ok(())
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
    let path = dir.join(HEAD_FILE);
    let mut text = serde_json::to_vec(head).map_err(|e| io_err(&path)(io::Error::other(e)))?;
    text.push(b'\n');
    write_atomic(&path, &text)
}

/// The verified log, whose head is the one to append after. Refuses a log that
/// does not verify (appending to a tampered log would bury the evidence), except
/// for the one benign case: the last append wrote its records but died before
/// updating `audit.head`, so the log is an intact chain that extends the
/// recorded head.
fn read_verified(dir: &Path) -> Result<Verified> {
    let path = dir.join(AUDIT_FILE);
    let log = read_optional(&path)?.unwrap_or_default();
    let head = read_head(dir)?;
    let error = match (audit::verify(&log, head.as_ref()), &head) {
        (Ok(v), _) => return Ok(v),
        // A store that never logged anything: start the chain, and anchor it
        // before the first append so that an interrupted first append is
        // recognised like any other.
        (Err(_), None) if log.is_empty() => {
            write_head(dir, &Head::empty())?;
            return Ok(Verified {
                records: Vec::new(),
                head: Head::empty(),
            });
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
            return Ok(v);
        }
    }
    Err(StoreError::AuditBroken { file: path, error })
}

/// Verifies the chain alone, taking the log's own last record as the anchor.
fn chain_only(log: &[u8]) -> std::result::Result<audit::Verified, VerifyError> {
    audit::verify_chain(log)
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

    /// An activation that does not track peers (as `rotate --activate` does).
    fn activate_by_hand(store: &mut Store, who: &Attribution) -> Result<()> {
        store.activate(None, who)
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

        store.activate(None, &who("quarterly")).unwrap();
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
            [
                "generated",
                "generated",
                "staged",
                "activated",
                "grace-ended",
                "destroyed"
            ]
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
        assert!(store.activate(None, &who("t")).is_err());
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
        store.activate(None, &who("t")).unwrap();
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

    fn temp_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(TEMP_MARK))
            .collect();
        names.sort();
        names
    }

    fn crash_next_commit() {
        CRASH_BEFORE_COMMIT.with(|c| c.set(true));
    }

    fn state_on_disk(dir: &Path) -> KeyState {
        let text = fs::read(dir.join(STATE_FILE)).unwrap();
        parse_state(&dir.join(STATE_FILE), &text).unwrap().keys
    }

    fn last_record(dir: &Path) -> AuditRecord {
        Store::verify_audit(dir)
            .unwrap()
            .unwrap()
            .records
            .pop()
            .unwrap()
    }

    #[test]
    fn temp_names_are_unique_so_a_leftover_never_blocks_a_write() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        // What the PID-named scheme left after a crash in a container (PID 1)
        // and in this process: both used to make every later write fail.
        for pid in [1, std::process::id()] {
            fs::write(dir.join(format!(".state.json.tmp.{pid}")), b"{").unwrap();
        }
        let target = dir.join("state.json");
        write_atomic(&target, b"one\n").unwrap();
        write_atomic(&target, b"two\n").unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"two\n");
        assert_eq!(mode(&target), 0o600);
        // Our writes leave no temp file of their own behind.
        assert_eq!(
            temp_files(dir),
            [
                ".state.json.tmp.1".to_string(),
                format!(".state.json.tmp.{}", std::process::id())
            ]
        );
    }

    #[test]
    fn open_destroys_leftover_temp_files_of_ours_and_nothing_else() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut store = Store::init(dir, "node-a", &who("t")).unwrap();
        let secret = PrivateKey::generate();
        let leftover = dir.join(".key-2.key.tmp.Ab12Cd34");
        fs::write(&leftover, format!("{}\n", secret.to_base64().as_str())).unwrap();
        fs::set_permissions(&leftover, fs::Permissions::from_mode(0o600)).unwrap();
        // A second name for the same inode shows what the destruction did to
        // the data, after the temp name is gone.
        let witness = dir.join("witness");
        fs::hard_link(&leftover, &witness).unwrap();
        fs::write(dir.join(".audit.head.tmp.1"), b"x").unwrap();
        // Not ours: another program's temp file, a symlink under our pattern.
        fs::write(dir.join(".other.tmp.1"), b"keep").unwrap();
        std::os::unix::fs::symlink(&witness, dir.join(".state.json.tmp.link")).unwrap();

        Store::open(dir).unwrap();
        assert!(!leftover.exists());
        assert!(!dir.join(".audit.head.tmp.1").exists());
        assert_eq!(fs::read(dir.join(".other.tmp.1")).unwrap(), b"keep");
        assert!(fs::symlink_metadata(dir.join(".state.json.tmp.link")).is_ok());
        let data = fs::read(&witness).unwrap();
        assert_eq!(data.len(), 45);
        assert!(data.iter().all(|&b| b == 0), "overwritten with zeros");

        // Every key operation sweeps too, and leaves none of its own.
        fs::write(dir.join(".state.json.tmp.7"), b"{").unwrap();
        fs::remove_file(dir.join(".state.json.tmp.link")).unwrap();
        store.stage(&who("t")).unwrap();
        assert!(
            temp_files(dir).iter().all(|n| n == ".other.tmp.1"),
            "{:?}",
            temp_files(dir)
        );
    }

    #[test]
    fn records_are_written_ahead_and_an_uncommitted_stage_is_recorded_as_aborted() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut store = Store::init(dir, "node-a", &who("t")).unwrap();
        let before = state_on_disk(dir);

        crash_next_commit();
        assert!(store.stage(&who("quarterly")).is_err());
        // The crash window: the records are in the log (which verifies), the
        // state is not committed, the new key file is there.
        assert_eq!(state_on_disk(dir), before);
        assert_eq!(events(dir), ["generated", "generated", "staged"]);
        assert!(key_path(dir, 2).exists());
        let pending = Store::uncommitted(dir).unwrap().expect("detected");
        assert_eq!((pending.first_seq(), pending.last_seq()), (2, 3));
        assert_eq!(pending.operation(), "rotate --stage");
        let staged_fp = pending.records[1].new_fingerprint;

        // Opening records the abort, once.
        let reopened = Store::open(dir).unwrap();
        assert_eq!(reopened.state(), &before);
        assert_eq!(reopened.orphans(), [key_path(dir, 2)]);
        assert_eq!(events(dir), ["generated", "generated", "staged", "aborted"]);
        let aborted = last_record(dir);
        assert_eq!(aborted.actor, RECOVERY_ACTOR);
        assert_eq!(aborted.new_fingerprint, staged_fp);
        assert_eq!(aborted.generation, 2);
        assert!(
            aborted.reason.contains("`rotate --stage` (seq 2..3"),
            "{}",
            aborted.reason
        );
        assert!(Store::uncommitted(dir).unwrap().is_none());
        Store::open(dir).unwrap();
        assert_eq!(events(dir).len(), 4);

        // The retry: generation 2 is burnt (the log names it), its key file is
        // destroyed as an orphan.
        let mut store = Store::open(dir).unwrap();
        store.stage(&who("quarterly")).unwrap();
        assert_eq!(store.state().staged.as_ref().unwrap().generation, 3);
        assert!(!key_path(dir, 2).exists());
        assert!(Store::verify_audit(dir).unwrap().is_ok());
    }

    #[test]
    fn every_step_interrupted_before_its_commit_is_detected_and_aborted() {
        type Step = fn(&mut Store, &Attribution) -> Result<()>;
        let cases: [(&str, usize, Step, &[&str]); 4] = [
            ("rotate --stage", 0, Store::stage, &["generated", "staged"]),
            ("rotate --activate", 1, activate_by_hand, &["activated"]),
            (
                "rotate --destroy-old",
                2,
                Store::destroy_old,
                &["grace-ended", "destroyed"],
            ),
            (
                "revoke",
                2,
                Store::revoke,
                &[
                    "revoked",
                    "generated",
                    "activated",
                    "destroyed",
                    "destroyed",
                ],
            ),
        ];
        for (name, setup, step, logged) in cases {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path();
            let mut store = Store::init(dir, "node-a", &who("t")).unwrap();
            let setups: [Step; 2] = [Store::stage, activate_by_hand];
            for s in &setups[..setup] {
                s(&mut store, &who("t")).unwrap();
            }
            let before = state_on_disk(dir);
            let n = events(dir).len();
            crash_next_commit();
            assert!(step(&mut store, &who("t")).is_err(), "{name}");
            assert_eq!(state_on_disk(dir), before, "{name}: not committed");
            let pending = Store::uncommitted(dir).unwrap().expect(name);
            assert_eq!(pending.operation(), name);
            let kinds: Vec<String> = pending
                .records
                .iter()
                .map(|r| r.event.to_string())
                .collect();
            assert_eq!(kinds, logged, "{name}");
            assert_eq!(pending.first_seq(), n as u64 + 1, "{name}");
            // Every key the state still names still works.
            for meta in before.keys() {
                assert!(key_path(dir, meta.generation).exists(), "{name}");
            }

            // A key operation on the stale handle recovers first, then runs.
            let mut other = Store::open(dir).unwrap();
            assert_eq!(events(dir).last().unwrap(), "aborted", "{name}");
            assert_eq!(other.state(), &before);
            other.revoke(&who("after the crash")).unwrap();
            assert!(Store::verify_audit(dir).unwrap().is_ok());
            assert!(Store::uncommitted(dir).unwrap().is_none());
        }
    }

    #[test]
    fn a_key_operation_recovers_without_an_open_in_between() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut store = Store::init(dir, "node-a", &who("t")).unwrap();
        crash_next_commit();
        assert!(store.stage(&who("t")).is_err());
        store.stage(&who("t")).unwrap();
        assert_eq!(
            events(dir),
            [
                "generated",
                "generated",
                "staged",
                "aborted",
                "generated",
                "staged"
            ]
        );
        assert!(Store::uncommitted(dir).unwrap().is_none());
    }

    #[test]
    fn an_interrupted_init_is_aborted_and_its_generation_never_reused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        crash_next_commit();
        assert!(Store::init(dir, "node-a", &who("t")).is_err());
        assert!(!dir.join(STATE_FILE).exists());
        assert_eq!(
            Store::uncommitted(dir).unwrap().unwrap().operation(),
            "init"
        );
        assert!(matches!(
            Store::open(dir),
            Err(StoreError::NotInitialized { .. })
        ));
        let store = Store::init(dir, "node-a", &who("t")).unwrap();
        assert_eq!(store.state().active.generation, 2);
        assert_eq!(events(dir), ["generated", "aborted", "generated"]);
        assert!(!key_path(dir, 1).exists(), "the aborted key is destroyed");
        assert!(Store::uncommitted(dir).unwrap().is_none());
    }

    #[test]
    fn a_second_handle_reloads_what_another_process_committed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut cli = Store::init(dir, "node-a", &who("t")).unwrap();
        let mut agent = Store::open(dir).unwrap();
        let old = agent.state().active.public_key;
        assert!(!agent.reload_if_changed().unwrap(), "nothing changed yet");

        cli.revoke(&who("key exposed")).unwrap();
        // The agent's handle is stale until it reloads; the disk already says no.
        assert!(agent.holds(&old));
        assert!(!agent.holds_now(&old).unwrap());
        assert!(agent.reload_if_changed().unwrap());
        assert_eq!(agent.state(), cli.state());
        assert!(!agent.holds(&old));
        let new = agent.state().active.public_key;
        assert!(agent.holds(&new) && agent.holds_now(&new).unwrap());
        assert_eq!(
            agent.active_private().unwrap().public_key(),
            cli.state().active.public_key
        );
        assert!(!agent.reload_if_changed().unwrap());
    }

    #[test]
    fn reload_sees_every_step_even_within_one_second() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut cli = Store::init(dir, "node-a", &who("t")).unwrap();
        let mut agent = Store::open(dir).unwrap();
        // Three commits well within a second: same mtime second, often the
        // same length, possibly a reused inode. Content tells them apart.
        for step in [Store::stage, activate_by_hand, Store::destroy_old] {
            step(&mut cli, &who("t")).unwrap();
            assert!(agent.reload_if_changed().unwrap());
            assert_eq!(agent.state(), cli.state());
        }
        // A refused step writes nothing, so nothing to reload.
        assert!(cli.activate(None, &who("t")).is_err());
        assert!(!agent.reload_if_changed().unwrap());
        // Rewritten but the same keys (here: another formatting): re-read, false.
        let state = fs::read(dir.join(STATE_FILE)).unwrap();
        let compact: serde_json::Value = serde_json::from_slice(&state).unwrap();
        fs::write(dir.join(STATE_FILE), serde_json::to_vec(&compact).unwrap()).unwrap();
        assert!(!agent.reload_if_changed().unwrap());
    }

    #[test]
    fn a_failed_reload_keeps_the_old_state_and_retries() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut cli = Store::init(dir, "node-a", &who("t")).unwrap();
        let mut agent = Store::open(dir).unwrap();
        let before = agent.state().clone();
        cli.stage(&who("t")).unwrap();
        let staged = key_path(dir, 2);
        fs::set_permissions(&staged, fs::Permissions::from_mode(0o644)).unwrap();
        let err = agent.reload_if_changed().unwrap_err();
        assert!(
            matches!(err, StoreError::InsecurePermissions { .. }),
            "{err}"
        );
        assert_eq!(agent.state(), &before);
        fs::set_permissions(&staged, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(agent.reload_if_changed().unwrap());
        assert!(agent.state().staged.is_some());
    }

    fn rewrite_reason(dir: &Path, seq: u64, reason: &str) {
        // A consistent rewrite, as root on the node could do it: edit a
        // record, recompute every hash after it and the anchor.
        let log = fs::read_to_string(dir.join(AUDIT_FILE)).unwrap();
        let mut records: Vec<AuditRecord> = log
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let mut prev = audit::GENESIS_HASH.to_string();
        let mut text = String::new();
        for r in &mut records {
            if r.seq == seq {
                r.reason = reason.into();
            }
            r.prev_hash = prev.clone();
            r.hash = r.body_hash().unwrap();
            prev = r.hash.clone();
            text.push_str(&r.to_line().unwrap());
            text.push('\n');
        }
        fs::write(dir.join(AUDIT_FILE), text).unwrap();
        write_head(dir, &records.last().unwrap().head()).unwrap();
    }

    fn records(dir: &Path) -> Vec<AuditRecord> {
        Store::verify_audit(dir).unwrap().unwrap().records
    }

    #[test]
    fn a_full_protocol_rotation_records_proof_unconfirmed_and_grace() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut store = Store::init(dir, "node-a", &who("t")).unwrap();
        let old = store.state().active.clone();
        store.stage(&who("max key age reached")).unwrap();
        let next = store.state().staged.clone().unwrap();
        let proof = format!(
            "handshake under key {} completed with peer node-b (0123456789abcdef) at 2026-11-21T11:42:55Z",
            next.fingerprint
        );
        let agent = Attribution {
            actor: "agent".into(),
            reason: "rotation to generation 2".into(),
        };
        store
            .record_peer_confirmed("node-b", &proof, &agent)
            .unwrap();
        // No proof, no record: a timer is not evidence.
        let before = records(dir).len();
        assert!(matches!(
            store.record_peer_confirmed("node-c", " ", &agent),
            Err(StoreError::EmptyField { field: "proof" })
        ));
        assert_eq!(records(dir).len(), before);

        let late = vec!["node-d".to_string(), "node-c".into(), "node-c".into()];
        store
            .activate(Some(&late), &who("deadline passed: 2 peers unconfirmed"))
            .unwrap();
        store
            .destroy_old(&who("grace period of 180 s over"))
            .unwrap();

        let log = records(dir);
        let kinds: Vec<String> = log.iter().map(|r| r.event.to_string()).collect();
        assert_eq!(
            kinds,
            [
                "generated",
                "generated",
                "staged",
                "peer-confirmed",
                "activated",
                "grace-ended",
                "destroyed"
            ]
        );
        let confirmed = &log[3];
        assert_eq!(confirmed.peer.as_deref(), Some("node-b"));
        assert_eq!(confirmed.proof.as_deref(), Some(proof.as_str()));
        assert_eq!(confirmed.old_fingerprint, Some(old.fingerprint));
        assert_eq!(confirmed.new_fingerprint, Some(next.fingerprint));
        assert_eq!(confirmed.generation, 2);
        assert_eq!(
            (confirmed.actor.as_str(), confirmed.reason.as_str()),
            ("agent", "rotation to generation 2")
        );
        let activated = &log[4];
        assert_eq!(
            activated.unconfirmed.as_deref(),
            Some(&["node-c".to_string(), "node-d".into()][..]),
            "sorted, deduplicated"
        );
        assert!(activated.reason.contains("deadline"));
        let grace = &log[5];
        assert_eq!(grace.old_fingerprint, Some(old.fingerprint));
        assert_eq!(grace.reason, "grace period of 180 s over");
        assert_eq!(log[6].old_fingerprint, Some(old.fingerprint));
        for r in &log {
            assert!(!r.actor.is_empty() && !r.reason.is_empty(), "seq {}", r.seq);
        }
        // `[]` (all confirmed) and None (not tracked) are told apart.
        store.stage(&who("t")).unwrap();
        store
            .activate(Some(&[]), &who("all peers confirmed"))
            .unwrap();
        assert_eq!(last_record(dir).unconfirmed, Some(vec![]));
        assert!(last_record(dir)
            .to_line()
            .unwrap()
            .contains("\"unconfirmed\":[]"));
        store.destroy_old(&who("t")).unwrap();
        store.stage(&who("t")).unwrap();
        store.activate(None, &who("by hand")).unwrap();
        let by_hand = last_record(dir);
        assert_eq!(by_hand.unconfirmed, None);
        assert!(!by_hand.to_line().unwrap().contains("unconfirmed"));
    }

    #[test]
    fn a_peer_confirmation_after_the_switch_names_the_active_key() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut store = Store::init(dir, "node-a", &who("t")).unwrap();
        let old = store.state().active.fingerprint;
        store.stage(&who("t")).unwrap();
        store.activate(None, &who("kernel: switch first")).unwrap();
        store
            .record_peer_confirmed("node-b", "handshake completed", &who("t"))
            .unwrap();
        let r = last_record(dir);
        assert_eq!(r.old_fingerprint, Some(old));
        assert_eq!(r.new_fingerprint, Some(store.state().active.fingerprint));
    }

    #[test]
    fn abort_staged_withdraws_and_destroys_the_staged_key() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut store = Store::init(dir, "node-a", &who("t")).unwrap();
        let active = store.state().active.clone();
        assert!(matches!(
            store.abort_staged(&who("nothing to abort")),
            Err(StoreError::Rotation(RotationError::NothingStaged))
        ));
        store.stage(&who("quarterly")).unwrap();
        let staged = store.state().staged.clone().unwrap();
        store
            .abort_staged(&who("change freeze: rotation postponed"))
            .unwrap();
        assert_eq!(store.state().phase(), Phase::Idle);
        assert_eq!(store.state().active, active);
        assert!(!key_path(dir, staged.generation).exists());
        let log = records(dir);
        let tail: Vec<(EventKind, Option<crate::keys::Fingerprint>)> = log[log.len() - 2..]
            .iter()
            .map(|r| (r.event, r.new_fingerprint.or(r.old_fingerprint)))
            .collect();
        assert_eq!(
            tail,
            [
                (EventKind::Aborted, Some(staged.fingerprint)),
                (EventKind::Destroyed, Some(staged.fingerprint))
            ]
        );
        assert_eq!(
            log[log.len() - 2].reason,
            "change freeze: rotation postponed"
        );
        assert_eq!(log[log.len() - 2].actor, "cli:test");
        // The withdrawn generation is never reused.
        store.stage(&who("t")).unwrap();
        assert_eq!(store.state().staged.as_ref().unwrap().generation, 3);
    }

    #[test]
    fn an_interrupted_abort_is_recognised_as_one_operation() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut store = Store::init(dir, "node-a", &who("t")).unwrap();
        store.stage(&who("t")).unwrap();
        crash_next_commit();
        assert!(store.abort_staged(&who("t")).is_err());
        let pending = Store::uncommitted(dir).unwrap().unwrap();
        assert_eq!(pending.operation(), "rotate --abort");
        assert_eq!(pending.records.len(), 2);
        let reopened = Store::open(dir).unwrap();
        assert_eq!(
            reopened.state().phase(),
            Phase::Staged,
            "the abort never took effect"
        );
        assert_eq!(last_record(dir).actor, RECOVERY_ACTOR);
    }

    #[test]
    fn every_record_needs_an_actor_and_a_reason() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut store = Store::init(dir, "node-a", &who("t")).unwrap();
        let before = fs::read(dir.join(AUDIT_FILE)).unwrap();
        let err = store.revoke(&who("")).unwrap_err();
        assert!(
            matches!(err, StoreError::EmptyField { field: "reason" }),
            "{err}"
        );
        let nobody = Attribution {
            actor: " ".into(),
            reason: "r".into(),
        };
        assert!(matches!(
            store.stage(&nobody),
            Err(StoreError::EmptyField { field: "actor" })
        ));
        assert_eq!(fs::read(dir.join(AUDIT_FILE)).unwrap(), before);
        assert_eq!(
            find_orphans(dir, store.state()).unwrap(),
            Vec::<PathBuf>::new()
        );
    }

    #[test]
    fn the_published_head_skips_witness_records() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut store = Store::init(dir, "node-a", &who("t")).unwrap();
        let first = store.audit_head().unwrap();
        assert_eq!(first.seq, 1);
        assert_eq!(first.hash_hex(), records(dir)[0].hash);
        let seen: AuditHead = format!("4:{}", "cd".repeat(32)).parse().unwrap();
        assert!(store
            .record_peer_head("node-b", &seen, &who("witness"))
            .unwrap());
        // Otherwise two agents would witness each other's witnessing for ever.
        assert_eq!(store.audit_head().unwrap(), first);
        store.stage(&who("t")).unwrap();
        let moved = store.audit_head().unwrap();
        assert_eq!(moved.seq, 4, "generated, staged after the peer-head");
        // A log that does not verify has no head to publish.
        let log = fs::read_to_string(dir.join(AUDIT_FILE)).unwrap();
        fs::write(
            dir.join(AUDIT_FILE),
            log.replacen("\"reason\":\"t\"", "\"reason\":\"x\"", 1),
        )
        .unwrap();
        assert!(matches!(
            store.audit_head(),
            Err(StoreError::AuditBroken { .. })
        ));
    }

    #[test]
    fn record_peer_head_appends_only_on_a_change() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut store = Store::init(dir, "node-a", &who("t")).unwrap();
        let head = |seq: u64, byte: &str| -> AuditHead {
            format!("{seq}:{}", byte.repeat(32)).parse().unwrap()
        };
        let w = who("saw the Node's audit head change");
        assert!(store
            .record_peer_head("node-b", &head(3, "aa"), &w)
            .unwrap());
        assert!(!store
            .record_peer_head("node-b", &head(3, "aa"), &w)
            .unwrap());
        assert!(store
            .record_peer_head("node-c", &head(3, "aa"), &w)
            .unwrap());
        assert!(
            !store
                .record_peer_head("node-b", &head(3, "aa"), &w)
                .unwrap(),
            "per node"
        );
        assert!(store
            .record_peer_head("node-b", &head(5, "bb"), &w)
            .unwrap());
        // Going back is recorded too: it is evidence of a rewrite there.
        assert!(store
            .record_peer_head("node-b", &head(3, "aa"), &w)
            .unwrap());
        // Never about itself.
        assert!(!store
            .record_peer_head("node-a", &head(9, "aa"), &w)
            .unwrap());
        let log = records(dir);
        let heads: Vec<(String, u64)> = log
            .iter()
            .filter(|r| r.event == EventKind::PeerHead)
            .map(|r| (r.peer.clone().unwrap(), r.peer_head.as_ref().unwrap().seq))
            .collect();
        assert_eq!(
            heads,
            [
                ("node-b".into(), 3),
                ("node-c".into(), 3),
                ("node-b".into(), 5),
                ("node-b".into(), 3)
            ]
        );
        let r = log.last().unwrap();
        assert_eq!(r.peer_head.as_ref().unwrap().hash, "aa".repeat(32));
        assert_eq!((r.generation, r.actor.as_str()), (0, "cli:test"));
        assert!(Store::uncommitted(dir).unwrap().is_none());
    }

    #[test]
    fn a_rewritten_history_passes_plain_verify_but_not_its_witnesses() {
        let tmp = tempfile::tempdir().unwrap();
        let (a_dir, b_dir) = (tmp.path().join("a"), tmp.path().join("b"));
        let mut a = Store::init(&a_dir, "node-a", &who("first key")).unwrap();
        let mut b = Store::init(&b_dir, "node-b", &who("first key")).unwrap();
        a.stage(&who("quarterly")).unwrap();
        a.activate(Some(&[]), &who("all peers confirmed")).unwrap();
        // B's agent sees A's published head and records it.
        assert!(b
            .record_peer_head("node-a", &a.audit_head().unwrap(), &who("witness"))
            .unwrap());
        a.destroy_old(&who("grace over")).unwrap();

        let check = |a_dir: &Path| {
            let a_log = records(a_dir);
            let b_log = records(&b_dir);
            audit::verify_against_witnesses("node-a", &a_log, &[&b_log])
        };
        let report = check(&a_dir);
        assert!(report.ok(), "{:?}", report.problems);
        assert_eq!((report.checked, report.pinned_up_to), (1, 4));
        assert_eq!(report.witnesses, ["node-b"]);

        // Root on node-a rewrites why the key was staged, chain recomputed.
        rewrite_reason(&a_dir, 3, "routine");
        assert!(
            Store::verify_audit(&a_dir).unwrap().is_ok(),
            "plain verify passes"
        );
        let report = check(&a_dir);
        assert!(!report.ok());
        assert_eq!(report.problems.len(), 1);
        let finding = &report.problems[0];
        assert_eq!((finding.head.seq, finding.witness.as_str()), (4, "node-b"));
        assert!(matches!(
            finding.problem,
            audit::WitnessProblem::Differs { .. }
        ));
        assert!(finding.to_string().contains("seq 4"), "{finding}");
        assert!(finding.to_string().contains("rewritten"), "{finding}");

        // Cutting back to before the witnessed head is caught as well.
        let lines: Vec<String> = fs::read_to_string(a_dir.join(AUDIT_FILE))
            .unwrap()
            .lines()
            .take(3)
            .map(|l| format!("{l}\n"))
            .collect();
        fs::write(a_dir.join(AUDIT_FILE), lines.concat()).unwrap();
        write_head(&a_dir, &records_unanchored(&a_dir)).unwrap();
        let report = check(&a_dir);
        assert!(matches!(
            report.problems[0].problem,
            audit::WitnessProblem::Missing { log_ends_at: 3 }
        ));
    }

    fn records_unanchored(dir: &Path) -> Head {
        audit::verify_chain(&fs::read(dir.join(AUDIT_FILE)).unwrap())
            .unwrap()
            .head
    }
}
