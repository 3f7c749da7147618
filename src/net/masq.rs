//! Egress masquerade: pod traffic leaving the cluster is SNATed to the node
//! address, as every CNI does by default (shared/DESIGN.md, "Data path").
//! Never for cluster CIDRs or node addresses (those must keep the pod
//! address, which the tunnel and the remote node's policy depend on), never
//! into the WireGuard interface.
//!
//! nftables, through `nft`'s JSON interface (`nft -j`): one table of our own,
//! `inet wgmesh` ([`MASQ_TABLE`]), holding nothing but
//!
//! ```text
//! table inet wgmesh {
//!     set pods4 { type ipv4_addr; flags interval; elements = { <local pod cidrs> } }
//!     set keep4 { type ipv4_addr; flags interval; elements = { <cluster cidrs, node ips, local pod cidrs> } }
//!     set pods6 …  set keep6 …
//!     chain postrouting {
//!         type nat hook postrouting priority srcnat; policy accept;
//!         ip saddr @pods4 ip daddr != @keep4 oifname != "<wg>" masquerade
//!         ip6 saddr @pods6 ip6 daddr != @keep6 oifname != "<wg>" masquerade
//!         # what this node forwards out of the mesh to an extra prefix
//!         # (set extra4/extra6: every granted prefix, whoever its gateway):
//!         iifname "<wg>" ip daddr @extra4 ip daddr != @keep4 oifname != "<wg>" masquerade
//!         iifname "<wg>" ip6 daddr @extra6 ip6 daddr != @keep6 oifname != "<wg>" masquerade
//!     }
//! }
//! ```
//!
//! Why `nft` and not the `nftables` crate, which wraps the same JSON: its
//! apply helper leaves nft's stderr uncaptured (the reason for a failure
//! would land on the agent's stderr, not in the error), and its typed schema
//! parses the whole listing, so one expression a newer nft prints that the
//! crate does not model would fail the read-back of a table that is ours
//! alone. What this module needs — build one document, read one table back,
//! compare — is a few `serde_json` values.
//!
//! Idempotence: the table is read back (`nft -j list table inet wgmesh`) and
//! compared by meaning: set elements as merged address intervals, the rule
//! expressions as nft prints them, the chain's hook and priority. Only when
//! something differs is the whole table replaced, in one nft transaction
//! (`add table; delete table; add table; …`), so no packet ever sees half a
//! table, and masquerade bindings already in conntrack survive. Every other
//! table is never read or written.
//!
//! Needs: the `nft` binary (Debian package `nftables`, 0.9.0 or later for
//! JSON) and a kernel with nf_tables NAT in the `inet` family (5.2 or later).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use ipnet::IpNet;
use serde_json::{json, Value};

use super::{NetError, Result};

/// Our nftables table, in the `inet` family.
pub const MASQ_TABLE: &str = "wgmesh";

const FAMILY: &str = "inet";
const CHAIN: &str = "postrouting";
/// `priority srcnat`.
const SRCNAT: i64 = 100;

/// What [`ensure_masquerade`] makes true.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasqSpec {
    /// `false`: our table is deleted (if it exists).
    pub enabled: bool,
    /// The WireGuard interface: nothing leaving through it is masqueraded.
    pub interface: String,
    /// The sources to masquerade: this node's pod CIDRs.
    pub local_pod_cidrs: Vec<IpNet>,
    /// Destinations never masqueraded: the cluster (pod) CIDRs…
    pub cluster_cidrs: Vec<IpNet>,
    /// …and every node's addresses, this one's included.
    pub node_ips: Vec<IpAddr>,
    /// Every extra prefix a valid grant names (route sync), whichever node
    /// is its gateway: mesh traffic this node forwards out of another
    /// interface to one of them is masqueraded, so the hosts behind answer
    /// the gateway. Not only the prefixes this node is a gateway for: that
    /// list follows the pass, which can lag behind a peer that already
    /// routes a prefix here (over the BGP mesh, while an API write holds the
    /// pass up), and the pod address must not leave then either.
    pub extra_prefixes: Vec<IpNet>,
}

/// What [`ensure_masquerade`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MasqChange {
    /// Our table was as wanted (or absent and not wanted): nothing written.
    Unchanged,
    /// Our table was created or replaced.
    Written,
    /// Masquerade is disabled and our table was deleted.
    Deleted,
}

impl MasqChange {
    pub fn is_changed(self) -> bool {
        self != MasqChange::Unchanged
    }
}

/// Makes table `inet wgmesh` exactly what `spec` wants, or deletes it when
/// `spec.enabled` is false. Blocking (it runs `nft` up to three times: list
/// the tables, list ours, apply); call it from `spawn_blocking`. `nft` runs
/// in the calling thread's network namespace.
pub fn ensure_masquerade(spec: &MasqSpec) -> Result<MasqChange> {
    ensure_with(OsStr::new("nft"), spec)
}

fn ensure_with(nft: &OsStr, spec: &MasqSpec) -> Result<MasqChange> {
    super::check_interface_name(&spec.interface)?;
    let tables = run(nft, &["-j", "list", "tables"], None, "list the tables")?;
    let exists = has_our_table(&parse(&tables, "list the tables")?);
    if !spec.enabled {
        if !exists {
            return Ok(MasqChange::Unchanged);
        }
        let delete = json!({"nftables": [{"delete": {"table": table_ref()}}]});
        run(
            nft,
            &["-j", "-f", "-"],
            Some(&delete.to_string()),
            "delete table inet wgmesh",
        )?;
        tracing::info!("masquerade disabled: deleted table inet {MASQ_TABLE}");
        return Ok(MasqChange::Deleted);
    }
    let want = desired(spec);
    if exists {
        let op = "list table inet wgmesh";
        let listed = run(nft, &["-j", "list", "table", FAMILY, MASQ_TABLE], None, op)?;
        let have =
            observed(&parse(&listed, op)?).map_err(|reason| NetError::NftOutput { op, reason })?;
        if have == want.shape {
            return Ok(MasqChange::Unchanged);
        }
    }
    run(
        nft,
        &["-j", "-f", "-"],
        Some(&want.document.to_string()),
        "replace table inet wgmesh",
    )?;
    tracing::debug!(interface = %spec.interface, "wrote table inet {MASQ_TABLE}");
    Ok(MasqChange::Written)
}

// ---- the pure half ----------------------------------------------------------

/// What our table means, for comparing what is there with what is wanted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Shape {
    /// name → (type, flags, hook, prio, policy)
    chains: BTreeMap<String, Value>,
    sets: BTreeMap<String, SetShape>,
    /// (chain, expressions), in order.
    rules: Vec<(String, Value)>,
    /// Objects of any other kind in the table (maps, counters…): never
    /// ours, so their presence alone makes the table differ.
    other: usize,
}

/// A named set: its type, flags and elements as merged intervals.
type SetShape = (String, Vec<String>, Vec<(u128, u128)>);

struct Desired {
    shape: Shape,
    /// The transaction that replaces the table with `shape`.
    document: Value,
}

struct Family {
    v6: bool,
    pods: &'static str,
    keep: &'static str,
    extra: &'static str,
    set_type: &'static str,
    protocol: &'static str,
}

const FAMILIES: [Family; 2] = [
    Family {
        v6: false,
        pods: "pods4",
        keep: "keep4",
        extra: "extra4",
        set_type: "ipv4_addr",
        protocol: "ip",
    },
    Family {
        v6: true,
        pods: "pods6",
        keep: "keep6",
        extra: "extra6",
        set_type: "ipv6_addr",
        protocol: "ip6",
    },
];

fn desired(spec: &MasqSpec) -> Desired {
    let mut shape = Shape::default();
    let mut commands = vec![
        // Add-then-delete: deleting a table that does not exist fails the
        // transaction; adding one that does is a no-op.
        json!({"add": {"table": table_ref()}}),
        json!({"delete": {"table": table_ref()}}),
        json!({"add": {"table": table_ref()}}),
    ];
    let chain = json!({
        "type": "nat", "hook": "postrouting", "prio": SRCNAT, "policy": "accept"
    });
    for f in &FAMILIES {
        let of_family = |n: &&IpNet| n.addr().is_ipv6() == f.v6;
        let pods: Vec<IpNet> = spec
            .local_pod_cidrs
            .iter()
            .filter(of_family)
            .copied()
            .collect();
        let mut keep: Vec<IpNet> = spec
            .cluster_cidrs
            .iter()
            .filter(of_family)
            .copied()
            .collect();
        keep.extend(
            spec.node_ips
                .iter()
                .map(|&a| IpNet::from(a))
                .filter(|n| n.addr().is_ipv6() == f.v6),
        );
        keep.extend(&pods);
        let extra: Vec<IpNet> = spec
            .extra_prefixes
            .iter()
            .filter(of_family)
            .copied()
            .collect();
        let sets = vec![(f.pods, pods), (f.keep, keep), (f.extra, extra)];
        for (name, members) in sets {
            // nft refuses overlapping elements in an interval set (a node
            // address inside a cluster CIDR, a pod CIDR inside it): send the
            // smallest set of disjoint prefixes.
            let members = IpNet::aggregate(&members);
            let mut set = json!({
                "family": FAMILY, "table": MASQ_TABLE, "name": name,
                "type": f.set_type, "flags": ["interval"],
            });
            if !members.is_empty() {
                set["elem"] = members.iter().map(|n| element(*n)).collect();
            }
            commands.push(json!({"add": {"set": set}}));
            shape.sets.insert(
                name.to_owned(),
                (
                    f.set_type.to_owned(),
                    vec!["interval".to_owned()],
                    merged(members.iter().map(|n| interval(*n)).collect()),
                ),
            );
        }
    }
    let mut chain_obj = json!({"family": FAMILY, "table": MASQ_TABLE, "name": CHAIN});
    for (k, v) in chain.as_object().into_iter().flatten() {
        chain_obj[k] = v.clone();
    }
    commands.push(json!({"add": {"chain": chain_obj}}));
    shape.chains.insert(CHAIN.to_owned(), chain);
    for f in &FAMILIES {
        let daddr = json!({"payload": {"protocol": f.protocol, "field": "daddr"}});
        let keep = json!({"match": {"op": "!=", "left": daddr, "right": format!("@{}", f.keep)}});
        let not_out_wg = json!({"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": spec.interface}});
        // Exactly as `nft -j list` prints them back, so the read-back
        // compares equal (checked by the netns test's steady state).
        // This node's pods' egress; then what it forwards from the mesh to
        // an extra prefix (see MasqSpec::extra_prefixes).
        let pod_egress = json!([
            {"match": {"op": "==", "left": {"payload": {"protocol": f.protocol, "field": "saddr"}}, "right": format!("@{}", f.pods)}},
            keep, not_out_wg, {"masquerade": null}
        ]);
        let from_mesh = json!([
            {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": spec.interface}},
            {"match": {"op": "==", "left": daddr, "right": format!("@{}", f.extra)}},
            keep, not_out_wg, {"masquerade": null}
        ]);
        for expr in [pod_egress, from_mesh] {
            commands.push(json!({"add": {"rule": {
                "family": FAMILY, "table": MASQ_TABLE, "chain": CHAIN, "expr": expr
            }}}));
            shape.rules.push((CHAIN.to_owned(), expr));
        }
    }
    Desired {
        shape,
        document: json!({ "nftables": commands }),
    }
}

/// Reads `nft -j list table inet wgmesh`.
fn observed(listing: &Value) -> std::result::Result<Shape, String> {
    let objects = listing["nftables"]
        .as_array()
        .ok_or("no \"nftables\" array")?;
    let mut shape = Shape::default();
    for object in objects {
        let Some((kind, body)) = object.as_object().and_then(|o| o.iter().next()) else {
            return Err(format!("not an object: {object}"));
        };
        let in_ours = body["family"] == FAMILY && body["table"] == MASQ_TABLE;
        match kind.as_str() {
            "metainfo" | "table" => {}
            "chain" if in_ours => {
                let mut chain = json!({});
                for key in ["type", "hook", "prio", "policy"] {
                    if let Some(v) = body.get(key) {
                        chain[key] = v.clone();
                    }
                }
                shape.chains.insert(name(body)?, chain);
            }
            "set" if in_ours => {
                let flags = body["flags"]
                    .as_array()
                    .map(|f| {
                        f.iter()
                            .filter_map(|x| x.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                let mut intervals = Vec::new();
                for e in body["elem"].as_array().into_iter().flatten() {
                    intervals.push(element_interval(e).ok_or_else(|| format!("set element {e}"))?);
                }
                let set_type = body["type"].as_str().unwrap_or_default().to_owned();
                shape
                    .sets
                    .insert(name(body)?, (set_type, flags, merged(intervals)));
            }
            "rule" if in_ours => {
                let chain = body["chain"].as_str().unwrap_or_default().to_owned();
                shape.rules.push((chain, body["expr"].clone()));
            }
            _ => shape.other += 1,
        }
    }
    Ok(shape)
}

fn name(body: &Value) -> std::result::Result<String, String> {
    body["name"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("no name: {body}"))
}

fn has_our_table(tables: &Value) -> bool {
    tables["nftables"].as_array().is_some_and(|objects| {
        objects
            .iter()
            .any(|o| o["table"]["family"] == FAMILY && o["table"]["name"] == MASQ_TABLE)
    })
}

fn table_ref() -> Value {
    json!({"family": FAMILY, "name": MASQ_TABLE})
}

fn element(n: IpNet) -> Value {
    json!({"prefix": {"addr": n.addr().to_string(), "len": n.prefix_len()}})
}

/// An element as nft prints it: an address, a prefix, a range, or any of
/// those wrapped in `{"elem": {"val": …}}` (with a timeout or comment).
fn element_interval(e: &Value) -> Option<(u128, u128)> {
    if let Some(val) = e.get("elem").and_then(|w| w.get("val")) {
        return element_interval(val);
    }
    if let Some(a) = e.as_str() {
        return Some(interval(IpNet::from(a.parse::<IpAddr>().ok()?)));
    }
    if let Some(p) = e.get("prefix") {
        let addr: IpAddr = p["addr"].as_str()?.parse().ok()?;
        let len = u8::try_from(p["len"].as_u64()?).ok()?;
        return Some(interval(IpNet::new(addr, len).ok()?));
    }
    let range = e.get("range")?.as_array()?;
    let [a, b] = range.as_slice() else {
        return None;
    };
    let a = to_u128(a.as_str()?.parse().ok()?);
    let b = to_u128(b.as_str()?.parse().ok()?);
    Some((a, b))
}

/// The first and last address of `n`, IPv4 mapped into the low 32 bits (a
/// set holds one family, so the two never meet).
fn interval(n: IpNet) -> (u128, u128) {
    let n = n.trunc();
    (to_u128(n.network()), to_u128(n.broadcast()))
}

fn to_u128(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// Sorted, with overlapping and adjacent intervals joined: one form for
/// every way of writing the same set of addresses.
fn merged(mut intervals: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
    intervals.sort_unstable();
    let mut out: Vec<(u128, u128)> = Vec::with_capacity(intervals.len());
    for (start, end) in intervals {
        match out.last_mut() {
            Some(last) if start <= last.1.saturating_add(1) => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    out
}

fn parse(output: &str, op: &'static str) -> Result<Value> {
    serde_json::from_str(output).map_err(|e| NetError::NftOutput {
        op,
        reason: e.to_string(),
    })
}

/// Runs `nft args…`, feeding `stdin`; its stdout, or its stderr as the
/// error.
fn run(nft: &OsStr, args: &[&str], stdin: Option<&str>, op: &'static str) -> Result<String> {
    let spawned = Command::new(nft)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(NetError::NftMissing),
        Err(source) => return Err(NetError::NftSpawn { op, source }),
    };
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // nft reads all of its input before it writes anything, so writing
        // first and then collecting the output cannot deadlock.
        pipe.write_all(input.as_bytes())
            .map_err(|source| NetError::NftSpawn { op, source })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|source| NetError::NftSpawn { op, source })?;
    if !out.status.success() {
        return Err(NetError::Nft {
            op,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> MasqSpec {
        MasqSpec {
            enabled: true,
            interface: "wgmesh0".into(),
            local_pod_cidrs: vec![
                "10.244.1.0/24".parse().unwrap(),
                "fd00:244:0:1::/64".parse().unwrap(),
            ],
            cluster_cidrs: vec![
                "10.244.0.0/16".parse().unwrap(),
                "fd00:244::/48".parse().unwrap(),
            ],
            node_ips: vec![
                "192.0.2.2".parse().unwrap(),
                "192.0.2.3".parse().unwrap(),
                "10.244.9.9".parse().unwrap(),
                "2001:db8::2".parse().unwrap(),
            ],
            extra_prefixes: vec![],
        }
    }

    #[test]
    fn what_leaves_the_mesh_for_an_extra_prefix_is_masqueraded_on_every_node() {
        let d = desired(&MasqSpec {
            extra_prefixes: vec!["198.18.0.0/24".parse().unwrap()],
            ..spec()
        });
        assert_eq!(d.shape.rules.len(), 4);
        let text = d.document.to_string();
        assert!(
            text.contains("\"@extra4\"") && text.contains("iifname"),
            "{text}"
        );
        assert!(d.shape.sets["extra4"].2 == vec![interval("198.18.0.0/24".parse().unwrap())]);
        // No grant: the sets are there, empty, and the rule matches nothing.
        assert!(desired(&spec()).shape.sets["extra6"].2.is_empty());
    }

    /// What `nft -j list table inet wgmesh` prints after applying `d`:
    /// handles added, elements written the way nft writes them back (a
    /// host as a bare address), the commands' wrappers gone.
    fn listed(d: &Desired) -> Value {
        let mut objects = vec![
            json!({"metainfo": {"version": "1.0.6", "json_schema_version": 1}}),
            json!({"table": {"family": "inet", "name": "wgmesh", "handle": 3}}),
        ];
        let commands = d.document["nftables"].as_array().unwrap().iter().skip(3);
        for (handle, cmd) in (1..).zip(commands) {
            let (kind, body) = cmd["add"].as_object().unwrap().iter().next().unwrap();
            let mut body = body.clone();
            body["handle"] = json!(handle);
            if let Some(elems) = body.get_mut("elem") {
                for e in elems.as_array_mut().unwrap() {
                    let p = &e["prefix"];
                    let full = if p["addr"].as_str().unwrap().contains(':') {
                        128
                    } else {
                        32
                    };
                    if p["len"] == full {
                        *e = p["addr"].clone();
                    }
                }
            }
            objects.push(json!({ kind.clone(): body }));
        }
        json!({ "nftables": objects })
    }

    #[test]
    fn the_read_back_of_what_we_write_compares_equal() {
        let d = desired(&spec());
        assert_eq!(observed(&listed(&d)).unwrap(), d.shape);
    }

    #[test]
    fn sets_hold_disjoint_prefixes_and_exclude_cluster_nodes_and_pods() {
        let d = desired(&spec());
        let cmds = d.document["nftables"].as_array().unwrap();
        let set = |name: &str| {
            cmds.iter()
                .find(|c| c["add"]["set"]["name"] == name)
                .map(|c| c["add"]["set"].clone())
                .unwrap()
        };
        // The pod CIDR and the node address inside the cluster CIDR are
        // merged away rather than sent as overlapping intervals.
        assert_eq!(
            set("keep4")["elem"],
            json!([{"prefix": {"addr": "10.244.0.0", "len": 16}},
                   {"prefix": {"addr": "192.0.2.2", "len": 31}}])
        );
        assert_eq!(
            set("pods4")["elem"],
            json!([{"prefix": {"addr": "10.244.1.0", "len": 24}}])
        );
        assert_eq!(
            set("keep6")["elem"],
            json!([{"prefix": {"addr": "2001:db8::2", "len": 128}},
                   {"prefix": {"addr": "fd00:244::", "len": 48}}])
        );
        // The transaction replaces the table whether or not it exists.
        assert_eq!(
            cmds[0],
            json!({"add": {"table": {"family": "inet", "name": "wgmesh"}}})
        );
        assert_eq!(
            cmds[1],
            json!({"delete": {"table": {"family": "inet", "name": "wgmesh"}}})
        );
        let rules: Vec<&Value> = cmds.iter().filter_map(|c| c["add"].get("rule")).collect();
        // Per family: pod egress, then what leaves the mesh.
        assert_eq!(rules.len(), 4);
        assert_eq!(rules[0]["expr"][2]["match"]["right"], "wgmesh0");
        assert_eq!(
            rules[1]["expr"][0]["match"]["left"]["meta"]["key"],
            "iifname"
        );
        assert_eq!(rules[1]["expr"][1]["match"]["right"], "@extra4");
        assert_eq!(rules[1]["expr"][2]["match"]["right"], "@keep4");
        assert_eq!(
            rules[2]["expr"][0]["match"]["left"]["payload"]["protocol"],
            "ip6"
        );
        assert_eq!(rules[1]["expr"][4], json!({"masquerade": null}));
        assert_eq!(rules[2]["expr"][3], json!({"masquerade": null}));
    }

    #[test]
    fn empty_families_still_have_their_sets() {
        let d = desired(&MasqSpec {
            local_pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
            cluster_cidrs: vec![],
            node_ips: vec![],
            ..spec()
        });
        let cmds = d.document["nftables"].as_array().unwrap();
        let pods6 = cmds
            .iter()
            .find(|c| c["add"]["set"]["name"] == "pods6")
            .unwrap();
        assert!(pods6["add"]["set"].get("elem").is_none(), "{pods6}");
        assert_eq!(observed(&listed(&d)).unwrap(), d.shape);
    }

    #[test]
    fn any_difference_is_seen() {
        let d = desired(&spec());
        let base = listed(&d);
        let mutate = |f: &dyn Fn(&mut Value)| {
            let mut v = base.clone();
            f(&mut v);
            observed(&v).unwrap()
        };
        let objs = |v: &mut Value| v["nftables"].as_array_mut().unwrap().clone();
        let find = |v: &Value, kind: &str, name: &str| {
            v["nftables"]
                .as_array()
                .unwrap()
                .iter()
                .position(|o| o[kind]["name"] == name)
                .unwrap()
        };
        // Another interface in the rule.
        let i = base["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .position(|o| o.get("rule").is_some())
            .unwrap();
        assert_ne!(
            mutate(&|v| v["nftables"][i]["rule"]["expr"][2]["match"]["right"] = json!("eth0")),
            d.shape
        );
        // A rule removed, or one added by hand.
        assert_ne!(
            mutate(&|v| {
                v["nftables"].as_array_mut().unwrap().remove(i);
            }),
            d.shape
        );
        assert_ne!(
            mutate(&|v| {
                let extra = v["nftables"][i].clone();
                v["nftables"].as_array_mut().unwrap().push(extra);
            }),
            d.shape
        );
        // An element missing.
        let k = find(&base, "set", "keep4");
        assert_ne!(
            mutate(&|v| {
                v["nftables"][k]["set"]["elem"]
                    .as_array_mut()
                    .unwrap()
                    .pop();
            }),
            d.shape
        );
        // The chain at another priority.
        let c = find(&base, "chain", "postrouting");
        assert_ne!(
            mutate(&|v| v["nftables"][c]["chain"]["prio"] = json!(0)),
            d.shape
        );
        // An object of another kind.
        assert_ne!(
            mutate(&|v| {
                let mut o = objs(v);
                o.push(json!({"counter": {"family": "inet", "table": "wgmesh", "name": "x"}}));
                v["nftables"] = json!(o);
            }),
            d.shape
        );
        // The same addresses written as a range, or split, are the same.
        assert_eq!(
            mutate(&|v| v["nftables"][k]["set"]["elem"] = json!([
                {"range": ["10.244.0.0", "10.244.127.255"]},
                {"prefix": {"addr": "10.244.128.0", "len": 17}},
                {"elem": {"val": "192.0.2.2", "comment": "x"}},
                "192.0.2.3"
            ])),
            d.shape
        );
    }

    #[test]
    fn intervals_merge_adjacent_and_overlapping() {
        assert_eq!(
            merged(vec![(5, 9), (0, 4), (20, 30), (25, 26)]),
            vec![(0, 9), (20, 30)]
        );
        assert_eq!(merged(vec![(0, u128::MAX), (3, 4)]), vec![(0, u128::MAX)]);
        assert_eq!(
            interval("10.0.0.0/31".parse().unwrap()),
            (0x0a00_0000, 0x0a00_0001)
        );
    }

    #[test]
    fn a_missing_nft_is_named_with_the_way_out() {
        let err = ensure_with(OsStr::new("/nonexistent/nft"), &spec()).unwrap_err();
        assert!(matches!(err, NetError::NftMissing), "{err:?}");
        let s = err.to_string();
        assert!(
            s.contains("nft") && s.contains("install nftables or pass --masquerade false"),
            "{s}"
        );
        // A failing nft's own message is kept.
        let err = ensure_with(OsStr::new("false"), &spec()).unwrap_err();
        assert!(
            matches!(
                err,
                NetError::Nft {
                    op: "list the tables",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn a_bad_interface_name_is_refused_before_nft_runs() {
        let err = ensure_with(
            OsStr::new("/nonexistent/nft"),
            &MasqSpec {
                interface: "a b".into(),
                ..spec()
            },
        )
        .unwrap_err();
        assert!(matches!(err, NetError::InvalidName(_)), "{err:?}");
    }
}
