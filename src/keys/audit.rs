//! The tamper-evident key audit log: JSON Lines, one record per key event, each
//! record carrying the SHA-256 of its own canonical body and of the record before
//! it, so the log is a hash chain. A small side file (`audit.head`) anchors the end
//! of the chain, so cutting records off the end is caught too.
//!
//! This module is pure: it builds records and verifies a log given its bytes. The
//! store ([`super::store`]) does the file I/O. The format is documented for
//! compliance teams in `keys/README.md`; keep the two in step.
//!
//! What the chain proves and what it does not: any edit, deletion, insertion,
//! reordering or truncation of records is detected and the first bad line named.
//! Someone who can write both `audit.jsonl` and `audit.head` can still rewrite the
//! whole history consistently; copying `wgmesh keys audit verify`'s head hash
//! somewhere they cannot write (a ticket, a SIEM) closes that gap, and so do the
//! other nodes: each publishes its head on its Node ([`AuditHead`]), each records
//! the heads it sees from the others (`peer-head` records), and
//! [`verify_against_witnesses`] checks one node's log against those records.
//!
//! Format compatibility: the fields added after the first release (`proof`,
//! `unconfirmed`, `peer_head`) are left out of a record, and of its hash input,
//! when they are empty, so every record written before they existed still
//! serializes and hashes byte for byte as it did.

use std::fmt;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::rotation::KeyEvent;
use super::Fingerprint;

/// The `prev_hash` of the first record.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What happened to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// A key pair was generated (the secret never leaves the store).
    Generated,
    /// A generated key was staged as the next key for peers to pre-accept.
    Staged,
    /// A key became the active one (`old_fingerprint` was active before).
    Activated,
    /// A peer confirmed it accepts the new key (`peer` names it).
    PeerConfirmed,
    /// A key's file was overwritten and removed, and its memory zeroized.
    Destroyed,
    /// A key was revoked in an emergency.
    Revoked,
    /// A change that did not take effect. Two sources, told apart by `actor`:
    /// recovery (`wgmesh:recovery`), when the records of an operation were
    /// written (write-ahead) but `state.json` never committed it (`reason`
    /// names their seq range; the fingerprints and generation are those of
    /// the operation's main record); or a rotation abandoned on purpose (the
    /// staged key withdrawn, `new_fingerprint`), followed by its `destroyed`.
    Aborted,
    /// The grace period after an activation is over: the previous key
    /// (`old_fingerprint`) is no longer accepted for any session. Always
    /// followed by that key's `destroyed`.
    GraceEnded,
    /// This node saw another node (`peer`) publish its audit head
    /// (`peer_head`): a witness record, so that node cannot later rewrite
    /// the history up to that head unnoticed.
    PeerHead,
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EventKind::Generated => "generated",
            EventKind::Staged => "staged",
            EventKind::Activated => "activated",
            EventKind::PeerConfirmed => "peer-confirmed",
            EventKind::Destroyed => "destroyed",
            EventKind::Revoked => "revoked",
            EventKind::Aborted => "aborted",
            EventKind::GraceEnded => "grace-ended",
            EventKind::PeerHead => "peer-head",
        })
    }
}

/// One line of `audit.jsonl`. Field order is the serialization order and is part
/// of the format: the hash covers the canonical serialization of every field but
/// `hash` itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    /// 1 for the first record, +1 for each following one.
    pub seq: u64,
    /// When the record was written (UTC, RFC 3339).
    pub time: Timestamp,
    /// The Kubernetes node name the store belongs to.
    pub node: String,
    pub event: EventKind,
    pub old_fingerprint: Option<Fingerprint>,
    pub new_fingerprint: Option<Fingerprint>,
    /// Generation of the key the event is about (the new key, if there are two).
    pub generation: u64,
    /// Who caused it: a person (`cli:<user>`) or a component (`agent`).
    pub actor: String,
    pub reason: String,
    /// For `peer-confirmed`: the peer node's name; for `peer-head`: the node
    /// whose head was seen.
    pub peer: Option<String>,
    /// For `peer-confirmed`: how the confirmation was proven (the handshake
    /// under the new key that completed, with whom and when).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof: Option<String>,
    /// For `activated`: the peers that had not confirmed the new key at
    /// activation (`[]`: every peer had). Absent when the actor did not track
    /// confirmations (an activation by hand, or a revoke).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unconfirmed: Option<Vec<String>>,
    /// For `peer-head`: the head `peer` published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_head: Option<Head>,
    /// `hash` of the previous record, or [`GENESIS_HASH`] for the first.
    pub prev_hash: String,
    /// SHA-256 (hex) of this record's canonical JSON without the `hash` field.
    pub hash: String,
}

/// The record without its hash: what the hash covers.
#[derive(Serialize)]
struct Body<'a> {
    seq: u64,
    time: &'a Timestamp,
    node: &'a str,
    event: EventKind,
    old_fingerprint: &'a Option<Fingerprint>,
    new_fingerprint: &'a Option<Fingerprint>,
    generation: u64,
    actor: &'a str,
    reason: &'a str,
    peer: &'a Option<String>,
    // Left out when empty, exactly as in `AuditRecord`: records from before
    // these fields existed keep their hashes.
    #[serde(skip_serializing_if = "absent")]
    proof: &'a Option<String>,
    #[serde(skip_serializing_if = "absent")]
    unconfirmed: &'a Option<Vec<String>>,
    #[serde(skip_serializing_if = "absent")]
    peer_head: &'a Option<Head>,
    prev_hash: &'a str,
}

fn absent<T>(value: &&Option<T>) -> bool {
    value.is_none()
}

/// The anchor at the end of the chain (`audit.head`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Head {
    pub seq: u64,
    pub hash: String,
}

impl Head {
    pub fn empty() -> Self {
        Self {
            seq: 0,
            hash: GENESIS_HASH.to_string(),
        }
    }
}

/// Who did something, why, and when: shared by every record of one operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    pub node: String,
    pub actor: String,
    pub reason: String,
    pub time: Timestamp,
}

/// The event fields of a record, before it is chained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub event: EventKind,
    pub old_fingerprint: Option<Fingerprint>,
    pub new_fingerprint: Option<Fingerprint>,
    pub generation: u64,
    pub peer: Option<String>,
    pub proof: Option<String>,
    pub unconfirmed: Option<Vec<String>>,
    pub peer_head: Option<Head>,
}

impl Entry {
    /// An entry with only the event and generation set.
    pub fn new(event: EventKind, generation: u64) -> Self {
        Self {
            event,
            old_fingerprint: None,
            new_fingerprint: None,
            generation,
            peer: None,
            proof: None,
            unconfirmed: None,
            peer_head: None,
        }
    }

    /// The audit entry a rotation event implies.
    pub fn from_key_event(event: &KeyEvent) -> Self {
        let (kind, old, new, generation) = match event {
            KeyEvent::Generated(k) => (EventKind::Generated, None, Some(k), k.generation),
            KeyEvent::Staged(k) => (EventKind::Staged, None, Some(k), k.generation),
            KeyEvent::Activated { old, new } => {
                (EventKind::Activated, Some(old), Some(new), new.generation)
            }
            KeyEvent::Destroyed(k) => (EventKind::Destroyed, Some(k), None, k.generation),
            KeyEvent::Revoked(k) => (EventKind::Revoked, Some(k), None, k.generation),
            KeyEvent::GraceEnded(k) => (EventKind::GraceEnded, Some(k), None, k.generation),
            KeyEvent::Aborted(k) => (EventKind::Aborted, None, Some(k), k.generation),
        };
        Self {
            old_fingerprint: old.map(|k| k.fingerprint),
            new_fingerprint: new.map(|k| k.fingerprint),
            ..Self::new(kind, generation)
        }
    }
}

impl AuditRecord {
    /// Chains `entry` after `head`. Fails only if the record cannot be
    /// serialized for its hash, which for these fields (strings, integers,
    /// options) serde_json never does; an error still beats a hash of nothing.
    pub fn new(head: &Head, ctx: &Context, entry: Entry) -> Result<Self, serde_json::Error> {
        let mut record = Self {
            seq: head.seq + 1,
            time: ctx.time,
            node: ctx.node.clone(),
            event: entry.event,
            old_fingerprint: entry.old_fingerprint,
            new_fingerprint: entry.new_fingerprint,
            generation: entry.generation,
            actor: ctx.actor.clone(),
            reason: ctx.reason.clone(),
            peer: entry.peer,
            proof: entry.proof,
            unconfirmed: entry.unconfirmed,
            peer_head: entry.peer_head,
            prev_hash: head.hash.clone(),
            hash: String::new(),
        };
        record.hash = record.body_hash()?;
        Ok(record)
    }

    /// The SHA-256 of this record's canonical body (everything but `hash`).
    pub fn body_hash(&self) -> Result<String, serde_json::Error> {
        let body = Body {
            seq: self.seq,
            time: &self.time,
            node: &self.node,
            event: self.event,
            old_fingerprint: &self.old_fingerprint,
            new_fingerprint: &self.new_fingerprint,
            generation: self.generation,
            actor: &self.actor,
            reason: &self.reason,
            peer: &self.peer,
            proof: &self.proof,
            unconfirmed: &self.unconfirmed,
            peer_head: &self.peer_head,
            prev_hash: &self.prev_hash,
        };
        let json = serde_json::to_vec(&body)?;
        Ok(crate::text::hex(&Sha256::digest(json)))
    }

    /// The record as one line of the log, without the newline.
    pub fn to_line(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string(self)
    }

    pub fn head(&self) -> Head {
        Head {
            seq: self.seq,
            hash: self.hash.clone(),
        }
    }
}

/// Builds the records for a sequence of entries, chained after `head`.
pub fn chain(
    head: &Head,
    ctx: &Context,
    entries: Vec<Entry>,
) -> Result<Vec<AuditRecord>, serde_json::Error> {
    let mut head = head.clone();
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let record = AuditRecord::new(&head, ctx, entry)?;
        head = record.head();
        out.push(record);
    }
    Ok(out)
}

/// The first problem `verify` found. `line` is 1-based, as editors number lines.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {problem}")]
pub struct VerifyError {
    pub line: usize,
    pub problem: String,
}

/// A log that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub records: Vec<AuditRecord>,
    pub head: Head,
}

/// Parses the log and checks every link of the chain and the anchor. Returns the
/// records, or the first bad line and what is wrong with it.
///
/// `head` is the content of `audit.head`; `None` when that file is absent, which is
/// only consistent with an empty log.
pub fn verify(log: &[u8], head: Option<&Head>) -> Result<Verified, VerifyError> {
    let text = std::str::from_utf8(log).map_err(|e| {
        let line = log[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        VerifyError {
            line,
            problem: "is not UTF-8 text (the file was corrupted or edited with a binary tool)"
                .into(),
        }
    })?;
    let mut lines: Vec<&str> = text.split('\n').collect();
    // A well-formed log ends with a newline, so the last split piece is empty.
    let unterminated = lines.last().is_some_and(|l| !l.is_empty());
    if !unterminated {
        lines.pop();
    }

    let mut records: Vec<AuditRecord> = Vec::with_capacity(lines.len());
    for (i, raw) in lines.iter().enumerate() {
        let line = i + 1;
        let bad = |problem: String| VerifyError { line, problem };
        let record: AuditRecord = serde_json::from_str(raw).map_err(|e| {
            bad(format!(
                "is not a complete audit record ({e}); the line was cut or corrupted"
            ))
        })?;
        if unterminated && line == lines.len() {
            return Err(bad(
                "has no final newline: the log was cut in the middle of this record".into(),
            ));
        }
        let encode = |e: serde_json::Error| bad(format!("cannot be re-encoded to check it: {e}"));
        if record.to_line().map_err(encode)? != *raw {
            return Err(bad(
                "is not in the canonical form wgmesh writes (fields reordered, spacing changed or values re-encoded): the line was edited".into(),
            ));
        }
        if record.body_hash().map_err(encode)? != record.hash {
            return Err(bad(format!(
                "record seq {} was edited: its content does not match its hash",
                record.seq
            )));
        }
        let expected_seq = line as u64;
        if record.seq != expected_seq {
            // A record whose prev_hash points two back was inserted before it.
            let inserted_before =
                record.seq + 1 == expected_seq && i >= 2 && record.prev_hash == records[i - 2].hash;
            if inserted_before {
                return Err(VerifyError {
                    line: line - 1,
                    problem: format!(
                        "was inserted: the record after it (seq {}) chains to line {}",
                        record.seq,
                        line - 2
                    ),
                });
            }
            let problem = if record.seq > expected_seq {
                format!(
                    "has seq {} where {expected_seq} was expected: record(s) {expected_seq}..{} were deleted, or lines were reordered",
                    record.seq,
                    record.seq - 1
                )
            } else {
                format!(
                    "has seq {} where {expected_seq} was expected: a line was inserted or lines were reordered",
                    record.seq
                )
            };
            return Err(bad(problem));
        }
        let expected_prev = records.last().map_or(GENESIS_HASH, |r| r.hash.as_str());
        if record.prev_hash != expected_prev {
            return Err(if line == 1 {
                bad("is the first record but does not start the chain (prev_hash is not the genesis hash)".into())
            } else {
                VerifyError {
                    line: line - 1,
                    problem: format!(
                        "was replaced after line {line} was written (line {line}'s prev_hash does not match it)"
                    ),
                }
            });
        }
        records.push(record);
    }

    let found = records.last().map_or_else(Head::empty, AuditRecord::head);
    match head {
        None if records.is_empty() => {}
        None => {
            return Err(VerifyError {
                line: records.len(),
                problem: "audit.head is missing, so a cut at the end of the log cannot be ruled out; it was deleted or the store was copied without it".into(),
            })
        }
        Some(anchor) if anchor.seq > found.seq => {
            return Err(VerifyError {
                line: records.len() + 1,
                problem: format!(
                    "missing: the log ends at seq {} but audit.head records seq {}: record(s) were cut from the end",
                    found.seq, anchor.seq
                ),
            })
        }
        Some(anchor) if anchor.seq < found.seq => {
            return Err(VerifyError {
                line: anchor.seq as usize + 1,
                problem: format!(
                    "is past the end recorded in audit.head (seq {}): it was appended by hand, or an append was interrupted before audit.head was updated (the next key operation finalizes an interrupted append)",
                    anchor.seq
                ),
            })
        }
        Some(anchor) if anchor.hash != found.hash => {
            return Err(VerifyError {
                line: records.len(),
                problem: "does not match the hash recorded in audit.head: the last record was replaced".into(),
            })
        }
        Some(_) => {}
    }
    Ok(Verified {
        records,
        head: found,
    })
}

/// Verifies the chain alone, taking the log's own last record as the anchor:
/// for a log whose `audit.head` is not at hand (a witness's log copied on its
/// own). A cut at the end of such a log cannot be detected.
pub fn verify_chain(log: &[u8]) -> Result<Verified, VerifyError> {
    let text = String::from_utf8_lossy(log);
    let last = text
        .lines()
        .last()
        .and_then(|l| serde_json::from_str::<AuditRecord>(l).ok())
        .map(|r| r.head());
    verify(log, last.as_ref())
}

/// The records before the first bad line `error` names: what can still be
/// shown, and checked against witnesses, of a log that does not verify.
pub fn readable_prefix(log: &[u8], error: &VerifyError) -> Vec<AuditRecord> {
    String::from_utf8_lossy(log)
        .lines()
        .take(error.line.saturating_sub(1))
        .map_while(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The head a node publishes for `records` (its verified log): the last
/// record other than `peer-head`. Witness records never move it, or two
/// agents would witness each other's witnessing for ever (A appends, B
/// records A's new head, B's head moves, A records that, ...); they are
/// pinned by the node's next key event instead. `None` for a log without one.
pub fn published_head(records: &[AuditRecord]) -> Option<Head> {
    records
        .iter()
        .rev()
        .find(|r| r.event != EventKind::PeerHead)
        .map(AuditRecord::head)
}

/// A node's audit head as published on its Node (`wgmesh.dev/audit-head`):
/// the sequence number and SHA-256 of one record of its log, written
/// `<seq>:<64 lowercase hex>`. Because every record's hash covers the one
/// before it, a head pins the whole log up to that record.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct AuditHead {
    /// At least 1: an empty log has nothing to pin.
    pub seq: u64,
    pub hash: [u8; 32],
}

/// Why a text is not an [`AuditHead`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuditHeadError {
    #[error("{given:?} is not an audit head; write <seq>:<hash>, the record's sequence number and its 64-hex-digit SHA-256, e.g. 12:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08")]
    NoSeparator { given: String },
    #[error("sequence number {given:?} is not a whole number from 1 (plain decimal digits)")]
    BadSeq { given: String },
    #[error("hash {given:?} is not a SHA-256 in 64 lowercase hex digits")]
    BadHash { given: String },
}

impl AuditHead {
    /// The hash in lowercase hex, as the log writes it.
    pub fn hash_hex(&self) -> String {
        crate::text::hex(&self.hash)
    }

    /// The head of `head`'s record (the anchor-file form).
    pub fn from_head(head: &Head) -> Result<Self, AuditHeadError> {
        format!("{}:{}", head.seq, head.hash).parse()
    }

    pub fn to_head(&self) -> Head {
        Head {
            seq: self.seq,
            hash: self.hash_hex(),
        }
    }
}

impl fmt::Display for AuditHead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.seq, self.hash_hex())
    }
}

impl fmt::Debug for AuditHead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AuditHead({self})")
    }
}

impl std::str::FromStr for AuditHead {
    type Err = AuditHeadError;

    /// Strict: only the one form the agent writes (a decimal seq without sign
    /// or leading zeros, a lowercase hash, no spaces), so that no two spellings
    /// of one head exist.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let shorten = |t: &str| t.chars().take(80).collect::<String>();
        let (seq, hash) = text
            .split_once(':')
            .ok_or_else(|| AuditHeadError::NoSeparator {
                given: shorten(text),
            })?;
        let bad_seq = || AuditHeadError::BadSeq {
            given: shorten(seq),
        };
        let canonical_digits = !seq.is_empty()
            && seq.bytes().all(|b| b.is_ascii_digit())
            && !(seq.len() > 1 && seq.starts_with('0'));
        if !canonical_digits {
            return Err(bad_seq());
        }
        let seq: u64 = seq.parse().map_err(|_| bad_seq())?;
        if seq == 0 {
            return Err(bad_seq());
        }
        let bad_hash = || AuditHeadError::BadHash {
            given: shorten(hash),
        };
        if hash.len() != 64 || !hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad_hash());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hash[2 * i..2 * i + 2], 16).map_err(|_| bad_hash())?;
        }
        Ok(Self { seq, hash: out })
    }
}

/// What a witness's `peer-head` record says that the checked log does not
/// bear out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WitnessProblem {
    /// The log ends before the witnessed seq: records were cut (or the whole
    /// log replaced by a shorter one).
    Missing { log_ends_at: u64 },
    /// The log has a different record at the witnessed seq: history up to
    /// there was rewritten (even if its own chain was recomputed to verify).
    Differs { found: String },
}

/// One witnessed head that the checked log contradicts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WitnessFinding {
    /// The witness node (its records' `node`).
    pub witness: String,
    /// The seq of the witness's `peer-head` record.
    pub witness_seq: u64,
    /// When the witness recorded it.
    pub witnessed_at: Timestamp,
    /// The head it recorded for the checked node.
    pub head: Head,
    pub problem: WitnessProblem,
}

impl fmt::Display for WitnessFinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seq {}: {} recorded (its record seq {}, at {}) that this node's log had hash {} there, but ",
            self.head.seq, self.witness, self.witness_seq, self.witnessed_at, self.head.hash
        )?;
        match &self.problem {
            WitnessProblem::Missing { log_ends_at } => write!(
                f,
                "the log ends at seq {log_ends_at}: records were cut from it after the witness saw them"
            ),
            WitnessProblem::Differs { found } => write!(
                f,
                "the record there has hash {found}: the log was rewritten after the witness saw it"
            ),
        }
    }
}

/// The result of [`verify_against_witnesses`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WitnessReport {
    /// The node whose log was checked.
    pub node: String,
    /// The witnesses whose logs held at least one head of `node`, sorted.
    pub witnesses: Vec<String>,
    /// How many witnessed heads were checked.
    pub checked: usize,
    /// The highest witnessed seq the log bears out: every record up to it
    /// is pinned by a witness (a hash covers all records before it).
    pub pinned_up_to: u64,
    /// Every witnessed head the log contradicts, in witness order.
    pub problems: Vec<WitnessFinding>,
}

impl WitnessReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks `node`'s log against the `peer-head` records other nodes' logs
/// hold about it: each witnessed (seq, hash) must be the record at that seq.
/// This is what catches a node that rewrote its own history and recomputed
/// its chain and head (its plain `verify` passes) or cut records others had
/// already seen. `log` must be a verified log or a verified prefix (records
/// in seq order from 1); witness logs should be verified by the caller, and
/// a witness's records about itself (the checked log passed as a witness)
/// are ignored.
pub fn verify_against_witnesses(
    node: &str,
    log: &[AuditRecord],
    witnesses: &[&[AuditRecord]],
) -> WitnessReport {
    let mut report = WitnessReport {
        node: node.to_string(),
        witnesses: Vec::new(),
        checked: 0,
        pinned_up_to: 0,
        problems: Vec::new(),
    };
    for witness_log in witnesses {
        for record in witness_log.iter() {
            let (EventKind::PeerHead, Some(peer), Some(head)) =
                (record.event, &record.peer, &record.peer_head)
            else {
                continue;
            };
            if peer != node || record.node == node {
                continue;
            }
            if !report.witnesses.contains(&record.node) {
                report.witnesses.push(record.node.clone());
            }
            report.checked += 1;
            let at = usize::try_from(head.seq)
                .ok()
                .and_then(|s| s.checked_sub(1));
            let problem = match at.map(|i| log.get(i)) {
                // seq 0 pins nothing (no published head has it).
                None => continue,
                Some(None) => WitnessProblem::Missing {
                    log_ends_at: log.last().map_or(0, |r| r.seq),
                },
                Some(Some(found)) if found.hash != head.hash => WitnessProblem::Differs {
                    found: found.hash.clone(),
                },
                Some(Some(_)) => {
                    report.pinned_up_to = report.pinned_up_to.max(head.seq);
                    continue;
                }
            };
            report.problems.push(WitnessFinding {
                witness: record.node.clone(),
                witness_seq: record.seq,
                witnessed_at: record.time,
                head: head.clone(),
                problem,
            });
        }
    }
    report.witnesses.sort();
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::rotation::{KeyMeta, KeyState};
    use crate::keys::PrivateKey;

    fn ctx(reason: &str) -> Context {
        Context {
            node: "node-a".into(),
            actor: "cli:alice".into(),
            reason: reason.into(),
            time: Timestamp::from_second(1_790_000_000).unwrap(),
        }
    }

    /// A realistic log: init, stage, activate, destroy-old, then a revoke.
    fn sample() -> (String, Head) {
        let meta = |g: u64| {
            KeyMeta::new(
                g,
                Timestamp::from_second(1_790_000_000).unwrap(),
                PrivateKey::generate().public_key(),
            )
        };
        let mut events = Vec::new();
        let (mut state, ev) = KeyState::initial(meta(1));
        events.extend(ev);
        for step in 0..3 {
            let t = match step {
                0 => state.stage(meta(2)).unwrap(),
                1 => state.activate().unwrap(),
                _ => state.destroy_old().unwrap(),
            };
            events.extend(t.events);
            state = t.state;
        }
        events.extend(state.revoke(meta(3)).unwrap().events);
        let entries = events.iter().map(Entry::from_key_event).collect();
        let records = chain(&Head::empty(), &ctx("test"), entries).unwrap();
        let mut log = String::new();
        for r in &records {
            log.push_str(&r.to_line().unwrap());
            log.push('\n');
        }
        (log, records.last().unwrap().head())
    }

    fn lines(log: &str) -> Vec<String> {
        log.lines().map(str::to_string).collect()
    }

    fn join(lines: &[String]) -> String {
        lines.iter().map(|l| format!("{l}\n")).collect()
    }

    fn bad_line(log: &str, head: &Head) -> usize {
        verify(log.as_bytes(), Some(head)).unwrap_err().line
    }

    #[test]
    fn an_untouched_log_verifies() {
        let (log, head) = sample();
        let v = verify(log.as_bytes(), Some(&head)).unwrap();
        assert_eq!(v.records.len(), lines(&log).len());
        assert_eq!(v.head, head);
        assert_eq!(v.records[0].prev_hash, GENESIS_HASH);
        assert!(verify(b"", None).unwrap().records.is_empty());
        assert!(verify(b"", Some(&Head::empty())).is_ok());
    }

    #[test]
    fn every_line_edit_is_caught_at_that_line() {
        let (log, head) = sample();
        let n = lines(&log).len();
        for target in 0..n {
            let mut l = lines(&log);
            l[target] = l[target].replace("\"reason\":\"test\"", "\"reason\":\"tset\"");
            let err = verify(join(&l).as_bytes(), Some(&head)).unwrap_err();
            assert_eq!(err.line, target + 1, "{err}");
            assert!(err.problem.contains("edited"), "{err}");
        }
    }

    #[test]
    fn an_edit_with_a_recomputed_hash_is_caught_at_that_line() {
        let (log, head) = sample();
        let n = lines(&log).len();
        for target in 0..n {
            let mut l = lines(&log);
            let mut r: AuditRecord = serde_json::from_str(&l[target]).unwrap();
            r.actor = "cli:mallory".into();
            r.hash = r.body_hash().unwrap();
            l[target] = r.to_line().unwrap();
            assert_eq!(bad_line(&join(&l), &head), target + 1);
        }
    }

    #[test]
    fn deletion_insertion_reorder_and_cut_name_the_right_line() {
        let (log, head) = sample();
        let orig = lines(&log);
        let n = orig.len();
        assert!(n >= 6);

        // Delete line 3.
        let mut l = orig.clone();
        l.remove(2);
        assert_eq!(bad_line(&join(&l), &head), 3);

        // Delete the last line: the anchor catches it.
        let mut l = orig.clone();
        l.pop();
        assert_eq!(bad_line(&join(&l), &head), n);

        // Insert a copy of line 2 as line 4.
        let mut l = orig.clone();
        l.insert(3, orig[1].clone());
        assert_eq!(bad_line(&join(&l), &head), 4);

        // Insert a forged but self-consistent record as line 4.
        let mut forged: AuditRecord = serde_json::from_str(&orig[2]).unwrap();
        forged.seq = 4;
        forged.prev_hash = serde_json::from_str::<AuditRecord>(&orig[2]).unwrap().hash;
        forged.reason = "forged".into();
        forged.hash = forged.body_hash().unwrap();
        let mut l = orig.clone();
        l.insert(3, forged.to_line().unwrap());
        assert_eq!(bad_line(&join(&l), &head), 4);

        // Swap lines 3 and 4.
        let mut l = orig.clone();
        l.swap(2, 3);
        assert_eq!(bad_line(&join(&l), &head), 3);

        // Cut the last line in the middle.
        let mut cut = log.clone();
        cut.truncate(log.len() - 20);
        assert_eq!(bad_line(&cut, &head), n);

        // Cut a middle line in the middle (and keep the rest).
        let mut l = orig.clone();
        l[1].truncate(40);
        assert_eq!(bad_line(&join(&l), &head), 2);

        // Drop the final newline only.
        assert_eq!(bad_line(&log[..log.len() - 1], &head), n);

        // Append a valid-looking record by hand.
        let last: AuditRecord = serde_json::from_str(&orig[n - 1]).unwrap();
        let extra = AuditRecord::new(
            &last.head(),
            &ctx("hand"),
            Entry::new(EventKind::Revoked, 9),
        )
        .unwrap();
        let mut l = orig.clone();
        l.push(extra.to_line().unwrap());
        assert_eq!(bad_line(&join(&l), &head), n + 1);

        // The head deleted.
        assert!(verify(log.as_bytes(), None).is_err());
    }

    #[test]
    fn whitespace_edits_are_caught() {
        let (log, head) = sample();
        let mut l = lines(&log);
        l[2] = l[2].replacen(',', ", ", 1);
        assert_eq!(bad_line(&join(&l), &head), 3);
    }

    #[test]
    fn garbage_never_panics() {
        for input in [
            &b"\xff\xfe"[..],
            b"\n\n\n",
            b"{}\n",
            b"null\n",
            b"[1,2,3]\n",
            b"{\"seq\":1}\n",
        ] {
            assert!(verify(input, Some(&Head::empty())).is_err());
        }
    }

    #[test]
    fn new_fields_are_left_out_when_empty_and_the_documented_recipe_still_hashes() {
        let (log, _) = sample();
        for line in log.lines() {
            for field in ["proof", "unconfirmed", "peer_head"] {
                assert!(!line.contains(field), "{line}");
            }
        }
        let mut entry = Entry::new(EventKind::PeerConfirmed, 2);
        entry.peer = Some("node-b".into());
        entry.proof = Some("handshake under key 0011223344556677 completed".into());
        let mut activated = Entry::new(EventKind::Activated, 2);
        activated.unconfirmed = Some(vec!["node-c".into()]);
        let mut seen = Entry::new(EventKind::PeerHead, 0);
        seen.peer = Some("node-b".into());
        seen.peer_head = Some(Head {
            seq: 4,
            hash: "ab".repeat(32),
        });
        let records = chain(&Head::empty(), &ctx("t"), vec![entry, activated, seen]).unwrap();
        let mut text = String::new();
        for r in &records {
            let line = r.to_line().unwrap();
            // keys/README.md: strip the hash field, sha256 the rest.
            let cut = line.rfind(",\"hash\":").unwrap();
            let body = format!("{}}}", &line[..cut]);
            assert_eq!(crate::text::hex(&Sha256::digest(body.as_bytes())), r.hash);
            text.push_str(&line);
            text.push('\n');
        }
        assert!(text.contains("\"proof\":\"handshake under key"));
        assert!(text.contains("\"unconfirmed\":[\"node-c\"]"));
        assert!(text.contains(&format!(
            "\"peer_head\":{{\"seq\":4,\"hash\":\"{}\"}}",
            "ab".repeat(32)
        )));
        let v = verify(text.as_bytes(), records.last().map(|r| r.head()).as_ref()).unwrap();
        assert_eq!(v.records, records);
        // An explicit null is not the canonical form: an edit.
        let nulled = text.replacen(",\"prev_hash\"", ",\"proof\":null,\"prev_hash\"", 2);
        assert!(verify(nulled.as_bytes(), Some(&v.head)).is_err());
    }

    #[test]
    fn audit_heads_parse_only_in_canonical_form() {
        let hash = "0f".repeat(32);
        let head: AuditHead = format!("12:{hash}").parse().unwrap();
        assert_eq!(head.seq, 12);
        assert_eq!(head.to_string(), format!("12:{hash}"));
        assert_eq!(AuditHead::from_head(&head.to_head()), Ok(head));
        for bad in [
            String::new(),
            "12".into(),
            format!("0:{hash}"),
            format!("012:{hash}"),
            format!("-1:{hash}"),
            format!(" 12:{hash}"),
            format!("12:{}", hash.to_uppercase()),
            format!("12:{hash}0"),
            format!("18446744073709551616:{hash}"),
        ] {
            assert!(bad.parse::<AuditHead>().is_err(), "{bad:?}");
        }
        let err = "12:xyz".parse::<AuditHead>().unwrap_err();
        assert!(err.to_string().contains("64 lowercase hex"), "{err}");
    }

    #[test]
    fn witnesses_only_speak_for_other_nodes() {
        let (log, _) = sample();
        let a: Vec<AuditRecord> = verify_chain(log.as_bytes()).unwrap().records;
        let claim = |witness: &str, about: &str, seq: u64, hash: &str| {
            let ctx = Context {
                node: witness.into(),
                ..ctx("witness")
            };
            let mut e = Entry::new(EventKind::PeerHead, 0);
            e.peer = Some(about.into());
            e.peer_head = Some(Head {
                seq,
                hash: hash.into(),
            });
            chain(&Head::empty(), &ctx, vec![e]).unwrap()
        };
        let good = claim("node-b", "node-a", 3, &a[2].hash);
        let other = claim("node-c", "node-x", 3, "00");
        let itself = claim("node-a", "node-a", 3, "00");
        let r = verify_against_witnesses("node-a", &a, &[&good, &other, &itself]);
        assert!(r.ok(), "{:?}", r.problems);
        assert_eq!((r.checked, r.pinned_up_to), (1, 3));
        assert_eq!(r.witnesses, ["node-b"]);
        let beyond = claim("node-c", "node-a", 99, &a[2].hash);
        let r = verify_against_witnesses("node-a", &a, &[&good, &beyond]);
        assert_eq!(r.problems.len(), 1);
        assert_eq!(
            r.problems[0].problem,
            WitnessProblem::Missing {
                log_ends_at: a.len() as u64
            }
        );
        assert!(r.problems[0].to_string().contains("cut"));
    }
}
