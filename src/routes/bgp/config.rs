//! The pure half of BGP mode: a [`BgpConfig`] rendered into BIRD 2 config
//! text. No I/O; every value that lands in the text is validated first, so
//! nothing a Node, a grant or a Secret holds can inject configuration
//! (BIRD's lexer has no escapes: one `"` in a password would end the
//! string and let the rest of it be parsed as config).
//!
//! The rendered config, for every [`BgpConfig`]:
//!
//! - `protocol static wgm_export4` / `wgm_export6`: one `blackhole` route
//!   per [`BgpConfig::export`] prefix. They exist only to be announced:
//!   the kernel protocols export BGP routes alone, so these never reach a
//!   kernel table (the node's real routes to its pod CIDRs stay the
//!   kernel's and the CNI's).
//! - `protocol kernel wgm_kernel4` / `wgm_kernel6`, both `kernel table N`
//!   ([`BgpConfig::table`]), `learn off`, `import none`,
//!   `export where source = RTS_BGP`. They are the only kernel protocols,
//!   so BIRD never reads or writes the main table (a BIRD kernel protocol
//!   prunes its own protocol's routes from the table it syncs; pointing one
//!   at main would delete another BIRD's routes there).
//! - one `protocol bgp` per [`Neighbor`], with exactly one channel of the
//!   neighbor's address family (one session per family, no extended next
//!   hop), default-deny import ([`BgpConfig::import`]), export of the
//!   static protocol of its family only, and `import limit N action
//!   disable` ([`BgpConfig::max_prefixes`]).
//! - for multihop neighbors, `wgm_igp4` / `wgm_igp6` tables fed by a
//!   `direct` protocol, used as the sessions' `igp table` so recursive next
//!   hops on connected subnets resolve. They are separate tables on
//!   purpose: a direct route (preference 240) for the pod bridge's subnet in
//!   the master table would beat the static export route (200) for the same
//!   pod CIDR, and only best routes are exported, so the pod CIDR would
//!   silently stop being announced.
//! - with a [`Mesh`] (`--bgp-mesh`): one iBGP `protocol bgp mesh_<node>`
//!   per other node, between the nodes' tunnel addresses (their pod gateway
//!   addresses on the WireGuard interface), so the sessions run inside the
//!   encrypted mesh. Each exports the BGP routes this node holds, with
//!   `next hop self ebgp` (what it learned from the fabric goes out with
//!   this node's tunnel address as next hop; what a route reflector
//!   reflects keeps the learner's), and imports only the `learn` grants of
//!   the node it may hear from (with that node's own address as next hop,
//!   unless it is a route reflector; reflectors send every path, ADD-PATH),
//!   at preference 90 so a route a node learned
//!   from the fabric itself always beats the same prefix heard over the
//!   mesh. Next hops resolve through `wgm_mesh4` / `wgm_mesh6`, a static
//!   device route into the WireGuard interface per node. Mesh routes never
//!   reach the kernel: the kernel protocols export `proto ~ "bgp_*"` only,
//!   so table N keeps holding exactly this node's own fabric routes, and
//!   the agent reads the mesh's from BIRD ([`super::Bird::mesh_routes`]).

use std::collections::BTreeSet;
use std::fmt::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use zeroize::Zeroizing;

pub type Result<T, E = ConfigError> = std::result::Result<T, E>;

/// A [`BgpConfig`] that cannot be rendered. `field` names the offending
/// input the way an operator wrote it (`neighbors[2].password`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Kernel routing table ids that are not ours to fill: unspecified,
/// default, main and local.
const RESERVED_TABLES: [u32; 4] = [0, 253, 254, 255];

/// The longest [`Neighbor::name`] accepted; the protocol name adds
/// [`PROTOCOL_PREFIX`] and stays far below BIRD's 64-byte symbol limit.
pub const MAX_NAME_LEN: usize = 40;

/// Linux's `TCP_MD5SIG_MAXKEYLEN`: a longer key makes BIRD's setsockopt
/// fail and the session never come up.
pub const MAX_PASSWORD_LEN: usize = 80;

/// What every BGP protocol's name starts with: keeps the name clear of
/// BIRD keywords (a neighbor called `static` or `table` would otherwise be
/// a syntax error) and marks the protocols as wgmesh's in `show protocols`.
pub const PROTOCOL_PREFIX: &str = "bgp_";

/// Names of the fixed protocols and tables of the rendered config.
pub const EXPORT4: &str = "wgm_export4";
pub const EXPORT6: &str = "wgm_export6";
pub const KERNEL4: &str = "wgm_kernel4";
pub const KERNEL6: &str = "wgm_kernel6";
const IMPORT4: &str = "wgm_import4";
const IMPORT6: &str = "wgm_import6";
const IGP4: &str = "wgm_igp4";
const IGP6: &str = "wgm_igp6";
const MESH4: &str = "wgm_mesh4";
const MESH6: &str = "wgm_mesh6";
const MESH_NH4: &str = "wgm_meshnh4";
const MESH_NH6: &str = "wgm_meshnh6";

/// What every IPv4 iBGP mesh protocol's name starts with
/// ([`mesh_protocol_names`]); IPv6 ones start with [`MESH6_PREFIX`]. Never
/// the start of a fabric session's name ([`PROTOCOL_PREFIX`]), so
/// `proto ~ "mesh*"` and `proto ~ "bgp_*"` tell the two kinds apart.
pub const MESH_PREFIX: &str = "mesh_";
pub const MESH6_PREFIX: &str = "mesh6_";

/// The longest part of a node name kept in its mesh protocol's name.
const MESH_NAME_KEEP: usize = 40;

/// Everything BIRD is configured with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BgpConfig {
    /// BGP identifier (`router id`); must not be 0.0.0.0.
    pub router_id: Ipv4Addr,
    /// Our AS number (4-octet; not 0).
    pub local_as: u32,
    /// One BGP session each.
    pub neighbors: Vec<Neighbor>,
    /// Prefixes announced to every neighbor of the same family: this
    /// node's pod CIDRs and the prefixes it is gateway for. Canonical (no
    /// host bits). Announced without installing anything in the kernel.
    pub export: Vec<IpNet>,
    /// The admin prefix list: a received route is imported only if some
    /// rule covers it. Empty imports nothing (default deny, RFC 8212).
    pub import: Vec<ImportRule>,
    /// The kernel table learned routes go to (e.g. [`DEFAULT_TABLE`]); not
    /// 0, 253 (default), 254 (main) or 255 (local).
    pub table: u32,
    pub timers: Timers,
    /// Full graceful restart (RFC 4724, restarting and helper roles) on
    /// every session, plus `persist` and `graceful restart` on the kernel
    /// protocols, so neither a crash nor a restart of BIRD withdraws
    /// anything: the neighbors keep our prefixes for
    /// [`Timers::restart_time`], table N keeps the learned routes. BIRD
    /// must then be restarted with recovery (`-R`,
    /// [`super::Spawn::recovery`]) or its first kernel sync flushes the
    /// table (seen: about a second without routes until the neighbors'
    /// updates arrive). With `persist`, stopping BIRD for good leaves table
    /// N populated: whoever turns BGP mode off flushes it.
    ///
    /// Recovery waits for each neighbor's End-of-RIB, except from a
    /// neighbor that announces it restarted itself (Restart State bit):
    /// then BIRD 2.0.12 ends recovery at Established and flushes table N
    /// until that neighbor's routes arrive. FRR 8.4 sets that bit for the
    /// first 120 s of its BGP instance, in helper mode too.
    ///
    /// `false` renders `graceful restart aware`: we still help restarting
    /// neighbors, we never restart gracefully ourselves.
    pub graceful_restart: bool,
    /// Per session: more imported (accepted) routes than this and the
    /// session is disabled (`import limit N action disable`): BIRD shuts it
    /// down, drops every route it had learned on it, and leaves it down
    /// until `birdc enable` ([`super::Bird::enable`]), a restart of BIRD,
    /// or a config change to that protocol. Filtered routes do not count.
    /// `None`: no limit.
    pub max_prefixes: Option<u32>,
    /// The iBGP mesh between the nodes (`--bgp-mesh`); `None`: none.
    pub mesh: Option<Mesh>,
}

/// The iBGP sessions between this node and the others, inside the tunnel.
///
/// Full mesh: every node has a session with every other, none a client.
/// With route reflectors: a reflector has a session with every node, the
/// non-reflectors among them its clients; a non-reflector has sessions
/// with the reflectors only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mesh {
    /// The WireGuard interface (`wgmesh0`): every mesh next hop resolves
    /// into it.
    pub interface: String,
    pub sessions: Vec<MeshSession>,
    /// The tunnel addresses of every other node: the next hops mesh routes
    /// may carry (a reflected route's is its learner's, which need not be
    /// a session of ours).
    pub next_hops: Vec<IpAddr>,
}

/// One iBGP session with another node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshSession {
    /// The other node's name (a Kubernetes Node name).
    pub node: String,
    /// Its tunnel address (the pod gateway address on its WireGuard
    /// interface); the session's family.
    pub address: IpAddr,
    /// This node's tunnel address of that family: the session's source,
    /// which the other node's WireGuard accepts only from this node's peer.
    pub local_address: IpAddr,
    /// This node reflects routes to it (`rr client`).
    pub client: bool,
    /// What may be imported from it: the `learn` grants of the node (or,
    /// from a route reflector, of every node) it may carry routes of.
    pub import: Vec<ImportRule>,
    /// It announces only routes it learned itself, so their next hop must
    /// be its own address (`bgp_next_hop = address` in the import filter):
    /// true for every session but one with a route reflector, whose
    /// reflected routes keep their learners' next hops.
    pub own_routes_only: bool,
    /// Per session: more imported routes than this and the session is
    /// disabled, as [`BgpConfig::max_prefixes`]. A session with a route
    /// reflector carries every node's routes and needs room for them all.
    pub max_prefixes: Option<u32>,
    /// ADD-PATH (RFC 7911): `rx` to receive every path of a prefix, `tx` to
    /// send them. A reflector sends every learner's path of a prefix, not
    /// only its best, so two learners of one prefix both stay gateways.
    pub add_paths_rx: bool,
    pub add_paths_tx: bool,
}

/// The BIRD protocol name of each of `sessions`, in order: `mesh_` (IPv4)
/// or `mesh6_` (IPv6) and the node's name with every character other than
/// an ASCII letter or digit turned into `_`. A name longer than 40
/// characters is cut there, and one that would be another node's (`a.b`,
/// `a-b`) gets `_` and 8 hex digits of a hash of the whole name (FNV-1a),
/// so each node keeps the same name whoever else is in the mesh.
pub fn mesh_protocol_names(sessions: &[MeshSession]) -> Vec<String> {
    let plain = |n: &str| -> String {
        n.chars()
            .take(MESH_NAME_KEEP)
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect()
    };
    let nodes: BTreeSet<&str> = sessions.iter().map(|s| s.node.as_str()).collect();
    let mut count: std::collections::BTreeMap<String, usize> = Default::default();
    for n in nodes {
        *count.entry(plain(n)).or_default() += 1;
    }
    sessions
        .iter()
        .map(|s| {
            let n = s.node.as_str();
            let mut base = plain(n);
            if n.chars().count() > MESH_NAME_KEEP || count.get(&base).copied().unwrap_or(0) > 1 {
                let hash = n.bytes().fold(0x811c_9dc5_u32, |h, b| {
                    (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
                });
                base = format!("{base}_{hash:08x}");
            }
            let prefix = if s.address.is_ipv4() {
                MESH_PREFIX
            } else {
                MESH6_PREFIX
            };
            format!("{prefix}{base}")
        })
        .collect()
}

/// The kernel table the agent reads by default (no meaning beyond being
/// unused by the usual distributions and CNIs).
pub const DEFAULT_TABLE: u32 = 187;

/// The per-session cap used unless configured otherwise.
pub const DEFAULT_MAX_PREFIXES: u32 = 100;

impl BgpConfig {
    /// A config with no neighbors, nothing exported or imported, the
    /// default [`Timers`], graceful restart on and a cap of
    /// [`DEFAULT_MAX_PREFIXES`].
    pub fn new(router_id: Ipv4Addr, local_as: u32, table: u32) -> BgpConfig {
        BgpConfig {
            router_id,
            local_as,
            neighbors: Vec::new(),
            export: Vec::new(),
            import: Vec::new(),
            table,
            timers: Timers::default(),
            graceful_restart: true,
            max_prefixes: Some(DEFAULT_MAX_PREFIXES),
            mesh: None,
        }
    }
}

/// One BGP session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbor {
    /// An operator's name for the session, 1 to [`MAX_NAME_LEN`] ASCII
    /// letters, digits, `.`, `_`, `-` (a Kubernetes object name fits). The
    /// BIRD protocol is [`Neighbor::protocol_name`].
    pub name: String,
    /// The peer's address; its family is the session's only channel. Not
    /// link-local (that needs an interface, which is not supported).
    pub address: IpAddr,
    /// Equal to [`BgpConfig::local_as`] makes the session iBGP.
    pub remote_as: u32,
    /// Our source address (`local ADDR as ...`); must be of the
    /// neighbor's family. Recommended for multihop sessions.
    pub local_address: Option<IpAddr>,
    /// TCP-MD5 (RFC 2385) key; see [`Password`].
    pub password: Option<Password>,
    /// `false`: the neighbor is on a connected subnet (`direct`, next hops
    /// used as they are), for iBGP too (BIRD would default iBGP to
    /// multihop). `true`: `multihop`, next hops resolved recursively
    /// through the node's connected subnets.
    pub multihop: bool,
}

impl Neighbor {
    /// The BIRD protocol name of the session: [`PROTOCOL_PREFIX`] and the
    /// name with every `.` and `-` turned into `_` (`tor-1.rack-a` is
    /// `bgp_tor_1_rack_a`). Only meaningful for a valid name.
    pub fn protocol_name(&self) -> String {
        protocol_name(&self.name)
    }
}

/// The BIRD protocol name for a neighbor called `name` (see
/// [`Neighbor::protocol_name`]).
pub fn protocol_name(name: &str) -> String {
    let mut out = String::with_capacity(PROTOCOL_PREFIX.len() + name.len());
    out.push_str(PROTOCOL_PREFIX);
    out.extend(
        name.chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }),
    );
    out
}

/// A TCP-MD5 key. Its `Debug` prints no part of it and its memory is wiped
/// on drop; the only way out is [`Password::expose`], which the renderer
/// calls.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(Zeroizing<String>);

impl Password {
    pub fn new(key: impl Into<String>) -> Password {
        Password(Zeroizing::new(key.into()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// Accept routes inside `prefix` whose length is from `prefix`'s own up to
/// `max_len` (BIRD `prefix{len,max_len}`). `0.0.0.0/0` with `max_len` 0 is
/// what grants a default route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ImportRule {
    /// Canonical (no host bits).
    pub prefix: IpNet,
    /// From `prefix.prefix_len()` to 32 (IPv4) or 128 (IPv6).
    pub max_len: u8,
}

impl ImportRule {
    /// Exactly `prefix`, nothing more specific.
    pub fn exact(prefix: IpNet) -> ImportRule {
        ImportRule {
            prefix,
            max_len: prefix.prefix_len(),
        }
    }

    /// Whether BIRD's filter, as rendered, accepts `net` (the same rule in
    /// Rust, for callers that want to check a learned route again).
    pub fn covers(&self, net: &IpNet) -> bool {
        self.prefix.contains(net) && net.prefix_len() <= self.max_len
    }
}

/// Session timers, in seconds. The defaults are much shorter than BIRD's
/// (hold 240, connect retry 120, error wait 60–300): a fabric session over
/// a direct link fails over in seconds, and tests do not crawl.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    /// 0 (no keepalives) or at least 3 (RFC 4271). Default 9.
    pub hold: u16,
    /// Below `hold` (at least 1 when `hold` is not 0). Default 3.
    pub keepalive: u16,
    /// From protocol start to the first connection attempt (BIRD's
    /// `connect delay time`, default 5 there). Default 1.
    pub connect_delay: u16,
    /// Between failed connection attempts. Default 5.
    pub connect_retry: u16,
    /// Minimum and maximum back-off after a session error (`error wait
    /// time`), doubling in between. Default 5, 30.
    pub error_wait: (u16, u16),
    /// With [`BgpConfig::graceful_restart`]: how long neighbors keep our
    /// routes while we restart, and the longest BIRD defers its kernel
    /// sync during recovery (`graceful restart wait`). 1 to 4095 (a 12-bit
    /// field in the capability). Default 120.
    pub restart_time: u16,
}

impl Default for Timers {
    fn default() -> Timers {
        Timers {
            hold: 9,
            keepalive: 3,
            connect_delay: 1,
            connect_retry: 5,
            error_wait: (5, 30),
            restart_time: 120,
        }
    }
}

/// Checks `config` and renders it as a BIRD 2 (2.0.12) config file.
///
/// The text contains the neighbors' passwords: write it only to a file of
/// mode 0600 ([`super::Bird::install`] does) and never log it.
pub fn render(config: &BgpConfig) -> Result<String> {
    validate(config)?;
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = render_into(&mut out, config);
    Ok(out)
}

/// Every check [`render`] makes, without rendering.
pub fn validate(config: &BgpConfig) -> Result<()> {
    if config.router_id.is_unspecified() {
        return Err(invalid("router_id", "0.0.0.0 is not a BGP identifier"));
    }
    if config.local_as == 0 {
        return Err(invalid("local_as", "AS 0 is reserved (RFC 7607)"));
    }
    if RESERVED_TABLES.contains(&config.table) {
        return Err(invalid(
            "table",
            format!(
                "{} is the kernel's unspecified, default, main or local table",
                config.table
            ),
        ));
    }
    validate_timers(&config.timers)?;
    if config.max_prefixes == Some(0) {
        return Err(invalid(
            "max_prefixes",
            "0 would disable every session at its first route; use None for no limit",
        ));
    }
    for (i, net) in config.export.iter().enumerate() {
        canonical(&format!("export[{i}]"), net)?;
    }
    for (i, rule) in config.import.iter().enumerate() {
        validate_rule(&format!("import[{i}]"), rule)?;
    }
    let mut names = BTreeSet::new();
    let mut addresses = BTreeSet::new();
    for (i, n) in config.neighbors.iter().enumerate() {
        validate_neighbor(i, n)?;
        if !names.insert(n.protocol_name()) {
            return Err(invalid(
                format!("neighbors[{i}].name"),
                format!(
                    "{:?} gives protocol name {} like an earlier neighbor",
                    n.name,
                    n.protocol_name()
                ),
            ));
        }
        if !addresses.insert(n.address) {
            return Err(invalid(
                format!("neighbors[{i}].address"),
                format!("{} is an earlier neighbor's address too", n.address),
            ));
        }
    }
    if let Some(mesh) = &config.mesh {
        validate_mesh(mesh, &mut addresses)?;
    }
    Ok(())
}

fn validate_mesh(mesh: &Mesh, addresses: &mut BTreeSet<IpAddr>) -> Result<()> {
    let mut families = BTreeSet::new();
    let iface = &mesh.interface;
    if iface.is_empty()
        || iface.len() > 15
        || !iface
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(invalid(
            "mesh.interface",
            format!("{iface:?} is not an interface name (1 to 15 of ASCII letters, digits, '-', '_', '.')"),
        ));
    }
    for (i, s) in mesh.sessions.iter().enumerate() {
        let field = |f: &str| format!("mesh.sessions[{i}].{f}");
        if s.node.is_empty()
            || s.node.len() > 253
            || !s
                .node
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.'))
        {
            return Err(invalid(
                field("node"),
                format!(
                    "{:?} is not a Node name (RFC 1123: lowercase letters, digits, '-', '.')",
                    s.node.chars().take(64).collect::<String>()
                ),
            ));
        }
        usable_address(&field("address"), s.address)?;
        usable_address(&field("local_address"), s.local_address)?;
        if s.local_address.is_ipv4() != s.address.is_ipv4() {
            return Err(invalid(
                field("local_address"),
                format!(
                    "{} is not of the family of {}: one session per family",
                    s.local_address, s.address
                ),
            ));
        }
        if !addresses.insert(s.address) {
            return Err(invalid(
                field("address"),
                format!("{} is another session's address too", s.address),
            ));
        }
        if !families.insert((s.node.as_str(), s.address.is_ipv4())) {
            return Err(invalid(
                field("node"),
                format!(
                    "{} has an earlier session of this family: one per node and family",
                    s.node
                ),
            ));
        }
        for (j, rule) in s.import.iter().enumerate() {
            validate_rule(&format!("mesh.sessions[{i}].import[{j}]"), rule)?;
        }
        if s.max_prefixes == Some(0) {
            return Err(invalid(
                field("max_prefixes"),
                "0 would disable the session at its first route; use None for no limit",
            ));
        }
    }
    for (i, a) in mesh.next_hops.iter().enumerate() {
        usable_address(&format!("mesh.next_hops[{i}]"), *a)?;
    }
    Ok(())
}

/// Not unspecified, multicast, loopback, link-local or broadcast.
fn usable_address(field: &str, a: IpAddr) -> Result<()> {
    let link_local = matches!(a, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80);
    let broadcast = matches!(a, IpAddr::V4(v4) if v4.is_broadcast());
    if a.is_unspecified() || a.is_multicast() || a.is_loopback() || link_local || broadcast {
        return Err(invalid(
            field,
            format!("{a} is not a usable address (unspecified, multicast, loopback, link-local or broadcast)"),
        ));
    }
    Ok(())
}

fn validate_timers(t: &Timers) -> Result<()> {
    if t.hold != 0 && t.hold < 3 {
        return Err(invalid(
            "timers.hold",
            format!("{} s: must be 0 or at least 3 (RFC 4271)", t.hold),
        ));
    }
    if t.hold != 0 && (t.keepalive == 0 || t.keepalive >= t.hold) {
        return Err(invalid(
            "timers.keepalive",
            format!(
                "{} s: must be from 1 to below hold ({} s)",
                t.keepalive, t.hold
            ),
        ));
    }
    if t.connect_retry == 0 {
        return Err(invalid("timers.connect_retry", "must be at least 1 s"));
    }
    let (min, max) = t.error_wait;
    if min == 0 || max < min {
        return Err(invalid(
            "timers.error_wait",
            format!("{min},{max}: need 1 <= minimum <= maximum"),
        ));
    }
    if t.restart_time == 0 || t.restart_time > 4095 {
        return Err(invalid(
            "timers.restart_time",
            format!("{} s: must be from 1 to 4095", t.restart_time),
        ));
    }
    Ok(())
}

fn validate_rule(field: &str, rule: &ImportRule) -> Result<()> {
    canonical(field, &rule.prefix)?;
    let max = rule.prefix.max_prefix_len();
    if rule.max_len < rule.prefix.prefix_len() || rule.max_len > max {
        return Err(invalid(
            format!("{field}.max_len"),
            format!(
                "{} is outside {}..={max} for {}",
                rule.max_len,
                rule.prefix.prefix_len(),
                rule.prefix
            ),
        ));
    }
    Ok(())
}

fn canonical(field: &str, net: &IpNet) -> Result<()> {
    if net.trunc() != *net {
        return Err(invalid(
            field,
            format!("{net} has host bits set (did you mean {}?)", net.trunc()),
        ));
    }
    Ok(())
}

fn validate_neighbor(i: usize, n: &Neighbor) -> Result<()> {
    let field = |f: &str| format!("neighbors[{i}].{f}");
    if n.name.is_empty() || n.name.len() > MAX_NAME_LEN {
        return Err(invalid(
            field("name"),
            format!("must be 1 to {MAX_NAME_LEN} characters"),
        ));
    }
    if let Some(c) = n
        .name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(invalid(
            field("name"),
            format!("{c:?} is not allowed: only ASCII letters, digits, '.', '_' and '-'"),
        ));
    }
    let a = n.address;
    usable_address(&field("address"), a)?;
    if n.remote_as == 0 {
        return Err(invalid(field("remote_as"), "AS 0 is reserved (RFC 7607)"));
    }
    if let Some(local) = n.local_address {
        if local.is_ipv4() != a.is_ipv4() {
            return Err(invalid(
                field("local_address"),
                format!("{local} is not of the family of {a}: one session per family"),
            ));
        }
        if local.is_unspecified() || local.is_multicast() {
            return Err(invalid(
                field("local_address"),
                format!("{local} is not a usable source address"),
            ));
        }
    }
    if let Some(p) = &n.password {
        let key = p.expose();
        if key.is_empty() || key.len() > MAX_PASSWORD_LEN {
            // The length is no secret worth keeping; the key is.
            return Err(invalid(
                field("password"),
                format!("must be 1 to {MAX_PASSWORD_LEN} bytes (TCP-MD5 key)"),
            ));
        }
        if !key.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"') {
            return Err(invalid(
                field("password"),
                "only printable ASCII other than '\"' is allowed (BIRD strings have no escapes)",
            ));
        }
    }
    Ok(())
}

fn render_into(out: &mut String, c: &BgpConfig) -> fmt::Result {
    let t = &c.timers;
    let multihop = c.neighbors.iter().any(|n| n.multihop);
    writeln!(
        out,
        "# Written by wgmesh from its BGP settings: edits are overwritten."
    )?;
    writeln!(out, "router id {};", c.router_id)?;
    // `show protocols` then prints "since" as one token (Unix seconds),
    // which super::parse_protocols reads; the default is a local time of
    // day that becomes a date after 24 h.
    writeln!(out, "timeformat protocol \"%s\";")?;
    if c.graceful_restart {
        // During recovery (bird -R) kernel sync waits for the BGP sessions
        // to converge, at most this long.
        writeln!(out, "graceful restart wait {};", t.restart_time)?;
    }
    writeln!(out)?;
    writeln!(out, "protocol device {{ scan time 10; }}")?;
    if multihop {
        writeln!(out, "ipv4 table {IGP4};")?;
        writeln!(out, "ipv6 table {IGP6};")?;
        writeln!(
            out,
            "protocol direct wgm_direct {{ ipv4 {{ table {IGP4}; }}; ipv6 {{ table {IGP6}; }}; }}"
        )?;
    }
    writeln!(out)?;

    for (name, v4) in [(EXPORT4, true), (EXPORT6, false)] {
        writeln!(out, "protocol static {name} {{")?;
        writeln!(out, "  {};", if v4 { "ipv4" } else { "ipv6" })?;
        for net in c.export.iter().filter(|n| n.addr().is_ipv4() == v4) {
            writeln!(out, "  route {net} blackhole;")?;
        }
        writeln!(out, "}}")?;
    }
    writeln!(out)?;

    for (name, v4) in [(KERNEL4, true), (KERNEL6, false)] {
        writeln!(out, "protocol kernel {name} {{")?;
        writeln!(out, "  kernel table {};", c.table)?;
        writeln!(out, "  learn off;")?;
        if c.graceful_restart {
            writeln!(out, "  persist on;")?;
            writeln!(out, "  graceful restart on;")?;
        } else {
            writeln!(out, "  persist off;")?;
        }
        writeln!(
            out,
            "  {} {{ import none; export where source = RTS_BGP && proto ~ \"{PROTOCOL_PREFIX}*\"; }};",
            if v4 { "ipv4" } else { "ipv6" }
        )?;
        writeln!(out, "}}")?;
    }
    writeln!(out)?;

    for (name, v4) in [(IMPORT4, true), (IMPORT6, false)] {
        let rules: Vec<&ImportRule> = c
            .import
            .iter()
            .filter(|r| r.prefix.addr().is_ipv4() == v4)
            .collect();
        if rules.is_empty() {
            // An empty prefix set is a syntax error; such channels render
            // `import none` instead.
            continue;
        }
        writeln!(out, "filter {name} {{")?;
        writeln!(out, "  if net ~ {} then accept;", prefix_set(&rules))?;
        writeln!(out, "  reject;")?;
        writeln!(out, "}}")?;
    }
    writeln!(out)?;

    for n in &c.neighbors {
        let v4 = n.address.is_ipv4();
        writeln!(out, "protocol bgp {} {{", n.protocol_name())?;
        match n.local_address {
            Some(a) => writeln!(out, "  local {a} as {};", c.local_as)?,
            None => writeln!(out, "  local as {};", c.local_as)?,
        }
        writeln!(out, "  neighbor {} as {};", n.address, n.remote_as)?;
        writeln!(out, "  {};", if n.multihop { "multihop" } else { "direct" })?;
        session_options(out, c)?;
        if let Some(p) = &n.password {
            writeln!(out, "  password \"{}\";", p.expose())?;
        }
        writeln!(out, "  {} {{", if v4 { "ipv4" } else { "ipv6" })?;
        let has_rules = c.import.iter().any(|r| r.prefix.addr().is_ipv4() == v4);
        if has_rules {
            writeln!(
                out,
                "    import filter {};",
                if v4 { IMPORT4 } else { IMPORT6 }
            )?;
        } else {
            writeln!(out, "    import none;")?;
        }
        if let Some(max) = c.max_prefixes {
            writeln!(out, "    import limit {max} action disable;")?;
        }
        writeln!(
            out,
            "    export where proto = \"{}\";",
            if v4 { EXPORT4 } else { EXPORT6 }
        )?;
        if !v4 {
            // An IPv6 peer may send a global and a link-local next hop.
            // Resolved recursively (multihop) through a direct IGP route,
            // BIRD would install the link-local one, which names no
            // neighbor the agent knows; direct sessions use the global one
            // either way (seen with FRR 8.4 and BIRD 2.0.12).
            writeln!(out, "    next hop prefer global;")?;
        }
        if n.multihop {
            writeln!(out, "    igp table {};", if v4 { IGP4 } else { IGP6 })?;
        }
        writeln!(out, "  }};")?;
        writeln!(out, "}}")?;
    }
    if let Some(mesh) = &c.mesh {
        render_mesh(out, c, mesh)?;
    }
    Ok(())
}

/// Timers and graceful restart, the same on every session.
fn session_options(out: &mut String, c: &BgpConfig) -> fmt::Result {
    let t = &c.timers;
    writeln!(out, "  hold time {};", t.hold)?;
    if t.hold != 0 {
        writeln!(out, "  keepalive time {};", t.keepalive)?;
    }
    writeln!(out, "  connect delay time {};", t.connect_delay)?;
    writeln!(out, "  connect retry time {};", t.connect_retry)?;
    writeln!(
        out,
        "  error wait time {},{};",
        t.error_wait.0, t.error_wait.1
    )?;
    if c.graceful_restart {
        writeln!(out, "  graceful restart on;")?;
        writeln!(out, "  graceful restart time {};", t.restart_time)
    } else {
        writeln!(out, "  graceful restart aware;")
    }
}

/// `[ P{len,max}, ... ]`; `rules` must not be empty (an empty set is a
/// syntax error).
fn prefix_set(rules: &[&ImportRule]) -> String {
    let items: Vec<String> = rules
        .iter()
        .map(|r| format!("{}{{{},{}}}", r.prefix, r.prefix.prefix_len(), r.max_len))
        .collect();
    format!("[ {} ]", items.join(", "))
}

fn render_mesh(out: &mut String, c: &BgpConfig, mesh: &Mesh) -> fmt::Result {
    writeln!(out)?;
    writeln!(out, "ipv4 table {MESH4};")?;
    writeln!(out, "ipv6 table {MESH6};")?;
    for (name, table, v4) in [(MESH_NH4, MESH4, true), (MESH_NH6, MESH6, false)] {
        writeln!(out, "protocol static {name} {{")?;
        writeln!(
            out,
            "  {} {{ table {table}; }};",
            if v4 { "ipv4" } else { "ipv6" }
        )?;
        let mut hops: Vec<IpAddr> = mesh
            .next_hops
            .iter()
            .chain(mesh.sessions.iter().map(|s| &s.address))
            .filter(|a| a.is_ipv4() == v4)
            .copied()
            .collect();
        hops.sort_unstable();
        hops.dedup();
        for a in hops {
            let host = if v4 { 32 } else { 128 };
            writeln!(out, "  route {a}/{host} via \"{}\";", mesh.interface)?;
        }
        writeln!(out, "}}")?;
    }
    for (s, name) in mesh
        .sessions
        .iter()
        .zip(mesh_protocol_names(&mesh.sessions))
    {
        let v4 = s.address.is_ipv4();
        writeln!(out)?;
        writeln!(out, "protocol bgp {name} {{")?;
        writeln!(out, "  local {} as {};", s.local_address, c.local_as)?;
        writeln!(out, "  neighbor {} as {};", s.address, c.local_as)?;
        // Over the tunnel, one hop away but on no shared subnet.
        writeln!(out, "  multihop;")?;
        if s.client {
            writeln!(out, "  rr client;")?;
        }
        session_options(out, c)?;
        writeln!(out, "  {} {{", if v4 { "ipv4" } else { "ipv6" })?;
        let rules: Vec<&ImportRule> = s
            .import
            .iter()
            .filter(|r| r.prefix.addr().is_ipv4() == v4)
            .collect();
        if rules.is_empty() {
            writeln!(out, "    import none;")?;
        } else if s.own_routes_only {
            // A node may not pass its routes off as another's: the next
            // hop it sends is its own address.
            writeln!(
                out,
                "    import where net ~ {} && bgp_next_hop = {};",
                prefix_set(&rules),
                s.address
            )?;
        } else {
            writeln!(out, "    import where net ~ {};", prefix_set(&rules))?;
        }
        if let Some(max) = s.max_prefixes {
            writeln!(out, "    import limit {max} action disable;")?;
        }
        match (s.add_paths_rx, s.add_paths_tx) {
            (true, true) => writeln!(out, "    add paths on;")?,
            (true, false) => writeln!(out, "    add paths rx;")?,
            (false, true) => writeln!(out, "    add paths tx;")?,
            (false, false) => {}
        }
        // What this node learned from the fabric, with its own tunnel
        // address as next hop; a reflector's reflected routes keep theirs.
        writeln!(out, "    export where source = RTS_BGP;")?;
        writeln!(out, "    next hop self ebgp;")?;
        // Below a fabric session's 100: a node's own fabric route wins.
        writeln!(out, "    preference 90;")?;
        if !v4 {
            writeln!(out, "    next hop prefer global;")?;
        }
        writeln!(out, "    igp table {};", if v4 { MESH4 } else { MESH6 })?;
        writeln!(out, "  }};")?;
        writeln!(out, "}}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn neighbor(name: &str, address: &str) -> Neighbor {
        Neighbor {
            name: name.into(),
            address: address.parse().unwrap(),
            remote_as: 64513,
            local_address: None,
            password: None,
            multihop: false,
        }
    }

    fn sample() -> BgpConfig {
        let mut c = BgpConfig::new("10.0.0.1".parse().unwrap(), 64512, 187);
        c.neighbors = vec![
            neighbor("tor-1.rack-a", "10.0.0.2"),
            neighbor("tor6", "fd00::2"),
        ];
        c.export = vec![net("10.244.1.0/24"), net("fd00:244:1::/64")];
        c.import = vec![
            ImportRule::exact(net("198.51.100.0/24")),
            ImportRule {
                prefix: net("192.0.2.0/24"),
                max_len: 32,
            },
            ImportRule::exact(net("2001:db8:100::/48")),
        ];
        c
    }

    fn err_field(c: &BgpConfig) -> String {
        match render(c) {
            Err(ConfigError::Invalid { field, .. }) => field,
            Ok(_) => panic!("rendered an invalid config"),
        }
    }

    /// The text between `protocol bgp NAME {` and its closing brace.
    fn block<'a>(text: &'a str, header: &str) -> &'a str {
        let start = text
            .find(header)
            .unwrap_or_else(|| panic!("no {header} in\n{text}"));
        let rest = &text[start..];
        &rest[..rest.find("\n}").unwrap()]
    }

    #[test]
    fn renders_the_full_shape() {
        let text = render(&sample()).unwrap();
        assert!(text.contains("router id 10.0.0.1;"));
        assert!(text.contains("timeformat protocol \"%s\";"));
        assert!(text.contains("graceful restart wait 120;"));
        // Exports are blackholes in statics, one per family.
        let s4 = block(&text, "protocol static wgm_export4 {");
        assert!(s4.contains("route 10.244.1.0/24 blackhole;"));
        assert!(!s4.contains("fd00"));
        let s6 = block(&text, "protocol static wgm_export6 {");
        assert!(s6.contains("route fd00:244:1::/64 blackhole;"));
        // The kernel protocols: table 187 only, BGP routes only, nothing learned.
        for k in [
            "protocol kernel wgm_kernel4 {",
            "protocol kernel wgm_kernel6 {",
        ] {
            let k = block(&text, k);
            assert!(k.contains("kernel table 187;"));
            assert!(k.contains("learn off;"));
            assert!(k.contains("persist on;"));
            assert!(k.contains("graceful restart on;"));
            // Fabric routes only: what the mesh brought stays out of table N.
            assert!(k.contains(r#"import none; export where source = RTS_BGP && proto ~ "bgp_*";"#));
        }
        assert_eq!(text.matches("protocol kernel").count(), 2);
        assert_eq!(text.matches("kernel table").count(), 2);
        // Import filters per family.
        assert!(
            text.contains("if net ~ [ 198.51.100.0/24{24,24}, 192.0.2.0/24{24,32} ] then accept;")
        );
        assert!(text.contains("if net ~ [ 2001:db8:100::/48{48,48} ] then accept;"));
        // Sessions: one channel of their family each.
        let b4 = block(&text, "protocol bgp bgp_tor_1_rack_a {");
        assert!(b4.contains("local as 64512;"));
        assert!(b4.contains("neighbor 10.0.0.2 as 64513;"));
        assert!(b4.contains("direct;"));
        assert!(b4.contains("hold time 9;"));
        assert!(b4.contains("keepalive time 3;"));
        assert!(b4.contains("connect delay time 1;"));
        assert!(b4.contains("connect retry time 5;"));
        assert!(b4.contains("error wait time 5,30;"));
        assert!(b4.contains("graceful restart on;"));
        assert!(b4.contains("graceful restart time 120;"));
        assert!(b4.contains("  ipv4 {"));
        assert!(!b4.contains("ipv6"));
        assert!(b4.contains("import filter wgm_import4;"));
        assert!(b4.contains("import limit 100 action disable;"));
        assert!(b4.contains("export where proto = \"wgm_export4\";"));
        assert!(!b4.contains("password"));
        let b6 = block(&text, "protocol bgp bgp_tor6 {");
        assert!(b6.contains("  ipv6 {"));
        assert!(b6.contains("import filter wgm_import6;"));
        assert!(b6.contains("export where proto = \"wgm_export6\";"));
        assert!(b6.contains("next hop prefer global;"));
        // No multihop neighbor, no IGP tables.
        assert!(!text.contains("wgm_igp"));
        assert!(!text.contains("protocol direct"));
    }

    #[test]
    fn empty_import_list_imports_nothing() {
        let mut c = sample();
        c.import.clear();
        let text = render(&c).unwrap();
        assert!(!text.contains("filter wgm_import"));
        assert_eq!(text.matches("import none;").count(), 2 + 2); // kernels + sessions
        assert!(!text.contains("accept"));
        // Only v4 rules: the v6 session imports nothing.
        c.import = vec![ImportRule::exact(net("198.51.100.0/24"))];
        let text = render(&c).unwrap();
        assert!(block(&text, "protocol bgp bgp_tor6 {").contains("import none;"));
        assert!(
            block(&text, "protocol bgp bgp_tor_1_rack_a {").contains("import filter wgm_import4;")
        );
    }

    #[test]
    fn default_route_only_when_granted() {
        let mut c = sample();
        let text = render(&c).unwrap();
        assert!(!text.contains("0.0.0.0/0"));
        c.import.push(ImportRule::exact(net("0.0.0.0/0")));
        let text = render(&c).unwrap();
        assert!(text.contains("0.0.0.0/0{0,0}"));
        // The Rust twin of the filter agrees.
        let rule = ImportRule::exact(net("0.0.0.0/0"));
        assert!(rule.covers(&net("0.0.0.0/0")));
        assert!(!rule.covers(&net("10.0.0.0/8")));
        let rule = ImportRule {
            prefix: net("192.0.2.0/24"),
            max_len: 28,
        };
        assert!(rule.covers(&net("192.0.2.16/28")));
        assert!(!rule.covers(&net("192.0.2.16/29")));
        assert!(!rule.covers(&net("192.0.0.0/16")));
    }

    #[test]
    fn options_render() {
        let mut c = sample();
        c.graceful_restart = false;
        c.max_prefixes = None;
        c.neighbors[0].local_address = Some("10.0.0.1".parse().unwrap());
        c.neighbors[0].password = Some(Password::new("s3cret key!"));
        c.neighbors[1].multihop = true;
        c.neighbors[1].remote_as = 64512;
        c.timers.hold = 0;
        let text = render(&c).unwrap();
        assert!(!text.contains("graceful restart wait"));
        assert!(!text.contains("import limit"));
        assert!(!text.contains("keepalive time"));
        assert!(text.contains("hold time 0;"));
        assert_eq!(text.matches("persist off;").count(), 2);
        let b4 = block(&text, "protocol bgp bgp_tor_1_rack_a {");
        assert!(b4.contains("local 10.0.0.1 as 64512;"));
        assert!(b4.contains("password \"s3cret key!\";"));
        assert!(b4.contains("graceful restart aware;"));
        let b6 = block(&text, "protocol bgp bgp_tor6 {");
        assert!(b6.contains("neighbor fd00::2 as 64512;"));
        assert!(b6.contains("multihop;"));
        assert!(b6.contains("igp table wgm_igp6;"));
        assert!(text.contains("ipv6 table wgm_igp6;"));
        assert!(text.contains("protocol direct wgm_direct"));
    }

    #[test]
    fn no_neighbors_still_renders() {
        let c = BgpConfig::new("10.0.0.1".parse().unwrap(), 64512, 1000);
        let text = render(&c).unwrap();
        assert!(!text.contains("protocol bgp"));
        assert!(text.contains("kernel table 1000;"));
    }

    #[test]
    fn names_are_sanitised_and_unique() {
        assert_eq!(protocol_name("tor-1.rack-a"), "bgp_tor_1_rack_a");
        assert_eq!(protocol_name("static"), "bgp_static");
        let mut c = sample();
        c.neighbors[1].name = "tor_1_rack-a".into();
        assert_eq!(err_field(&c), "neighbors[1].name");
        for bad in [
            "",
            "a b",
            "x\"; }",
            "n{",
            "é",
            &"a".repeat(MAX_NAME_LEN + 1),
        ] {
            let mut c = sample();
            c.neighbors[0].name = bad.into();
            assert_eq!(err_field(&c), "neighbors[0].name", "{bad:?}");
        }
    }

    #[test]
    fn passwords_are_checked_and_never_printed() {
        for bad in [
            "",
            "a\"b",
            "x\n};",
            "tab\there",
            "ümlaut",
            &"k".repeat(MAX_PASSWORD_LEN + 1),
        ] {
            let mut c = sample();
            c.neighbors[1].password = Some(Password::new(bad));
            let e = render(&c).unwrap_err();
            assert_eq!(err_field(&c), "neighbors[1].password");
            if bad.len() > 1 {
                assert!(!e.to_string().contains(bad), "{e}");
            }
        }
        let mut c = sample();
        c.neighbors[0].password = Some(Password::new("hunter2-{braces}-are-fine"));
        assert!(render(&c)
            .unwrap()
            .contains("password \"hunter2-{braces}-are-fine\";"));
        let debug = format!("{c:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("<redacted>"));
    }

    #[test]
    fn bad_values_name_their_field() {
        type Change = Box<dyn Fn(&mut BgpConfig)>;
        let cases: Vec<(Change, &str)> = vec![
            (
                Box::new(|c| c.router_id = Ipv4Addr::UNSPECIFIED),
                "router_id",
            ),
            (Box::new(|c| c.local_as = 0), "local_as"),
            (Box::new(|c| c.table = 254), "table"),
            (Box::new(|c| c.table = 0), "table"),
            (Box::new(|c| c.table = 255), "table"),
            (Box::new(|c| c.max_prefixes = Some(0)), "max_prefixes"),
            (Box::new(|c| c.timers.hold = 2), "timers.hold"),
            (Box::new(|c| c.timers.keepalive = 9), "timers.keepalive"),
            (Box::new(|c| c.timers.keepalive = 0), "timers.keepalive"),
            (
                Box::new(|c| c.timers.connect_retry = 0),
                "timers.connect_retry",
            ),
            (
                Box::new(|c| c.timers.error_wait = (30, 5)),
                "timers.error_wait",
            ),
            (
                Box::new(|c| c.timers.restart_time = 4096),
                "timers.restart_time",
            ),
            (
                Box::new(|c| c.export.push(net("10.244.1.1/24"))),
                "export[2]",
            ),
            (Box::new(|c| c.import[1].max_len = 33), "import[1].max_len"),
            (Box::new(|c| c.import[0].max_len = 23), "import[0].max_len"),
            (
                Box::new(|c| c.import.push(ImportRule::exact(net("2001:db8::1/32")))),
                "import[3]",
            ),
            (
                Box::new(|c| c.neighbors[0].address = "0.0.0.0".parse().unwrap()),
                "neighbors[0].address",
            ),
            (
                Box::new(|c| c.neighbors[1].address = "fe80::1".parse().unwrap()),
                "neighbors[1].address",
            ),
            (
                Box::new(|c| c.neighbors[1].address = "ff02::1".parse().unwrap()),
                "neighbors[1].address",
            ),
            (
                Box::new(|c| c.neighbors[1].address = "10.0.0.2".parse().unwrap()),
                "neighbors[1].address",
            ),
            (
                Box::new(|c| c.neighbors[0].remote_as = 0),
                "neighbors[0].remote_as",
            ),
            (
                Box::new(|c| c.neighbors[0].local_address = Some("fd00::1".parse().unwrap())),
                "neighbors[0].local_address",
            ),
        ];
        for (change, field) in cases {
            let mut c = sample();
            change(&mut c);
            assert_eq!(err_field(&c), field);
        }
    }

    fn mesh_sample() -> BgpConfig {
        let mut c = sample();
        let session = |node: &str, addr: &str, local: &str, client: bool| MeshSession {
            node: node.into(),
            address: addr.parse().unwrap(),
            local_address: local.parse().unwrap(),
            client,
            import: vec![ImportRule::exact(net("203.0.113.0/24"))],
            own_routes_only: true,
            max_prefixes: Some(100),
            add_paths_rx: false,
            add_paths_tx: client,
        };
        c.mesh = Some(Mesh {
            interface: "wgmesh0".into(),
            sessions: vec![
                session("n2", "10.244.2.1", "10.244.1.1", false),
                session("n3.rack-a", "10.244.3.1", "10.244.1.1", true),
                session("n2", "fd00:244:2::1", "fd00:244:1::1", false),
            ],
            next_hops: vec!["10.244.4.1".parse().unwrap()],
        });
        c
    }

    #[test]
    fn mesh_sessions_run_between_tunnel_addresses_and_keep_out_of_the_kernel() {
        let text = render(&mesh_sample()).unwrap();
        let m = block(&text, "protocol bgp mesh_n2 {");
        assert!(m.contains("local 10.244.1.1 as 64512;"), "{m}");
        assert!(m.contains("neighbor 10.244.2.1 as 64512;"), "{m}");
        assert!(m.contains("multihop;"));
        assert!(!m.contains("rr client"));
        assert!(
            m.contains(
                "import where net ~ [ 203.0.113.0/24{24,24} ] && bgp_next_hop = 10.244.2.1;"
            ),
            "{m}"
        );
        assert!(!m.contains("add paths"), "{m}");
        assert!(m.contains("import limit 100 action disable;"));
        assert!(m.contains("export where source = RTS_BGP;"));
        assert!(m.contains("next hop self ebgp;"));
        assert!(m.contains("preference 90;"));
        assert!(m.contains("igp table wgm_mesh4;"));
        let rr = block(&text, "protocol bgp mesh_n3_rack_a {");
        assert!(
            rr.contains("rr client;") && rr.contains("add paths tx;"),
            "{rr}"
        );
        // The IPv6 session has no IPv6 grant: it imports nothing.
        let m6 = block(&text, "protocol bgp mesh6_n2 {");
        assert!(
            m6.contains("import none;") && m6.contains("igp table wgm_mesh6;"),
            "{m6}"
        );
        // Next hops resolve into the tunnel, the reflected learner's too.
        let nh = block(&text, "protocol static wgm_meshnh4 {");
        for a in ["10.244.2.1", "10.244.3.1", "10.244.4.1"] {
            assert!(
                nh.contains(&format!("route {a}/32 via \"wgmesh0\";")),
                "{nh}"
            );
        }
        assert!(block(&text, "protocol static wgm_meshnh6 {")
            .contains("route fd00:244:2::1/128 via \"wgmesh0\";"));
        // The fabric is told nothing the mesh brought.
        assert!(block(&text, "protocol bgp bgp_tor_1_rack_a {")
            .contains("export where proto = \"wgm_export4\";"));
        // No mesh, no mesh tables.
        assert!(!render(&sample()).unwrap().contains("wgm_mesh"));
    }

    #[test]
    fn mesh_names_are_stable_and_distinct() {
        let long = "a".repeat(60);
        let names_of = |nodes: &[(&str, &str)]| {
            let sessions: Vec<MeshSession> = nodes
                .iter()
                .map(|(n, a)| MeshSession {
                    node: n.to_string(),
                    address: a.parse().unwrap(),
                    local_address: a.parse().unwrap(),
                    client: false,
                    import: Vec::new(),
                    own_routes_only: true,
                    max_prefixes: None,
                    add_paths_rx: false,
                    add_paths_tx: false,
                })
                .collect();
            mesh_protocol_names(&sessions)
        };
        let names = names_of(&[
            ("n1", "10.0.0.1"),
            ("n1", "fd00::1"),
            ("a.b", "10.0.0.2"),
            ("a-b", "10.0.0.3"),
            (&long, "10.0.0.4"),
        ]);
        assert_eq!(names[0], "mesh_n1");
        assert_eq!(names[1], "mesh6_n1");
        assert!(names[2].starts_with("mesh_a_b_") && names[3].starts_with("mesh_a_b_"));
        assert_ne!(names[2], names[3]);
        assert_eq!(names[4].len(), MESH_PREFIX.len() + MESH_NAME_KEEP + 9);
        // A node's name does not depend on who else is there, unless it collides.
        assert_eq!(
            names_of(&[("a.b", "10.0.0.2"), ("a-b", "10.0.0.3")])[0],
            names[2]
        );
        assert_eq!(names_of(&[(&long, "10.0.0.4")])[0], names[4]);
        assert!(names.iter().all(|n| n.len() < 64));
    }

    #[test]
    fn bad_mesh_values_name_their_field() {
        type Edit = Box<dyn Fn(&mut Mesh)>;
        let cases: Vec<(&str, Edit)> = vec![
            (
                "mesh.interface",
                Box::new(|m| m.interface = "wg\"; }".into()),
            ),
            ("mesh.interface", Box::new(|m| m.interface = "a".repeat(16))),
            (
                "mesh.sessions[0].node",
                Box::new(|m| m.sessions[0].node = "N2".into()),
            ),
            (
                "mesh.sessions[0].node",
                Box::new(|m| m.sessions[0].node = "n2;x".into()),
            ),
            (
                "mesh.sessions[0].address",
                Box::new(|m| m.sessions[0].address = "127.0.0.1".parse().unwrap()),
            ),
            (
                "mesh.sessions[1].address",
                Box::new(|m| m.sessions[1].address = "10.244.2.1".parse().unwrap()),
            ),
            (
                "mesh.sessions[0].local_address",
                Box::new(|m| m.sessions[0].local_address = "fd00::1".parse().unwrap()),
            ),
            (
                "mesh.sessions[0].import[0]",
                Box::new(|m| m.sessions[0].import[0].prefix = net("203.0.113.1/24")),
            ),
            (
                "mesh.next_hops[0]",
                Box::new(|m| m.next_hops[0] = "0.0.0.0".parse().unwrap()),
            ),
        ];
        for (field, edit) in cases {
            let mut c = mesh_sample();
            edit(c.mesh.as_mut().unwrap());
            assert_eq!(err_field(&c), field);
        }
        // A mesh session at a fabric neighbor's address.
        let mut c = mesh_sample();
        c.mesh.as_mut().unwrap().sessions[0].address = "10.0.0.2".parse().unwrap();
        assert_eq!(err_field(&c), "mesh.sessions[0].address");
    }
}
