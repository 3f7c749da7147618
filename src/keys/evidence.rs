//! Evidence for a compliance reader: the key inventory built from the Nodes
//! (`wgmesh keys inventory`), the cryptoperiod policy it is judged against, and
//! the evidence bundle (`wgmesh keys evidence`): files an auditor keeps, listed
//! with their SHA-256 in a manifest.
//!
//! The inventory is pure (Nodes + policy + now → rows), so every status it can
//! report is tested in memory. The bundle writer and the log loader do file
//! I/O, like the store; nothing here touches the API or reads a private key.

use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Node;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::audit::{self, AuditHead, AuditRecord, Head, VerifyError};
use super::{Fingerprint, PublicKey};
use crate::node::{self, annotations as ann, Reason};

/// The default maximum key age (`--max-key-age`): 90 days. NIST SP 800-57
/// Pt 1 suggests 1–2 years for a static key-agreement key; a hitless rotation
/// makes a quarter cheap, and it is what PCI assessors commonly expect.
pub const DEFAULT_MAX_KEY_AGE: &str = "90d";
/// The manifest's file name in a bundle.
pub const MANIFEST: &str = "manifest.json";

pub type Result<T, E = EvidenceError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum EvidenceError {
    #[error("{given:?} is not a duration; write whole numbers with units, e.g. 90d, 12h, 2w or 1d12h (units: s, m, h, d, w)")]
    BadDuration { given: String },
    #[error("{dir} exists and is not empty; write an evidence bundle into a new or empty directory, so that nothing in it predates its manifest")]
    OutNotEmpty { dir: PathBuf },
    #[error("{name:?} is not a file name inside the bundle")]
    BadName { name: String },
    #[error("{file} is not a valid audit head ({detail}); the log beside it cannot be anchored")]
    BadHeadFile { file: PathBuf, detail: String },
    #[error("{file}: {source}")]
    Io {
        file: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot encode the bundle's manifest.json, so the bundle has no manifest and does not verify: {0}")]
    Manifest(#[source] serde_json::Error),
}

/// Parses `90d`, `12h`, `1d12h`, `2w`, `3600s` into seconds. Units: s, m, h,
/// d (24 h), w (7 d); each number needs a unit; the total must be above zero.
pub fn parse_duration(text: &str) -> Result<u64> {
    let bad = || EvidenceError::BadDuration {
        given: text.chars().take(40).collect(),
    };
    let mut total: u64 = 0;
    let mut number: Option<u64> = None;
    for c in text.trim().chars() {
        if let Some(digit) = c.to_digit(10) {
            let n = number.unwrap_or(0);
            number = Some(
                n.checked_mul(10)
                    .and_then(|n| n.checked_add(u64::from(digit)))
                    .ok_or_else(bad)?,
            );
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3_600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            _ => return Err(bad()),
        };
        let n = number.take().ok_or_else(bad)?;
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
    }
    if number.is_some() || total == 0 {
        return Err(bad());
    }
    Ok(total)
}

/// The shortest form [`parse_duration`] reads back: `90d`, `1d12h`, `45s`.
pub fn format_duration(seconds: u64) -> String {
    if seconds == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    let mut rest = seconds;
    for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
        if rest >= size {
            out.push_str(&format!("{}{unit}", rest / size));
            rest %= size;
        }
    }
    out
}

/// The cryptoperiod policy keys are judged against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Maximum age of a node's active static key, in seconds: a key this old
    /// or older is overdue for rotation.
    pub max_key_age: u64,
}

impl Policy {
    /// The policy as an auditor reads it (the bundle's `policy.json`).
    pub fn to_json(&self) -> Value {
        json!({
            "key_type": "WireGuard static key (x25519, static key-agreement key in NIST SP 800-57 terms), one per node",
            "max_key_age": format_duration(self.max_key_age),
            "max_key_age_seconds": self.max_key_age,
            "overdue_when": "age of the active key (now - wgmesh.dev/key-created) >= max_key_age",
            "rotation": "stage (next key published, peers pre-accept) -> peer-confirmed per peer on a completed handshake under the new key -> activated (unconfirmed peers recorded) -> grace-ended -> destroyed; abort withdraws a staged key; revoke replaces every key at once",
            "references": [
                "PCI DSS v4.0.1 3.7.4: defined cryptoperiod per key type, key change at its end",
                "NIST SP 800-57 Part 1 Rev. 5 section 5.3.6: static key-agreement key cryptoperiod 1-2 years",
            ],
            "fips": "not FIPS 140-3 validated: WireGuard uses X25519, ChaCha20-Poly1305 and BLAKE2s, which are not FIPS-approved",
            "audit_trail": "hash-chained audit log per node (SHA-256, unkeyed); each node publishes its head on its Node and records the heads of the others",
        })
    }
}

/// How a node's key stands against the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatus {
    /// Younger than the maximum age.
    Ok,
    /// At or past the maximum age: the cryptoperiod has ended.
    Overdue,
    /// A key is published, but not when it was created.
    AgeUnknown,
    /// The Node publishes no key (no wgmesh agent there, or not yet).
    NoKey,
    /// The published key is unusable.
    Invalid,
}

impl KeyStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            KeyStatus::Ok => "ok",
            KeyStatus::Overdue => "overdue",
            KeyStatus::AgeUnknown => "age-unknown",
            KeyStatus::NoKey => "no-key",
            KeyStatus::Invalid => "invalid",
        }
    }
}

/// One node of the inventory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InventoryRow {
    pub node: String,
    pub public_key: Option<PublicKey>,
    pub fingerprint: Option<Fingerprint>,
    pub generation: Option<u64>,
    pub created: Option<Timestamp>,
    /// `now - created`, 0 for a creation time in the future.
    pub age_seconds: Option<u64>,
    pub max_age_seconds: u64,
    pub status: KeyStatus,
    /// `staged` while the Node publishes `next-public-key`, else `idle`.
    /// (Whether a previous key is still held after an activation is not on
    /// the Node; that node's audit log says.)
    pub rotation: &'static str,
    pub next_fingerprint: Option<Fingerprint>,
    pub audit_head: Option<AuditHead>,
    /// `wgmesh.dev/last-rotation` as the node published it: when its last
    /// activation happened and whether every peer had confirmed.
    pub last_rotation: Option<String>,
    /// Every unusable key annotation, as `<annotation>: <reason>`, plus a
    /// creation time in the future.
    pub problems: Vec<String>,
}

/// The inventory of `nodes`, sorted by node name. Each key annotation is read
/// on its own, so a Node the mesh rejects for another field is still listed
/// with its key.
pub fn inventory(nodes: &[Node], policy: &Policy, now: Timestamp) -> Vec<InventoryRow> {
    let mut rows: Vec<InventoryRow> = nodes.iter().map(|n| row(n, policy, now)).collect();
    rows.sort_by(|a, b| a.node.cmp(&b.node));
    rows
}

fn row(node: &Node, policy: &Policy, now: Timestamp) -> InventoryRow {
    let fields = node::key_fields(node);
    let mut problems: Vec<String> = fields
        .errors
        .iter()
        .filter(|e| !(e.field == ann::PUBLIC_KEY && e.reason == Reason::Missing))
        .map(ToString::to_string)
        .collect();
    let age_seconds = fields.key_created.map(|created| {
        let age = now.as_second().saturating_sub(created.as_second());
        if age < 0 {
            problems.push(format!(
                "{}: {created} is in the future (clock skew between that node and this host?)",
                ann::KEY_CREATED
            ));
        }
        u64::try_from(age).unwrap_or(0)
    });
    let key_error = fields.errors.iter().any(|e| e.field == ann::PUBLIC_KEY);
    let status = match (fields.public_key, age_seconds) {
        (None, _) if key_error && problems.iter().any(|p| p.starts_with(ann::PUBLIC_KEY)) => {
            KeyStatus::Invalid
        }
        (None, _) => KeyStatus::NoKey,
        (Some(_), None) => KeyStatus::AgeUnknown,
        (Some(_), Some(age)) if age >= policy.max_key_age => KeyStatus::Overdue,
        (Some(_), Some(_)) => KeyStatus::Ok,
    };
    InventoryRow {
        node: fields.name,
        fingerprint: fields.public_key.map(|k| k.fingerprint()),
        public_key: fields.public_key,
        generation: fields.key_generation,
        created: fields.key_created,
        age_seconds,
        max_age_seconds: policy.max_key_age,
        status,
        rotation: if fields.next_public_key.is_some() {
            "staged"
        } else {
            "idle"
        },
        next_fingerprint: fields.next_public_key.map(|k| k.fingerprint()),
        audit_head: fields.audit_head,
        last_rotation: node
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(crate::node::annotations::LAST_ROTATION))
            .map(|v| v.chars().take(96).collect()),
        problems,
    }
}

/// Counts by status, for the summary line and the JSON.
pub fn summary(rows: &[InventoryRow]) -> Value {
    let count = |s: KeyStatus| rows.iter().filter(|r| r.status == s).count();
    json!({
        "nodes": rows.len(),
        "ok": count(KeyStatus::Ok),
        "overdue": count(KeyStatus::Overdue),
        "age_unknown": count(KeyStatus::AgeUnknown),
        "no_key": count(KeyStatus::NoKey),
        "invalid": count(KeyStatus::Invalid),
    })
}

/// `wgmesh keys inventory --output json` (and the bundle's `inventory.json`).
pub fn inventory_json(rows: &[InventoryRow], policy: &Policy, now: Timestamp) -> Value {
    let nodes: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "node": r.node,
                "status": r.status.as_str(),
                "overdue": r.status == KeyStatus::Overdue,
                "public_key": r.public_key,
                "fingerprint": r.fingerprint,
                "generation": r.generation,
                "key_created": r.created,
                "age_seconds": r.age_seconds,
                "max_age_seconds": r.max_age_seconds,
                "rotation": r.rotation,
                "next_fingerprint": r.next_fingerprint,
                "audit_head": r.audit_head.map(|h| json!({"seq": h.seq, "hash": h.hash_hex()})),
                "last_rotation": r.last_rotation,
                "problems": r.problems,
            })
        })
        .collect();
    json!({
        "generated_at": now,
        "policy": {"max_key_age": format_duration(policy.max_key_age), "max_key_age_seconds": policy.max_key_age},
        "summary": summary(rows),
        "nodes": nodes,
    })
}

/// The CSV header, in column order.
pub const CSV_HEADER: &[&str] = &[
    "node",
    "status",
    "overdue",
    "fingerprint",
    "generation",
    "key_created",
    "age_seconds",
    "max_age_seconds",
    "rotation",
    "next_fingerprint",
    "audit_head_seq",
    "audit_head_hash",
    "public_key",
    "last_rotation",
    "problems",
];

/// `--output csv`: RFC 4180 (CRLF line ends, quoted where needed), one row
/// per node, empty cells for unknown values, problems joined by `; `.
pub fn inventory_csv(rows: &[InventoryRow]) -> String {
    let mut out = String::new();
    let mut line = |cells: Vec<String>| {
        let cells: Vec<String> = cells.iter().map(|c| csv_cell(c)).collect();
        out.push_str(&cells.join(","));
        out.push_str("\r\n");
    };
    line(CSV_HEADER.iter().map(|h| h.to_string()).collect());
    let opt = |v: Option<String>| v.unwrap_or_default();
    for r in rows {
        line(vec![
            r.node.clone(),
            r.status.as_str().into(),
            (r.status == KeyStatus::Overdue).to_string(),
            opt(r.fingerprint.map(|f| f.to_string())),
            opt(r.generation.map(|g| g.to_string())),
            opt(r.created.map(|c| c.to_string())),
            opt(r.age_seconds.map(|a| a.to_string())),
            r.max_age_seconds.to_string(),
            r.rotation.into(),
            opt(r.next_fingerprint.map(|f| f.to_string())),
            opt(r.audit_head.map(|h| h.seq.to_string())),
            opt(r.audit_head.map(|h| h.hash_hex())),
            opt(r.public_key.map(|k| k.to_base64())),
            opt(r.last_rotation.clone()),
            r.problems.join("; "),
        ]);
    }
    out
}

fn csv_cell(cell: &str) -> String {
    if cell.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", cell.replace('"', "\"\""))
    } else {
        cell.to_string()
    }
}

/// `--output text`: a table, then one line per problem.
pub fn inventory_text(rows: &[InventoryRow], policy: &Policy) -> String {
    let table_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let dash = || "-".to_string();
            vec![
                r.node.clone(),
                match r.status {
                    KeyStatus::Overdue => "OVERDUE".into(),
                    s => s.as_str().into(),
                },
                r.fingerprint.map_or_else(dash, |f| f.to_string()),
                r.generation.map_or_else(dash, |g| g.to_string()),
                r.created
                    .map_or_else(dash, |c| c.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()),
                r.age_seconds.map_or_else(dash, |a| {
                    format!("{}/{}", format_age(a), format_duration(policy.max_key_age))
                }),
                match r.next_fingerprint {
                    Some(next) => format!("staged ({next})"),
                    None => r.rotation.into(),
                },
                r.audit_head
                    .map_or_else(dash, |h| format!("{}:{}…", h.seq, &h.hash_hex()[..16])),
                r.last_rotation.clone().unwrap_or_else(dash),
            ]
        })
        .collect();
    let header = [
        "NODE",
        "STATUS",
        "FINGERPRINT",
        "GEN",
        "KEY CREATED (UTC)",
        "AGE/MAX",
        "ROTATION",
        "AUDIT HEAD",
        "LAST ROTATION",
    ];
    let mut out = crate::text::table(&header, &table_rows);
    for r in rows {
        for p in &r.problems {
            out.push_str(&format!("{}: {p}\n", r.node));
        }
    }
    out
}

/// Whole days once past one, else hours or seconds: `91d`, `5h`, `40s`.
fn format_age(seconds: u64) -> String {
    match seconds {
        s if s >= 86_400 => format!("{}d", s / 86_400),
        s if s >= 3_600 => format!("{}h", s / 3_600),
        s => format!("{s}s"),
    }
}

/// An audit log read from a file or a store directory, for checking it (a
/// witness's log, or a log copied into a bundle).
#[derive(Debug, Clone)]
pub struct LoadedLog {
    /// The `audit.jsonl` read.
    pub log_path: PathBuf,
    /// The anchor read beside it, if there was one.
    pub head_path: Option<PathBuf>,
    pub log: Vec<u8>,
    pub head_file: Option<Vec<u8>>,
    /// The log's node (its first record's `node`), if it has records.
    pub node: Option<String>,
    /// The verified records, or those before the first bad line.
    pub records: Vec<AuditRecord>,
    /// The log's own verification: against the anchor when there is one,
    /// else of the chain alone (a cut at the end cannot be ruled out).
    pub verified: std::result::Result<Head, VerifyError>,
}

/// Reads a log: `path` is a directory holding `audit.jsonl` (a store, a
/// bundle) or a `*.jsonl` file. The anchor is `audit.head` in the directory,
/// or, for a file, the same name with `.head` for `.jsonl`; without one, only
/// the chain is verified.
pub fn load_log(path: &Path) -> Result<LoadedLog> {
    let (log_path, head_path) = if path.is_dir() {
        (path.join("audit.jsonl"), path.join("audit.head"))
    } else {
        let name = path.to_string_lossy();
        let head = match name.strip_suffix(".jsonl") {
            Some(stem) => PathBuf::from(format!("{stem}.head")),
            None => PathBuf::from(format!("{name}.head")),
        };
        (path.to_path_buf(), head)
    };
    let log = fs::read(&log_path).map_err(io_err(&log_path))?;
    let head_file = match fs::read(&head_path) {
        Ok(data) => Some(data),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(&head_path)(e)),
    };
    let verified = match &head_file {
        Some(data) => {
            let head: Head =
                serde_json::from_slice(data).map_err(|e| EvidenceError::BadHeadFile {
                    file: head_path.clone(),
                    detail: e.to_string(),
                })?;
            audit::verify(&log, Some(&head))
        }
        None => audit::verify_chain(&log),
    };
    let records = match &verified {
        Ok(_) => audit::verify_chain(&log)
            .map(|v| v.records)
            .unwrap_or_default(),
        Err(e) => audit::readable_prefix(&log, e),
    };
    Ok(LoadedLog {
        node: records.first().map(|r| r.node.clone()),
        head_path: head_file.as_ref().map(|_| head_path),
        verified: verified.map(|v| v.head),
        log_path,
        log,
        head_file,
        records,
    })
}

/// A file written into a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleFile {
    /// Relative to the bundle directory, `/`-separated.
    pub name: String,
    pub sha256: String,
    pub bytes: u64,
}

/// A part a bundle should hold but does not, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingPart {
    pub name: String,
    pub why: String,
}

/// An evidence bundle being written: every file goes through [`Bundle::add`]
/// so the manifest lists its SHA-256, and every part that could not be
/// produced through [`Bundle::missing`] so the manifest says so.
#[derive(Debug)]
pub struct Bundle {
    dir: PathBuf,
    files: Vec<BundleFile>,
    missing: Vec<MissingPart>,
}

impl Bundle {
    /// Creates `dir` (or takes an empty one). A non-empty directory is
    /// refused: files the manifest does not list would sit beside the evidence.
    pub fn create(dir: &Path) -> Result<Self> {
        match fs::read_dir(dir) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(EvidenceError::OutNotEmpty {
                        dir: dir.to_path_buf(),
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(dir).map_err(io_err(dir))?;
            }
            Err(e) => return Err(io_err(dir)(e)),
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files: Vec::new(),
            missing: Vec::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `data` as `name` (which may name a subdirectory: `witnesses/x`),
    /// never over an existing file, and records its digest.
    pub fn add(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let safe = !name.is_empty()
            && !name.starts_with('/')
            && name
                .split('/')
                .all(|part| !part.is_empty() && part != "." && part != "..")
            && name != MANIFEST;
        if !safe {
            return Err(EvidenceError::BadName { name: name.into() });
        }
        let path = self.dir.join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        write_new(&path, data)?;
        self.files.push(BundleFile {
            name: name.to_string(),
            sha256: crate::text::hex(&Sha256::digest(data)),
            bytes: data.len() as u64,
        });
        Ok(())
    }

    /// Records that `name` could not be produced, and why.
    pub fn missing(&mut self, name: &str, why: impl Into<String>) {
        self.missing.push(MissingPart {
            name: name.to_string(),
            why: why.into(),
        });
    }

    pub fn files(&self) -> &[BundleFile] {
        &self.files
    }

    pub fn missing_parts(&self) -> &[MissingPart] {
        &self.missing
    }

    /// Writes `manifest.json`: the tool and version, the time, `extra`
    /// (node, policy, verification summary), every file with its SHA-256,
    /// and every missing part. Returns the manifest's own SHA-256, which the
    /// operator records elsewhere to pin the whole bundle.
    pub fn finish(self, created: Timestamp, extra: Value) -> Result<String> {
        let files: Vec<Value> = self
            .files
            .iter()
            .map(|f| json!({"name": f.name, "sha256": f.sha256, "bytes": f.bytes}))
            .collect();
        let missing: Vec<Value> = self
            .missing
            .iter()
            .map(|m| json!({"name": m.name, "why": m.why}))
            .collect();
        let manifest = json!({
            "format": 1,
            "tool": "wgmesh",
            "version": crate::VERSION,
            "created": created,
            "complete": self.missing.is_empty(),
            "about": extra,
            "files": files,
            "missing": missing,
            "check": "sha256sum -c: jq -r '.files[] | \"\\(.sha256)  \\(.name)\"' manifest.json | sha256sum -c",
        });
        let mut text = serde_json::to_vec_pretty(&manifest).map_err(EvidenceError::Manifest)?;
        text.push(b'\n');
        write_new(&self.dir.join(MANIFEST), &text)?;
        Ok(crate::text::hex(&Sha256::digest(&text)))
    }
}

/// Creates `path` exclusively and writes `data`, synced: evidence is never
/// written over something that was there.
fn write_new(path: &Path, data: &[u8]) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err(path))?;
    file.write_all(data)
        .and_then(|()| file.sync_all())
        .map_err(io_err(path))
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> EvidenceError + '_ {
    move |source| EvidenceError::Io {
        file: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;
    use crate::keys::PrivateKey;

    const DAY: u64 = 86_400;

    fn now() -> Timestamp {
        "2026-11-21T12:00:00Z".parse().unwrap()
    }

    fn node(name: &str, annotations: &[(&str, String)]) -> Node {
        let annotations: BTreeMap<String, String> = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                annotations: Some(annotations),
                ..ObjectMeta::default()
            },
            ..Node::default()
        }
    }

    fn keyed(name: &str, age_days: i64, extra: &[(&str, String)]) -> Node {
        let created = now()
            .checked_sub(jiff::SignedDuration::from_hours(24 * age_days))
            .unwrap();
        let mut a = vec![
            (
                ann::PUBLIC_KEY,
                PrivateKey::generate().public_key().to_base64(),
            ),
            (ann::KEY_GENERATION, "4".to_string()),
            (ann::KEY_CREATED, format!("{created:.0}")),
        ];
        a.extend(extra.iter().cloned());
        node(name, &a)
    }

    #[test]
    fn durations_parse_and_print_back() {
        for (text, seconds) in [
            ("90d", 90 * DAY),
            ("12h", 12 * 3_600),
            ("1d12h", DAY + 12 * 3_600),
            ("2w", 14 * DAY),
            ("45s", 45),
            ("30m", 1_800),
        ] {
            assert_eq!(parse_duration(text).unwrap(), seconds, "{text}");
            assert_eq!(parse_duration(&format_duration(seconds)).unwrap(), seconds);
        }
        assert_eq!(format_duration(90 * DAY), "90d");
        assert_eq!(format_duration(DAY + 12 * 3_600), "1d12h");
        for bad in [
            "",
            "90",
            "d",
            "0d",
            "9x",
            "1.5d",
            "-1d",
            "99999999999999999999d",
        ] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.to_string().contains("90d"), "{bad}: {err}");
        }
    }

    #[test]
    fn inventory_flags_each_status_and_reads_every_key_field() {
        let policy = Policy {
            max_key_age: 90 * DAY,
        };
        let next = PrivateKey::generate().public_key();
        let head: AuditHead = format!("7:{}", "ab".repeat(32)).parse().unwrap();
        let nodes = vec![
            keyed("node-c", 91, &[]),
            keyed(
                "node-a",
                10,
                &[
                    (ann::NEXT_PUBLIC_KEY, next.to_base64()),
                    (ann::AUDIT_HEAD, head.to_string()),
                    // Another field broken: the key is still inventoried.
                    (ann::ENDPOINT, "garbage".into()),
                ],
            ),
            keyed("node-b", 90, &[(ann::AUDIT_HEAD, "nonsense".into())]),
            node("node-d", &[]),
            node("node-e", &[(ann::PUBLIC_KEY, "short".into())]),
            node(
                "node-f",
                &[(
                    ann::PUBLIC_KEY,
                    PrivateKey::generate().public_key().to_base64(),
                )],
            ),
            keyed("node-g", -2, &[]),
        ];
        let rows = inventory(&nodes, &policy, now());
        let names: Vec<&str> = rows.iter().map(|r| r.node.as_str()).collect();
        assert_eq!(
            names,
            ["node-a", "node-b", "node-c", "node-d", "node-e", "node-f", "node-g"]
        );
        let status: Vec<KeyStatus> = rows.iter().map(|r| r.status).collect();
        assert_eq!(
            status,
            [
                KeyStatus::Ok,
                KeyStatus::Overdue, // exactly at the maximum: the period has ended
                KeyStatus::Overdue,
                KeyStatus::NoKey,
                KeyStatus::Invalid,
                KeyStatus::AgeUnknown,
                KeyStatus::Ok,
            ]
        );
        let a = &rows[0];
        assert_eq!(a.rotation, "staged");
        assert_eq!(a.next_fingerprint, Some(next.fingerprint()));
        assert_eq!(a.audit_head, Some(head));
        assert_eq!(a.generation, Some(4));
        assert_eq!(a.age_seconds, Some(10 * DAY));
        assert!(a.problems.is_empty(), "{:?}", a.problems);
        assert_eq!(rows[1].audit_head, None);
        assert!(
            rows[1].problems[0].starts_with(ann::AUDIT_HEAD),
            "{:?}",
            rows[1].problems
        );
        assert_eq!(rows[2].rotation, "idle");
        assert!(rows[4].problems[0].starts_with(ann::PUBLIC_KEY));
        assert!(
            rows[3].problems.is_empty(),
            "a node without wgmesh is no error"
        );
        assert!(
            rows[6].problems[0].contains("future"),
            "{:?}",
            rows[6].problems
        );
        assert_eq!(rows[6].age_seconds, Some(0));

        let json = inventory_json(&rows, &policy, now());
        assert_eq!(json["summary"]["overdue"], 2);
        assert_eq!(json["policy"]["max_key_age"], "90d");
        assert_eq!(json["nodes"][0]["audit_head"]["seq"], 7);
        assert_eq!(json["nodes"][2]["overdue"], true);

        let csv = inventory_csv(&rows);
        let lines: Vec<&str> = csv.split("\r\n").collect();
        assert_eq!(lines[0], CSV_HEADER.join(","));
        assert_eq!(lines.len(), rows.len() + 2, "header, rows, final CRLF");
        assert!(lines[3].starts_with("node-c,overdue,true,"), "{}", lines[3]);
        // A problem text with a comma and quotes is quoted.
        assert!(lines[2].contains("\"\"nonsense\"\""), "{}", lines[2]);
        assert!(lines[2].ends_with('"'), "{}", lines[2]);
        let text = inventory_text(&rows, &policy);
        assert!(
            text.contains("OVERDUE") && text.contains("91d/90d"),
            "{text}"
        );
        assert!(text.contains("node-b: wgmesh.dev/audit-head"), "{text}");
    }

    #[test]
    fn a_bundle_lists_every_file_with_its_digest_and_what_is_missing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("bundle");
        let mut bundle = Bundle::create(&dir).unwrap();
        bundle.add("policy.json", b"{}\n").unwrap();
        bundle
            .add("witnesses/1-node-b/audit.jsonl", b"x\n")
            .unwrap();
        for bad in ["", "/etc/passwd", "../x", "a//b", MANIFEST, "a/./b"] {
            assert!(
                matches!(bundle.add(bad, b""), Err(EvidenceError::BadName { .. })),
                "{bad}"
            );
        }
        assert!(
            bundle.add("policy.json", b"again").is_err(),
            "never overwritten"
        );
        bundle.missing("inventory.json", "cannot read Nodes from the API: refused");
        let digest = bundle.finish(now(), json!({"node": "node-a"})).unwrap();
        let text = fs::read(dir.join(MANIFEST)).unwrap();
        assert_eq!(digest, crate::text::hex(&Sha256::digest(&text)));
        let m: Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(m["complete"], false);
        assert_eq!(m["version"], crate::VERSION);
        assert_eq!(m["missing"][0]["name"], "inventory.json");
        assert_eq!(m["files"][0]["name"], "policy.json");
        assert_eq!(
            m["files"][0]["sha256"],
            crate::text::hex(&Sha256::digest(b"{}\n"))
        );
        assert_eq!(m["files"][1]["bytes"], 2);
        // A bundle directory is never reused.
        assert!(matches!(
            Bundle::create(&dir),
            Err(EvidenceError::OutNotEmpty { .. })
        ));
    }
}
