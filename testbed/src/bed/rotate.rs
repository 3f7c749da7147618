//! `rotate`: the rotation drill. While every pod pair exchanges UDP datagrams with
//! sequence numbers and the underlay capture runs, one node (or every node) is asked
//! to rotate its static key through its Node (`wgmesh.dev/rotate-requested`), the
//! way an operator would with kubectl; the agents do the rest (stage, confirm per
//! peer, activate, grace, destroy; with several nodes they stagger themselves).
//!
//! Passes when every rotated node's `key-generation` went +1, its `next-public-key`
//! is gone, its store is idle and its audit log records the old key `destroyed`;
//! every other node confirmed the new key with a proof; no datagram was lost on any
//! pair; the capture saw no plaintext and is complete; every node's audit log
//! verifies on its own and against the other nodes' logs as witnesses; an edited
//! record and a log rolled back to an older copy are both caught; and the mesh is
//! whole afterwards.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::capture::Capture;
use super::check::Outcome;
use super::drill::mesh_consistent;
use super::state::{NodeBackend, NodeRecord};
use super::sys;
use super::topology::{help_has_flag, unix_now, Testbed, ROTATION_TIMINGS};
use super::traffic::{FlowResult, FlowSpec, Flows};
use super::{Error, Result};

/// The annotation an operator sets to ask a node's agent to rotate now.
pub const ROTATE_REQUESTED: &str = "wgmesh.dev/rotate-requested";
/// Default datagrams per second per pod pair (half each way).
pub const DEFAULT_PPS: u32 = 1000;
/// First UDP port of the drill's flows (two per pod pair).
const PORT_BASE: u16 = 45000;

/// The longest pause the key hand-over of a rotating kernel (single-identity)
/// node may cause on its outgoing flows, times the drills' time scale. The VM
/// tier measured 56-213 ms for the hand-over itself (tests/kernel_vm.rs); the
/// rest is the peers' agents seeing the new key.
const HANDOVER_BASE_S: f64 = 2.0;

/// The node a flow label (`n2-p1 -> n1-p1`) sends from.
fn sender_node(label: &str) -> Option<&str> {
    let pod = label.split(" -> ").next()?;
    pod.rsplit_once("-p").map(|(node, _)| node)
}

/// What to rotate and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// Nodes to rotate (all of them are asked at once).
    pub nodes: Vec<String>,
    /// Datagrams per second per pod pair (half each way).
    pub pps: u32,
    /// How long to wait for every rotation to finish.
    pub timeout: Duration,
}

impl Options {
    /// The default time limit: the agents' confirmation deadline (30 s) and grace
    /// (10 s), their stagger (5 s per node) and a margin.
    pub fn default_timeout(nodes: usize) -> Duration {
        Duration::from_secs(90 + 5 * nodes as u64)
    }
}

/// One rotated node, as watched.
#[derive(Debug, Clone, Default)]
struct Watch {
    node: String,
    store: PathBuf,
    old_generation: u64,
    old_key: String,
    old_fingerprint: String,
    /// The audit head seq before the trigger: records after it are this drill's.
    seq_before: u64,
    /// Seconds after the trigger.
    next_key_published: Option<f64>,
    generation_bumped: Option<f64>,
    next_key_gone: Option<f64>,
    store_idle: Option<f64>,
    old_destroyed: Option<f64>,
    /// The generation and key published at the end.
    new_generation: Option<u64>,
    new_key: Option<String>,
    last_cli_check: Option<Instant>,
}

impl Watch {
    fn done(&self) -> bool {
        self.next_key_gone.is_some() && self.store_idle.is_some() && self.old_destroyed.is_some()
    }
}

/// Runs the drill, printing as it goes; returns one outcome per criterion.
pub fn run(tb: &mut Testbed, opts: &Options) -> Result<Vec<Outcome>> {
    let mut outcomes = Vec::new();
    println!(
        "== rotation drill on testbed {} ({} nodes): rotate {} at {} datagrams/s per pod pair",
        tb.state.id,
        tb.state.nodes.len(),
        opts.nodes.join(", "),
        opts.pps
    );
    // The agents must run with short rotation timings, or a rotation takes
    // minutes (a 10-minute confirmation deadline, a 3-minute grace by default).
    let missing = missing_rotation_flags(tb);
    if !missing.is_empty() {
        let help =
            sys::run(&[&tb.wgmesh.display().to_string(), "agent", "--help"]).unwrap_or_default();
        let now_has: Vec<&str> = missing
            .iter()
            .copied()
            .filter(|f| help_has_flag(&help, f))
            .collect();
        let why = if now_has.len() == missing.len() {
            "the binary has them now, but this testbed's agents were started without them: \
             `down` and `up` again"
                .to_string()
        } else {
            format!(
                "`{} agent --help` has no {}",
                tb.wgmesh.display(),
                missing
                    .iter()
                    .filter(|f| !now_has.contains(f))
                    .map(|f| format!("`{f}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        outcomes.push(Outcome::new(
            "rotation-timings",
            false,
            format!("the agents do not run with {}: {why}", missing.join(", ")),
        ));
        return Ok(outcomes);
    }
    println!("agents run with {}", tb.state.rotation_flags.join(" "));
    for name in &opts.nodes {
        if tb.state.node(name).is_none() {
            return Err(Error::Other(format!("no node {name} (see `status`)")));
        }
    }
    let t = Instant::now();
    tb.wait_mesh(Duration::from_secs(60))?;
    let mut t_ok = None;
    while t.elapsed() < Duration::from_secs(30) {
        if mesh_consistent(tb).is_ok() {
            t_ok = Some(t.elapsed().as_secs_f64());
            break;
        }
        sys::sleep(Duration::from_millis(100))?;
    }
    match t_ok {
        Some(s) => println!("mesh whole (every device has every published key) after {s:.2} s"),
        None => {
            let why = mesh_consistent(tb).err().unwrap_or_default();
            outcomes.push(Outcome::new(
                "mesh-whole-before",
                false,
                format!("the mesh is not whole before the drill: {why}"),
            ));
            return Ok(outcomes);
        }
    }

    // Where the drill keeps copies of audit logs (for the tamper checks).
    let work = tb.state.dir.join(format!("rotate-{}", unix_now() as u64));
    std::fs::create_dir_all(&work).map_err(|e| Error::io(work.display().to_string(), e))?;

    let nodes_json = node_annotations(tb)?;
    let mut watches = Vec::new();
    for name in &opts.nodes {
        let n = tb.state.node(name).cloned().expect("checked above");
        let ann = nodes_json.get(name).cloned().unwrap_or(Value::Null);
        let show = keys_show(tb, &n.store)?;
        let phase = show["phase"].as_str().unwrap_or("?");
        if phase != "idle" || ann.get("wgmesh.dev/next-public-key").is_some() {
            return Err(Error::Other(format!(
                "{name} is not idle before the drill (store phase {phase}, next-public-key {:?})",
                ann.get("wgmesh.dev/next-public-key")
            )));
        }
        let old_generation = ann["wgmesh.dev/key-generation"]
            .as_str()
            .and_then(|g| g.parse().ok())
            .ok_or_else(|| Error::Other(format!("{name} has no key-generation on its Node")))?;
        let old_key = ann["wgmesh.dev/public-key"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let old_fingerprint = show["active"]["fingerprint"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let store_gen = show["active"]["generation"].as_u64().unwrap_or(0);
        if store_gen != old_generation || show["active"]["public_key"].as_str() != Some(&old_key) {
            return Err(Error::Other(format!(
                "{name}'s Node (generation {old_generation}, key {old_key}) does not match its store (generation {store_gen}, key {})",
                show["active"]["public_key"]
            )));
        }
        watches.push(Watch {
            node: name.clone(),
            store: n.store.clone(),
            old_generation,
            old_key,
            old_fingerprint,
            seq_before: audit_records(tb, &n.store)?.last().map_or(0, seq),
            ..Default::default()
        });
    }
    // An older copy of the first rotated node's log, for the rollback check.
    let rollback_copy = work.join(format!("{}-before", watches[0].node));
    copy_consistent_log(tb, &watches[0].store, &rollback_copy)?;
    for w in &watches {
        println!(
            "  {}: generation {}, key {} (fingerprint {}), audit head seq {}",
            w.node, w.old_generation, w.old_key, w.old_fingerprint, w.seq_before
        );
    }

    let specs = pair_flows(tb, opts.pps, opts.timeout + Duration::from_secs(10))?;
    let pairs = specs.len() / 2;
    println!(
        "  traffic: {pairs} pod pair(s), {} datagrams/s each way per pair, {} datagrams/s in all",
        opts.pps / 2,
        (opts.pps / 2) as usize * specs.len()
    );
    let capture = Capture::start(tb, "rotate")?;
    let t_cap = unix_now();
    let body = drive(tb, opts, specs, &mut watches);
    let t_end = unix_now();
    let captured = capture.stop(tb)?;
    let (results, t_trigger) = body?;

    // ---- traffic
    println!("\n== traffic (UDP with sequence numbers, per pod pair)");
    let mut total_sent = 0u64;
    let mut total_lost = 0u64;
    let mut worst = Vec::new();
    // A rotating node on kernel WireGuard holds one identity: it switches its
    // key first and each peer follows once it sees the new key on the Node
    // (docs/agent.md), so its outgoing traffic pauses for that hand-over, by
    // design. Such a pause, up to `handover_max`, is reported, not counted as
    // loss; every other flow must lose nothing.
    let single: Vec<&str> = watches
        .iter()
        .filter(|w| {
            tb.state
                .node(&w.node)
                .is_some_and(|n| n.backend == NodeBackend::Kernel)
        })
        .map(|w| w.node.as_str())
        .collect();
    let handover_max = Duration::from_secs_f64(HANDOVER_BASE_S * super::drill::time_scale()?);
    let mut handovers = Vec::new();
    let mut handover_lost = 0u64;
    for pair in results.chunks(2) {
        let sent: u64 = pair.iter().map(|r| r.sent.len() as u64).sum();
        let mut lost = 0;
        for r in pair {
            let from_single = sender_node(&r.label).is_some_and(|n| single.contains(&n));
            if from_single && r.lost() > 0 && r.longest_outage() <= handover_max {
                handover_lost += r.lost();
                handovers.push(format!(
                    "{}: {} lost, paused {:.0} ms",
                    r.label,
                    r.lost(),
                    r.longest_outage().as_secs_f64() * 1000.0
                ));
            } else {
                lost += r.lost();
            }
        }
        let secs = pair
            .iter()
            .filter_map(|r| Some(r.sent.last()?.duration_since(*r.sent.first()?)))
            .max()
            .unwrap_or_default()
            .as_secs_f64();
        total_sent += sent;
        total_lost += lost;
        let label = pair[0].label.replace(" -> ", " <-> ");
        println!(
            "  {label:28} sent {sent:>7}, lost {lost:>5} ({:.0} datagrams/s over {secs:.1} s)",
            if secs > 0.0 { sent as f64 / secs } else { 0.0 }
        );
        for r in pair {
            println!("      {}", r.summary());
        }
        if lost > 0 || sent == 0 {
            worst.push(format!("{label}: {lost} of {sent}"));
        }
    }
    println!("  total: sent {total_sent}, lost {total_lost} (+ {handover_lost} in kernel hand-over pauses)");
    let handover_note = if handovers.is_empty() {
        String::new()
    } else {
        format!(
            "; the single-identity hand-over of {} paused its outgoing flows (limit {:.1} s): {}",
            single.join(", "),
            handover_max.as_secs_f64(),
            handovers.join(", ")
        )
    };
    outcomes.push(Outcome::new(
        "traffic-no-loss",
        worst.is_empty() && total_sent > 0,
        if worst.is_empty() {
            format!(
                "0 of {total_sent} datagrams lost over {pairs} pod pair(s) at {} datagrams/s per pair{handover_note}",
                opts.pps
            )
        } else {
            format!(
                "{total_lost} of {total_sent} datagrams lost; pairs with loss: {}",
                worst.join(", ")
            )
        },
    ));

    // ---- capture
    println!("\n== underlay capture");
    let before = captured.counts(Some((t_cap, t_trigger)));
    let during = captured.counts(Some((t_trigger, t_end + 1.0)));
    let all = captured.counts(None);
    println!("  before the trigger: {}", before.summary());
    println!("  trigger until done: {}", during.summary());
    println!(
        "  whole drill: {}; {} ({})",
        all.summary(),
        captured.completeness(),
        captured.file.display()
    );
    for l in &all.plaintext_sample {
        println!("    plaintext: {l}");
    }
    outcomes.push(Outcome::new(
        "capture-ciphertext-only",
        all.wireguard > 0 && all.plaintext() == 0 && captured.complete(),
        format!(
            "{} WireGuard datagrams, {} plaintext packets; {}",
            all.wireguard,
            all.plaintext(),
            captured.completeness()
        ),
    ));

    // ---- per node: what was watched, and the audit records
    let everyone: Vec<String> = tb.state.nodes.iter().map(|n| n.name.clone()).collect();
    println!("\n== rotations (seconds after the trigger)");
    for w in &watches {
        let show = |v: Option<f64>| {
            v.map(|s| format!("{s:.1} s"))
                .unwrap_or_else(|| "never".into())
        };
        println!(
            "  {}: next-public-key on its Node {}; key-generation {} -> {} {}; next-public-key gone {}; store idle {}; old key {} destroyed {}",
            w.node,
            show(w.next_key_published),
            w.old_generation,
            w.new_generation.map_or("?".into(), |g| g.to_string()),
            show(w.generation_bumped),
            show(w.next_key_gone),
            show(w.store_idle),
            w.old_fingerprint,
            show(w.old_destroyed),
        );
        let bumped = w.new_generation == Some(w.old_generation + 1);
        outcomes.push(Outcome::new(
            format!("rotated {}", w.node),
            w.done() && bumped && w.new_key.as_deref() != Some(&w.old_key),
            if w.done() && bumped {
                format!(
                    "generation {} -> {} in {:.1} s, next-public-key gone, store idle, old key {} destroyed",
                    w.old_generation,
                    w.old_generation + 1,
                    w.old_destroyed.unwrap_or_default().max(w.store_idle.unwrap_or_default()),
                    w.old_fingerprint
                )
            } else {
                format!(
                    "not rotated within {:.0} s: key-generation {} -> {}, next-public-key {}, store {}, old key {}",
                    opts.timeout.as_secs_f64(),
                    w.old_generation,
                    w.new_generation.map_or("?".into(), |g| g.to_string()),
                    if w.next_key_gone.is_some() {
                        "gone"
                    } else if w.next_key_published.is_some() {
                        "still published"
                    } else {
                        "never published"
                    },
                    if w.store_idle.is_some() { "idle" } else { "not idle" },
                    if w.old_destroyed.is_some() {
                        "destroyed"
                    } else {
                        "NOT destroyed"
                    }
                )
            },
        ));
    }
    for w in &watches {
        let records = audit_records(tb, &w.store)?;
        let new: Vec<&Value> = records.iter().filter(|r| seq(r) > w.seq_before).collect();
        println!(
            "\n  {}'s audit records of this rotation (seq > {}; times from the records, + seconds after `staged`):",
            w.node, w.seq_before
        );
        let staged_at = new
            .iter()
            .find(|r| r["event"] == "staged")
            .and_then(|r| parse_rfc3339(r["time"].as_str()?));
        for r in &new {
            let time = r["time"].as_str().unwrap_or("?");
            let rel = match (staged_at, parse_rfc3339(time)) {
                (Some(s), Some(t)) => format!("{:>+4.0} s", (t - s).round()),
                _ => "      ".into(),
            };
            let mut what = String::new();
            if let Some(p) = r["peer"].as_str() {
                what.push_str(&format!("peer {p}; "));
            }
            if let Some(p) = r["proof"].as_str() {
                what.push_str(&format!("proof: {p}; "));
            }
            if let Some(u) = r["unconfirmed"].as_array() {
                what.push_str(&format!(
                    "unconfirmed: [{}]; ",
                    u.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            if let Some(h) = r.get("peer_head").filter(|h| !h.is_null()) {
                what.push_str(&format!(
                    "head seq {} {}; ",
                    h["seq"],
                    h["hash"]
                        .as_str()
                        .unwrap_or("")
                        .chars()
                        .take(16)
                        .collect::<String>()
                ));
            }
            what.push_str(&format!(
                "reason: {}; actor {}",
                r["reason"].as_str().unwrap_or(""),
                r["actor"].as_str().unwrap_or("")
            ));
            println!(
                "    seq {:>3} {time} {rel} {:15} gen {:>2} {what}",
                seq(r),
                r["event"].as_str().unwrap_or("?"),
                r["generation"]
            );
        }
        // Every other node's confirmation of the new key, each with its proof.
        let confirmed: BTreeMap<String, String> = new
            .iter()
            .filter(|r| r["event"] == "peer-confirmed")
            .filter_map(|r| {
                Some((
                    r["peer"].as_str()?.to_string(),
                    r["proof"].as_str().unwrap_or("").to_string(),
                ))
            })
            .collect();
        let want: Vec<&String> = everyone.iter().filter(|n| **n != w.node).collect();
        let missing: Vec<&str> = want
            .iter()
            .filter(|n| confirmed.get(n.as_str()).is_none_or(|p| p.is_empty()))
            .map(|n| n.as_str())
            .collect();
        let phases: Vec<String> = ["staged", "activated", "grace-ended", "destroyed"]
            .iter()
            .map(|e| {
                let t = new
                    .iter()
                    .find(|r| r["event"] == *e)
                    .and_then(|r| parse_rfc3339(r["time"].as_str()?));
                match (t, staged_at) {
                    (Some(t), Some(s)) => format!("{e} +{:.0} s", t - s),
                    _ => format!("{e} missing"),
                }
            })
            .collect();
        println!("    phases: {}", phases.join(", "));
        outcomes.push(Outcome::new(
            format!("confirmed {}", w.node),
            missing.is_empty() && !want.is_empty(),
            if missing.is_empty() {
                format!(
                    "{} of {} peers confirmed the new key with a proof; {}",
                    confirmed.len(),
                    want.len(),
                    phases.join(", ")
                )
            } else {
                format!(
                    "no peer-confirmed record with a proof from {} ({} of {} confirmed)",
                    missing.join(", "),
                    want.len() - missing.len(),
                    want.len()
                )
            },
        ));
    }

    // ---- audit logs: plain, and against every other node as witnesses
    println!(
        "\n== audit logs: `wgmesh keys audit verify`, plain and with the other nodes as witnesses"
    );
    let stores: Vec<(String, PathBuf)> = tb
        .state
        .nodes
        .iter()
        .map(|n| (n.name.clone(), n.store.clone()))
        .collect();
    for (name, store) in &stores {
        let others: Vec<String> = stores
            .iter()
            .filter(|(o, _)| o != name)
            .map(|(_, s)| s.display().to_string())
            .collect();
        let plain = verify(tb, store, &[]);
        let witnessed = verify(tb, store, &others);
        println!(
            "  {name}: $ wgmesh keys audit verify --store {}",
            store.display()
        );
        print_indented(&plain.1, 6);
        println!(
            "  {name}: $ ... --witness <the other {} stores>",
            others.len()
        );
        print_indented(&witnessed.1, 6);
        outcomes.push(Outcome::new(
            format!("audit-verify {name}"),
            plain.0 && witnessed.0,
            format!(
                "plain {}, against {} witness(es) {}",
                if plain.0 { "ok" } else { "FAILED" },
                others.len(),
                if witnessed.0 { "ok" } else { "FAILED" }
            ),
        ));
    }

    // ---- tampering, on copies (the live stores are left alone)
    let target = &watches[0];
    println!(
        "\n== tampering with copies of {}'s audit log (the live store is not touched)",
        target.node
    );
    let edited = work.join(format!("{}-edited", target.node));
    copy_consistent_log(tb, &target.store, &edited)?;
    match edit_one_record(&edited, target.seq_before) {
        Ok(what) => {
            println!("  edited: {what}");
            let r = verify(tb, &edited, &[]);
            println!("  $ wgmesh keys audit verify --store {}", edited.display());
            print_indented(&r.1, 6);
            outcomes.push(Outcome::new(
                "tamper-edit-caught",
                !r.0,
                if r.0 {
                    format!("verify PASSED a log with an edited record ({what})")
                } else {
                    format!("plain verify fails on an edited record ({what})")
                },
            ));
        }
        Err(e) => outcomes.push(Outcome::new("tamper-edit-caught", false, e.to_string())),
    }
    let others: Vec<String> = stores
        .iter()
        .filter(|(o, _)| *o != target.node)
        .map(|(_, s)| s.display().to_string())
        .collect();
    let copy_head = audit_records_at(&rollback_copy).last().map_or(0, seq);
    let live_head = audit_records(tb, &target.store)?.last().map_or(0, seq);
    println!(
        "  rolled back: {}'s log replaced by its copy from before the rotation (head seq {copy_head}; the live log is at seq {live_head})",
        target.node
    );
    let plain = verify(tb, &rollback_copy, &[]);
    println!(
        "  $ wgmesh keys audit verify --store {}",
        rollback_copy.display()
    );
    print_indented(&plain.1, 6);
    let witnessed = verify(tb, &rollback_copy, &others);
    println!(
        "  $ wgmesh keys audit verify --store {} --witness {}",
        rollback_copy.display(),
        others.join(",")
    );
    print_indented(&witnessed.1, 6);
    outcomes.push(Outcome::new(
        "tamper-rollback-caught",
        plain.0 && !witnessed.0,
        match (plain.0, witnessed.0) {
            (true, false) => format!(
                "the older copy (seq {copy_head}) verifies on its own, the other nodes' logs catch it"
            ),
            (true, true) => format!(
                "the other nodes' logs did NOT catch {}'s log rolled back from seq {live_head} to {copy_head}",
                target.node
            ),
            (false, _) => "the older copy did not verify on its own (the check proves nothing)".into(),
        },
    ));

    // ---- and the mesh afterwards
    let t = Instant::now();
    let mut whole = mesh_consistent(tb);
    while whole.is_err() && t.elapsed() < Duration::from_secs(20) {
        sys::sleep(Duration::from_millis(200))?;
        whole = mesh_consistent(tb);
    }
    outcomes.push(Outcome::new(
        "mesh-whole-after",
        whole.is_ok(),
        match &whole {
            Ok(()) => "every device has its node's new key and every other node's published key"
                .to_string(),
            Err(e) => format!("after 20 s: {e}"),
        },
    ));
    Ok(outcomes)
}

/// Starts the flows, triggers the rotations, watches them until done or the
/// timeout; returns the flows' results and the trigger's Unix time.
fn drive(
    tb: &mut Testbed,
    opts: &Options,
    specs: Vec<FlowSpec>,
    watches: &mut [Watch],
) -> Result<(Vec<FlowResult>, f64)> {
    let flows = Flows::start(specs)?;
    // Traffic first, so the rotation happens under it.
    sys::sleep(Duration::from_secs(2))?;
    let t_trigger = unix_now();
    let t0 = Instant::now();
    let stamp = rfc3339(t_trigger as i64);
    for w in watches.iter() {
        tb.api(
            "PATCH",
            &format!("/api/v1/nodes/{}", w.node),
            "application/merge-patch+json",
            &json!({"metadata": {"annotations": {ROTATE_REQUESTED: stamp}}}),
        )?;
    }
    println!(
        "\n  {ROTATE_REQUESTED}={stamp} set on {} through the API",
        watches
            .iter()
            .map(|w| w.node.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    while t0.elapsed() < opts.timeout && !watches.iter().all(Watch::done) {
        sys::sleep(Duration::from_millis(250))?;
        let now = t0.elapsed().as_secs_f64();
        let Ok(nodes) = node_annotations(tb) else {
            continue;
        };
        for w in watches.iter_mut() {
            let ann = nodes.get(&w.node).cloned().unwrap_or(Value::Null);
            let next = ann.get("wgmesh.dev/next-public-key").is_some();
            let generation: Option<u64> = ann["wgmesh.dev/key-generation"]
                .as_str()
                .and_then(|g| g.parse().ok());
            w.new_generation = generation;
            w.new_key = ann["wgmesh.dev/public-key"].as_str().map(str::to_string);
            if next && w.next_key_published.is_none() {
                w.next_key_published = Some(now);
                println!("  {now:6.1} s: {} published a next-public-key", w.node);
            }
            let bumped = generation == Some(w.old_generation + 1);
            if bumped && w.generation_bumped.is_none() {
                w.generation_bumped = Some(now);
                println!(
                    "  {now:6.1} s: {}'s key-generation is {}",
                    w.node,
                    w.old_generation + 1
                );
            }
            if bumped && !next && w.next_key_gone.is_none() {
                w.next_key_gone = Some(now);
                println!("  {now:6.1} s: {}'s next-public-key is gone", w.node);
            }
            // The CLI only once the Node says the new key is active, at most once
            // a second per node (each run is a process).
            let due = w
                .last_cli_check
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
            if w.generation_bumped.is_some()
                && !(w.store_idle.is_some() && w.old_destroyed.is_some())
                && due
            {
                w.last_cli_check = Some(Instant::now());
                if w.store_idle.is_none() {
                    if let Ok(show) = keys_show(tb, &w.store) {
                        if show["phase"] == "idle"
                            && show["active"]["generation"].as_u64() == Some(w.old_generation + 1)
                        {
                            w.store_idle = Some(now);
                            println!(
                                "  {now:6.1} s: {}'s store is idle at generation {} (`wgmesh keys show`)",
                                w.node,
                                w.old_generation + 1
                            );
                        }
                    }
                }
                if w.old_destroyed.is_none() {
                    if let Ok(records) = audit_records(tb, &w.store) {
                        let destroyed = records.iter().any(|r| {
                            seq(r) > w.seq_before
                                && r["event"] == "destroyed"
                                && r["old_fingerprint"].as_str() == Some(&w.old_fingerprint)
                        });
                        if destroyed {
                            w.old_destroyed = Some(now);
                            println!(
                                "  {now:6.1} s: {}'s audit log records its old key {} destroyed (`wgmesh keys audit show`)",
                                w.node, w.old_fingerprint
                            );
                        }
                    }
                }
            }
        }
    }
    if watches.iter().all(Watch::done) {
        println!(
            "  every rotation finished {:.1} s after the trigger; 2 s more traffic",
            t0.elapsed().as_secs_f64()
        );
    } else {
        println!(
            "  TIMEOUT: not every rotation finished within {:.0} s",
            opts.timeout.as_secs_f64()
        );
    }
    sys::sleep(Duration::from_secs(2))?;
    flows.stop_sending();
    Ok((flows.finish(Duration::from_secs(1)), t_trigger))
}

/// The agent flags of [`ROTATION_TIMINGS`] the testbed's agents were not started
/// with.
pub fn missing_rotation_flags(tb: &Testbed) -> Vec<&'static str> {
    ROTATION_TIMINGS
        .iter()
        .map(|(f, _)| *f)
        .filter(|f| !tb.state.rotation_flags.iter().any(|g| g == f))
        .collect()
}

/// Two flows per pair of pods on different nodes, `pps / 2` each way.
fn pair_flows(tb: &Testbed, pps: u32, duration: Duration) -> Result<Vec<FlowSpec>> {
    let pods: Vec<(&NodeRecord, &super::state::PodRecord)> = tb.state.pods().collect();
    let mut specs = Vec::new();
    let each = (pps / 2).max(1);
    for (i, (na, a)) in pods.iter().enumerate() {
        for (nb, b) in pods.iter().skip(i + 1) {
            if na.name == nb.name {
                continue;
            }
            let port = PORT_BASE
                .checked_add(specs.len() as u16)
                .filter(|p| *p < u16::MAX - 1)
                .ok_or_else(|| Error::Other("too many pod pairs for the port range".into()))?;
            let (ia, ib) = (v4(&a.ips)?, v4(&b.ips)?);
            specs.push(FlowSpec {
                label: format!("{} -> {}", a.name, b.name),
                from_ns: a.ns.clone(),
                to_ns: b.ns.clone(),
                to: SocketAddr::new(ib, port),
                pps: each,
                duration,
            });
            specs.push(FlowSpec {
                label: format!("{} -> {}", b.name, a.name),
                from_ns: b.ns.clone(),
                to_ns: a.ns.clone(),
                to: SocketAddr::new(ia, port + 1),
                pps: each,
                duration,
            });
        }
    }
    if specs.is_empty() {
        return Err(Error::Other(
            "the rotation drill needs pods on at least 2 nodes (up --pods 1)".into(),
        ));
    }
    Ok(specs)
}

fn v4(addrs: &[std::net::IpAddr]) -> Result<std::net::IpAddr> {
    addrs
        .iter()
        .copied()
        .find(|a| a.is_ipv4())
        .ok_or_else(|| Error::Other("a pod without an IPv4 address".into()))
}

/// Every Node's annotations, by name.
fn node_annotations(tb: &Testbed) -> Result<BTreeMap<String, Value>> {
    let list = tb.api("GET", "/api/v1/nodes", "application/json", &Value::Null)?;
    Ok(list["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|n| {
            (
                n["metadata"]["name"].as_str().unwrap_or("").to_string(),
                n["metadata"]["annotations"].clone(),
            )
        })
        .collect())
}

/// Runs `wgmesh ARGS`: (exit status 0, stdout and stderr).
fn wgmesh(tb: &Testbed, args: &[&str]) -> (bool, String) {
    match Command::new(&tb.wgmesh).args(args).output() {
        Ok(out) => (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ),
        Err(e) => (false, format!("cannot run {}: {e}", tb.wgmesh.display())),
    }
}

/// `wgmesh keys show --store S --output json`.
fn keys_show(tb: &Testbed, store: &Path) -> Result<Value> {
    let s = store.display().to_string();
    let out = sys::run(&[
        &tb.wgmesh.display().to_string(),
        "keys",
        "show",
        "--store",
        &s,
        "--output",
        "json",
    ])?;
    serde_json::from_str(&out).map_err(|e| Error::Other(format!("keys show --store {s}: {e}")))
}

/// `wgmesh keys audit show --store S --output json` (JSON Lines).
fn audit_records(tb: &Testbed, store: &Path) -> Result<Vec<Value>> {
    let s = store.display().to_string();
    let out = sys::run(&[
        &tb.wgmesh.display().to_string(),
        "keys",
        "audit",
        "show",
        "--store",
        &s,
        "--output",
        "json",
    ])?;
    Ok(parse_lines(&out))
}

/// The records of a copied log, read directly (a copy has no agent).
fn audit_records_at(dir: &Path) -> Vec<Value> {
    parse_lines(&std::fs::read_to_string(dir.join("audit.jsonl")).unwrap_or_default())
}

fn parse_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("seq").is_some())
        .collect()
}

fn seq(r: &Value) -> u64 {
    r["seq"].as_u64().unwrap_or(0)
}

/// `wgmesh keys audit verify --store S [--witness W,...]`: (ok, output).
fn verify(tb: &Testbed, store: &Path, witnesses: &[String]) -> (bool, String) {
    let s = store.display().to_string();
    let w = witnesses.join(",");
    let mut args = vec!["keys", "audit", "verify", "--store", s.as_str()];
    if !witnesses.is_empty() {
        args.extend(["--witness", w.as_str()]);
    }
    wgmesh(tb, &args)
}

/// Copies a store's log, head and state.json (never a key file) to `to`, retrying
/// until the copy verifies on its own (an agent may write between two copies).
fn copy_consistent_log(tb: &Testbed, from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| Error::io(to.display().to_string(), e))?;
    let mut last = String::new();
    for _ in 0..10 {
        for f in ["audit.jsonl", "audit.head", "state.json"] {
            std::fs::copy(from.join(f), to.join(f))
                .map_err(|e| Error::io(format!("copying {}", from.join(f).display()), e))?;
        }
        let (ok, out) = verify(tb, to, &[]);
        if ok && !out.contains("warning") {
            return Ok(());
        }
        last = out;
        sys::sleep(Duration::from_millis(300))?;
    }
    Err(Error::Other(format!(
        "no consistent copy of {}'s audit log in 10 tries: {}",
        from.display(),
        last.trim()
    )))
}

/// Changes the time of one record of this rotation (the `activated` one if
/// there is one) in a copied log, leaving its hash alone; says what it did.
fn edit_one_record(dir: &Path, after_seq: u64) -> Result<String> {
    let path = dir.join("audit.jsonl");
    let text =
        std::fs::read_to_string(&path).map_err(|e| Error::io(path.display().to_string(), e))?;
    let lines: Vec<&str> = text.lines().collect();
    let pick = |want: Option<&str>| {
        lines.iter().position(|l| {
            serde_json::from_str::<Value>(l)
                .is_ok_and(|v| seq(&v) > after_seq && want.is_none_or(|e| v["event"] == e))
        })
    };
    let i = pick(Some("activated"))
        .or_else(|| pick(None))
        .or_else(|| lines.len().checked_sub(1))
        .ok_or_else(|| Error::Other("the copied log is empty".into()))?;
    let v: Value = serde_json::from_str(lines[i]).map_err(|e| Error::Other(e.to_string()))?;
    let old_time = v["time"].as_str().unwrap_or("").to_string();
    let new_time = "2020-01-01T00:00:00Z";
    let needle = format!("\"time\":\"{old_time}\"");
    if old_time.is_empty() || !lines[i].contains(&needle) {
        return Err(Error::Other(format!(
            "record on line {} has no \"time\" field to edit",
            i + 1
        )));
    }
    let edited = lines[i].replacen(&needle, &format!("\"time\":\"{new_time}\""), 1);
    let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    out[i] = edited;
    std::fs::write(&path, out.join("\n") + "\n")
        .map_err(|e| Error::io(path.display().to_string(), e))?;
    Ok(format!(
        "line {} (seq {}, {}): time {old_time} changed to {new_time}, hash left as it was",
        i + 1,
        seq(&v),
        v["event"].as_str().unwrap_or("?")
    ))
}

fn print_indented(text: &str, n: usize) {
    for l in text.lines().filter(|l| !l.trim().is_empty()) {
        println!("{:n$}{l}", "");
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` of Unix seconds (UTC).
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Unix seconds of `YYYY-MM-DDTHH:MM:SS[.frac]Z` (UTC only, as the audit log writes).
pub fn parse_rfc3339(s: &str) -> Option<f64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    let frac: f64 = if frac.is_empty() {
        0.0
    } else {
        format!("0.{frac}").parse().ok()?
    };
    // days_from_civil
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2.rem_euclid(400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hh * 3600 + mm * 60 + ss) as f64 + frac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flow_label_names_its_sending_node() {
        assert_eq!(sender_node("n2-p1 -> n1-p1"), Some("n2"));
        assert_eq!(sender_node("n12-p3 -> n1-p1"), Some("n12"));
        assert_eq!(sender_node("nothing"), None);
    }

    #[test]
    fn rfc3339_round_trips() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_798_759_754), "2026-12-31T23:29:14Z");
        for s in [0, 951_782_400, 1_798_759_754, 4_102_444_800] {
            assert_eq!(parse_rfc3339(&rfc3339(s)), Some(s as f64));
        }
        assert_eq!(
            parse_rfc3339("2026-12-01T23:29:14.5Z"),
            Some(1_796_167_754.5)
        );
        assert_eq!(parse_rfc3339("2026-12-01T23:29:14+01:00"), None);
    }

    #[test]
    fn help_flags_match_whole_names() {
        let help = "  --rotation-grace <D>\n  --pod-cidrs-x <C>\n";
        assert!(help_has_flag(help, "--rotation-grace"));
        assert!(!help_has_flag(help, "--pod-cidrs"));
        assert!(!help_has_flag(help, "--rotation"));
    }
}
