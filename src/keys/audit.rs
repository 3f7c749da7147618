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
//! somewhere they cannot write (a ticket, a SIEM) closes that gap.

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
    /// Recovery: the records of an operation were written (write-ahead) but
    /// `state.json` never committed it, so the change they describe did not
    /// happen. `reason` names their seq range; the fingerprints and generation
    /// are those of the operation's main record.
    Aborted,
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
    /// For `peer-confirmed`: the peer node's name.
    pub peer: Option<String>,
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
    prev_hash: &'a str,
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
}

impl Entry {
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
        };
        Self {
            event: kind,
            old_fingerprint: old.map(|k| k.fingerprint),
            new_fingerprint: new.map(|k| k.fingerprint),
            generation,
            peer: None,
        }
    }
}

impl AuditRecord {
    /// Chains `entry` after `head`.
    pub fn new(head: &Head, ctx: &Context, entry: Entry) -> Self {
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
            prev_hash: head.hash.clone(),
            hash: String::new(),
        };
        record.hash = record.body_hash();
        record
    }

    /// The SHA-256 of this record's canonical body (everything but `hash`).
    pub fn body_hash(&self) -> String {
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
            prev_hash: &self.prev_hash,
        };
        // Serializing plain strings, integers and options cannot fail.
        let json = serde_json::to_vec(&body).unwrap_or_default();
        crate::text::hex(&Sha256::digest(json))
    }

    /// The record as one line of the log, without the newline.
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn head(&self) -> Head {
        Head {
            seq: self.seq,
            hash: self.hash.clone(),
        }
    }
}

/// Builds the records for a sequence of entries, chained after `head`.
pub fn chain(head: &Head, ctx: &Context, entries: Vec<Entry>) -> Vec<AuditRecord> {
    let mut head = head.clone();
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let record = AuditRecord::new(&head, ctx, entry);
        head = record.head();
        out.push(record);
    }
    out
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
        if record.to_line() != *raw {
            return Err(bad(
                "is not in the canonical form wgmesh writes (fields reordered, spacing changed or values re-encoded): the line was edited".into(),
            ));
        }
        if record.body_hash() != record.hash {
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
        let records = chain(&Head::empty(), &ctx("test"), entries);
        let mut log = String::new();
        for r in &records {
            log.push_str(&r.to_line());
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
            r.hash = r.body_hash();
            l[target] = r.to_line();
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
        forged.hash = forged.body_hash();
        let mut l = orig.clone();
        l.insert(3, forged.to_line());
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
            Entry {
                event: EventKind::Revoked,
                old_fingerprint: None,
                new_fingerprint: None,
                generation: 9,
                peer: None,
            },
        );
        let mut l = orig.clone();
        l.push(extra.to_line());
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
}
