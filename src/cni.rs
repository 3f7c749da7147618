//! The CNI network configuration for this node's pods: a conflist for the
//! standard `bridge` + `host-local` (+ `portmap`) reference plugins with this
//! node's pod CIDRs and the tunnel-consistent MTU.
//!
//! [`conflist`] is pure (CIDRs and MTU in, JSON text out, deterministic, so an
//! unchanged node produces byte-identical text); [`write_conflist`] is the only
//! I/O: an atomic write that does nothing when the file already holds the same
//! bytes and never replaces a file wgmesh did not write unless told to.
//!
//! Choices, and why:
//! - **`ipMasq: false`.** Pod traffic to another node must leave with the pod's
//!   own source address: the receiving peer only accepts, from this node's
//!   tunnel, sources inside this node's pod CIDRs (WireGuard's cryptokey
//!   routing), so masqueraded cluster traffic would be dropped. The bridge
//!   plugin's masquerade cannot exempt the cluster CIDR, so it is off
//!   entirely; SNAT for pod traffic leaving the cluster (to the internet) is
//!   not set up by this config.
//! - **`isGateway: true`** gives `cni0` the first address of each range, and
//!   one default route per family (in the IPAM `routes`) sends pod traffic to
//!   it; the host routes cluster CIDRs into the tunnel from there.
//! - **MTU** on the bridge and veths equals the tunnel's, so pod packets fit
//!   into `wgmesh0` without fragmentation or PMTU black holes.
//! - **One range per family**, IPv4 first: host-local then hands each pod one
//!   address per family.
//! - **Ownership marker.** CNI ignores unknown top-level keys, so the conflist
//!   carries `"wgmesh": {"managed": true}`; a file without it is someone
//!   else's.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Serialize;

/// The CNI network name.
pub const NETWORK_NAME: &str = "wgmesh";
/// The Linux bridge the pods' veths attach to.
pub const BRIDGE: &str = "cni0";
/// The CNI spec version of the conflist (containerd >= 1.6, CRI-O >= 1.23 and
/// the reference plugins >= 1.0 read it).
pub const CNI_VERSION: &str = "1.0.0";
/// Where container runtimes look for network configurations by default.
pub const DEFAULT_DIR: &str = "/etc/cni/net.d";
/// The file name wgmesh writes; runtimes use the lexically first config file.
pub const DEFAULT_FILE_NAME: &str = "10-wgmesh.conflist";
/// The top-level key that marks a conflist as written by wgmesh.
pub const MARKER_KEY: &str = "wgmesh";

/// What the conflist is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniConfig {
    /// This node's pod CIDRs: at most one per family (`spec.podCIDRs`).
    pub pod_cidrs: Vec<IpNet>,
    /// The pods' MTU: the tunnel MTU.
    pub mtu: u16,
    /// Chain the `portmap` plugin (hostPort support).
    pub portmap: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("no pod CIDR for this node (is spec.podCIDRs set?)")]
    NoPodCidrs,
    #[error("two pod CIDRs of one family ({0} and {1}): the conflist has one range per family")]
    TwoOfFamily(IpNet, IpNet),
    #[error("pod CIDR {0} is too small: it needs room for the gateway and at least one pod")]
    TooSmall(IpNet),
    #[error("MTU {mtu} is below the minimum of {min} for {family}")]
    Mtu {
        mtu: u16,
        min: u16,
        family: &'static str,
    },
    #[error("{0:?} is not a usable conflist file name (a plain name ending in .conflist)")]
    BadName(String),
    #[error("refusing to write a conflist without the \"{MARKER_KEY}\": {{\"managed\": true}} marker: it could never be recognised as wgmesh's again")]
    NotManaged,
    #[error("cannot encode the conflist: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = CniError> = std::result::Result<T, E>;

/// What [`write_conflist`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// There was no file; it was written.
    Created,
    /// wgmesh's own file held other content; it was replaced.
    Updated,
    /// The file already held exactly this content; nothing was written.
    Unchanged,
    /// A file wgmesh did not write is there and was left alone.
    ForeignKept,
    /// A file wgmesh did not write was replaced, as asked.
    ForeignReplaced,
}

impl Outcome {
    /// Whether the file on disk changed.
    pub fn wrote(self) -> bool {
        matches!(self, Self::Created | Self::Updated | Self::ForeignReplaced)
    }
}

/// The conflist for `cfg`, as pretty JSON with a trailing newline. The same
/// CIDRs in any order (and with host bits or duplicates) give the same text.
pub fn conflist(cfg: &CniConfig) -> Result<String> {
    let (v4, v6) = by_family(&cfg.pod_cidrs)?;
    if v4.is_none() && v6.is_none() {
        return Err(CniError::NoPodCidrs);
    }
    // IPv4's minimum datagram size, and IPv6's minimum link MTU.
    check_mtu(cfg.mtu, 576, "IPv4")?;
    if v6.is_some() {
        check_mtu(cfg.mtu, 1280, "IPv6")?;
    }
    let mut ranges = Vec::new();
    let mut routes = Vec::new();
    for (net, default) in [(v4, "0.0.0.0/0"), (v6, "::/0")] {
        if let Some(net) = net {
            ranges.push(vec![Range {
                subnet: net.to_string(),
            }]);
            routes.push(Route { dst: default });
        }
    }
    let mut plugins = vec![Plugin::Bridge(Bridge {
        type_: "bridge",
        bridge: BRIDGE,
        is_gateway: true,
        ip_masq: false,
        hairpin_mode: true,
        mtu: cfg.mtu,
        ipam: Ipam {
            type_: "host-local",
            ranges,
            routes,
        },
    })];
    if cfg.portmap {
        plugins.push(Plugin::Portmap(Portmap {
            type_: "portmap",
            capabilities: PortmapCapabilities {
                port_mappings: true,
            },
        }));
    }
    let list = Conflist {
        cni_version: CNI_VERSION,
        name: NETWORK_NAME,
        marker: Marker { managed: true },
        plugins,
    };
    let mut text = serde_json::to_string_pretty(&list).map_err(CniError::Encode)?;
    text.push('\n');
    Ok(text)
}

/// Whether `content` is a conflist wgmesh wrote (it carries the marker).
pub fn is_managed(content: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(content)
        .ok()
        .and_then(|v| v.get(MARKER_KEY)?.get("managed")?.as_bool())
        == Some(true)
}

/// Writes `content` to `dir/name` atomically (a temporary file in `dir`,
/// fsynced, renamed over the target, then the directory fsynced), creating
/// `dir` if needed. Does nothing when the file already holds exactly
/// `content`. A file without wgmesh's marker (including one that is not JSON)
/// is left alone ([`Outcome::ForeignKept`]) unless `overwrite_foreign`.
///
/// The ownership check and the rename are not one atomic step: a foreign
/// file created in between is replaced. Runtimes read the directory only, so
/// nothing else should be writing wgmesh's file name.
pub fn write_conflist(
    dir: &Path,
    name: &str,
    content: &str,
    overwrite_foreign: bool,
) -> Result<Outcome> {
    if name.is_empty()
        || name.starts_with('.')
        || name.contains(['/', '\0'])
        || !name.ends_with(".conflist")
    {
        return Err(CniError::BadName(name.to_string()));
    }
    if !is_managed(content.as_bytes()) {
        return Err(CniError::NotManaged);
    }
    let path = dir.join(name);
    let outcome = match fs::read(&path) {
        Ok(existing) if existing == content.as_bytes() => return Ok(Outcome::Unchanged),
        Ok(existing) if is_managed(&existing) => Outcome::Updated,
        Ok(_) if overwrite_foreign => Outcome::ForeignReplaced,
        Ok(_) => return Ok(Outcome::ForeignKept),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Outcome::Created,
        Err(source) => return Err(CniError::Io { path, source }),
    };
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    // Not ending in .conf/.conflist/.json, so a runtime never loads it.
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = write_new(&tmp, content.as_bytes())
        .and_then(|()| fs::rename(&tmp, &path).map_err(io_err(&path)));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok(outcome)
}

/// The configuration file a container runtime uses in `dir`: the lexically
/// first `*.conf`, `*.conflist` or `*.json` (libcni's order). When it is not
/// wgmesh's file, another network configuration shadows it.
pub fn active_config(dir: &Path) -> Result<Option<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CniError::Io {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut configs = Vec::new();
    for entry in entries {
        let path = entry.map_err(io_err(dir))?.path();
        let is_config = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("conf" | "conflist" | "json")
        );
        if is_config && path.is_file() {
            configs.push(path);
        }
    }
    configs.sort();
    Ok(configs.into_iter().next())
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Conflist {
    cni_version: &'static str,
    name: &'static str,
    #[serde(rename = "wgmesh")]
    marker: Marker,
    plugins: Vec<Plugin>,
}

#[derive(Serialize)]
struct Marker {
    managed: bool,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Plugin {
    Bridge(Bridge),
    Portmap(Portmap),
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Bridge {
    #[serde(rename = "type")]
    type_: &'static str,
    bridge: &'static str,
    is_gateway: bool,
    ip_masq: bool,
    hairpin_mode: bool,
    mtu: u16,
    ipam: Ipam,
}

#[derive(Serialize)]
struct Ipam {
    #[serde(rename = "type")]
    type_: &'static str,
    ranges: Vec<Vec<Range>>,
    routes: Vec<Route>,
}

#[derive(Serialize)]
struct Range {
    subnet: String,
}

#[derive(Serialize)]
struct Route {
    dst: &'static str,
}

#[derive(Serialize)]
struct Portmap {
    #[serde(rename = "type")]
    type_: &'static str,
    capabilities: PortmapCapabilities,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PortmapCapabilities {
    port_mappings: bool,
}

/// At most one CIDR per family, host bits cleared, each with room for the
/// gateway and a pod.
fn by_family(cidrs: &[IpNet]) -> Result<(Option<IpNet>, Option<IpNet>)> {
    let (mut v4, mut v6): (Option<IpNet>, Option<IpNet>) = (None, None);
    for net in cidrs.iter().map(IpNet::trunc) {
        let (slot, max_prefix) = match net {
            IpNet::V4(_) => (&mut v4, 30),
            IpNet::V6(_) => (&mut v6, 126),
        };
        if net.prefix_len() > max_prefix {
            return Err(CniError::TooSmall(net));
        }
        match slot {
            Some(existing) if *existing != net => {
                let (a, b) = if *existing < net {
                    (*existing, net)
                } else {
                    (net, *existing)
                };
                return Err(CniError::TwoOfFamily(a, b));
            }
            _ => *slot = Some(net),
        }
    }
    Ok((v4, v6))
}

fn check_mtu(mtu: u16, min: u16, family: &'static str) -> Result<()> {
    if mtu < min {
        return Err(CniError::Mtu { mtu, min, family });
    }
    Ok(())
}

fn write_new(path: &Path, bytes: &[u8]) -> Result<()> {
    // A leftover from a crashed write by a process with the same pid.
    let _ = fs::remove_file(path);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
        .map_err(io_err(path))?;
    file.write_all(bytes).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CniError + '_ {
    move |source| CniError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use std::os::unix::fs::PermissionsExt;

    fn cfg(cidrs: &[&str], mtu: u16, portmap: bool) -> CniConfig {
        CniConfig {
            pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            mtu,
            portmap,
        }
    }

    fn parsed(cfg: &CniConfig) -> Value {
        serde_json::from_str(&conflist(cfg).unwrap()).unwrap()
    }

    #[test]
    fn ipv4_conflist_is_exactly_the_bridge_and_host_local_config() {
        let got = parsed(&cfg(&["10.244.1.0/24"], 1420, false));
        let want = json!({
            "cniVersion": "1.0.0",
            "name": "wgmesh",
            "wgmesh": {"managed": true},
            "plugins": [{
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "mtu": 1420,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": "10.244.1.0/24"}]],
                    "routes": [{"dst": "0.0.0.0/0"}]
                }
            }]
        });
        assert_eq!(got, want);
    }

    #[test]
    fn dual_stack_has_one_range_and_one_default_route_per_family_ipv4_first() {
        let got = parsed(&cfg(&["fd00:10:244:1::/64", "10.244.1.0/24"], 1420, false));
        let ipam = &got["plugins"][0]["ipam"];
        assert_eq!(
            ipam["ranges"],
            json!([[{"subnet": "10.244.1.0/24"}], [{"subnet": "fd00:10:244:1::/64"}]])
        );
        assert_eq!(
            ipam["routes"],
            json!([{"dst": "0.0.0.0/0"}, {"dst": "::/0"}])
        );
    }

    #[test]
    fn ipv6_only_gets_only_the_ipv6_default_route() {
        let got = parsed(&cfg(&["fd00:10:244:1::/64"], 1420, false));
        assert_eq!(
            got["plugins"][0]["ipam"]["routes"],
            json!([{"dst": "::/0"}])
        );
    }

    #[test]
    fn portmap_is_chained_after_the_bridge_when_asked() {
        let got = parsed(&cfg(&["10.244.1.0/24"], 1420, true));
        let plugins = got["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 2);
        assert_eq!(
            plugins[1],
            json!({"type": "portmap", "capabilities": {"portMappings": true}})
        );
    }

    #[test]
    fn output_is_deterministic_whatever_the_order_duplicates_or_host_bits() {
        let a = conflist(&cfg(&["10.244.1.0/24", "fd00::/64"], 1400, true)).unwrap();
        let b = conflist(&cfg(
            &["fd00::5/64", "10.244.1.7/24", "10.244.1.0/24"],
            1400,
            true,
        ))
        .unwrap();
        assert_eq!(a, b);
        assert!(a.ends_with("}\n"));
        assert!(is_managed(a.as_bytes()));
    }

    #[test]
    fn bad_inputs_are_rejected_with_the_reason() {
        assert!(matches!(
            conflist(&cfg(&[], 1420, false)),
            Err(CniError::NoPodCidrs)
        ));
        assert!(matches!(
            conflist(&cfg(&["10.244.2.0/24", "10.244.1.0/24"], 1420, false)),
            Err(CniError::TwoOfFamily(a, b)) if a.to_string() == "10.244.1.0/24" && b.to_string() == "10.244.2.0/24"
        ));
        assert!(matches!(
            conflist(&cfg(&["10.244.1.0/31"], 1420, false)),
            Err(CniError::TooSmall(_))
        ));
        assert!(matches!(
            conflist(&cfg(&["fd00::/127"], 1420, false)),
            Err(CniError::TooSmall(_))
        ));
        assert!(matches!(
            conflist(&cfg(&["10.244.1.0/24"], 500, false)),
            Err(CniError::Mtu { min: 576, .. })
        ));
        assert!(matches!(
            conflist(&cfg(&["10.244.1.0/24", "fd00::/64"], 1200, false)),
            Err(CniError::Mtu { min: 1280, .. })
        ));
        // IPv4 alone is fine below IPv6's minimum.
        assert!(conflist(&cfg(&["10.244.1.0/30"], 1200, false)).is_ok());
    }

    #[test]
    fn the_marker_decides_ownership() {
        assert!(is_managed(br#"{"wgmesh": {"managed": true}}"#));
        assert!(!is_managed(br#"{"wgmesh": {"managed": "true"}}"#));
        assert!(!is_managed(br#"{"wgmesh": {"managed": false}}"#));
        assert!(!is_managed(br#"{"name": "flannel"}"#));
        assert!(!is_managed(b"not json"));
        assert!(!is_managed(b""));
    }

    fn ours(mtu: u16) -> String {
        conflist(&cfg(&["10.244.1.0/24"], mtu, false)).unwrap()
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    #[test]
    fn write_creates_then_does_nothing_then_updates_its_own_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("net.d");
        let path = dir.join(DEFAULT_FILE_NAME);

        let first = ours(1420);
        assert_eq!(
            write_conflist(&dir, DEFAULT_FILE_NAME, &first, false).unwrap(),
            Outcome::Created
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), first);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);

        // Identical content: not even rewritten (same inode).
        let inode = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&path).unwrap());
        let again = write_conflist(&dir, DEFAULT_FILE_NAME, &first, false).unwrap();
        assert_eq!(again, Outcome::Unchanged);
        assert!(!again.wrote());
        let after = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&path).unwrap());
        assert_eq!(inode, after);

        let second = ours(1380);
        assert_eq!(
            write_conflist(&dir, DEFAULT_FILE_NAME, &second, false).unwrap(),
            Outcome::Updated
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), second);
        assert!(leftovers(&dir).is_empty());
    }

    #[test]
    fn a_foreign_file_is_kept_unless_overwriting_is_asked_for() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let path = dir.join(DEFAULT_FILE_NAME);
        for foreign in [
            r#"{"cniVersion": "1.0.0", "name": "flannel", "plugins": []}"#,
            "# not even JSON\n",
        ] {
            fs::write(&path, foreign).unwrap();
            let got = write_conflist(dir, DEFAULT_FILE_NAME, &ours(1420), false).unwrap();
            assert_eq!(got, Outcome::ForeignKept);
            assert!(!got.wrote());
            assert_eq!(fs::read_to_string(&path).unwrap(), foreign);
        }
        assert_eq!(
            write_conflist(dir, DEFAULT_FILE_NAME, &ours(1420), true).unwrap(),
            Outcome::ForeignReplaced
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), ours(1420));
        // From then on it is ours: updated without the flag.
        assert_eq!(
            write_conflist(dir, DEFAULT_FILE_NAME, &ours(1400), false).unwrap(),
            Outcome::Updated
        );
        assert!(leftovers(dir).is_empty());
    }

    #[test]
    fn unmarked_content_and_bad_names_are_refused_without_touching_the_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        assert!(matches!(
            write_conflist(dir, DEFAULT_FILE_NAME, r#"{"name": "wgmesh"}"#, true),
            Err(CniError::NotManaged)
        ));
        for name in [
            "",
            ".hidden.conflist",
            "../10-wgmesh.conflist",
            "a/b.conflist",
            "10-wgmesh.conf",
        ] {
            assert!(
                matches!(
                    write_conflist(dir, name, &ours(1420), true),
                    Err(CniError::BadName(_))
                ),
                "{name:?}"
            );
        }
        assert_eq!(fs::read_dir(dir).unwrap().count(), 0);
    }

    #[test]
    fn a_write_error_names_the_path_and_leaves_no_temporary_file() {
        let tmp = tempfile::tempdir().unwrap();
        // The target is a directory: the read fails with the path named.
        let dir = tmp.path();
        fs::create_dir(dir.join(DEFAULT_FILE_NAME)).unwrap();
        let err = write_conflist(dir, DEFAULT_FILE_NAME, &ours(1420), true).unwrap_err();
        assert!(err.to_string().contains(DEFAULT_FILE_NAME), "{err}");
        assert!(leftovers(dir).is_empty());
    }

    #[test]
    fn the_active_config_is_the_lexically_first_config_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        assert_eq!(active_config(&dir.join("missing")).unwrap(), None);
        assert_eq!(active_config(dir).unwrap(), None);
        write_conflist(dir, DEFAULT_FILE_NAME, &ours(1420), false).unwrap();
        fs::write(dir.join(".10-wgmesh.conflist.1.tmp"), "x").unwrap();
        fs::write(dir.join("00-notes.txt"), "x").unwrap();
        fs::create_dir(dir.join("01-dir.conf")).unwrap();
        assert_eq!(
            active_config(dir).unwrap(),
            Some(dir.join(DEFAULT_FILE_NAME))
        );
        fs::write(dir.join("05-flannel.conflist"), "{}").unwrap();
        assert_eq!(
            active_config(dir).unwrap(),
            Some(dir.join("05-flannel.conflist"))
        );
    }
}
