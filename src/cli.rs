//! The command line: clap definitions only. `--help` is the reference; every flag
//! has an environment variable.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "wgmesh",
    version,
    about = "Encrypts pod traffic between Kubernetes nodes with a full WireGuard mesh",
    long_about = "Encrypts pod traffic between Kubernetes nodes with a full WireGuard mesh.\n\n\
        Each node keeps its own x25519 key in a local store, publishes the public key on its \
        Node object and keeps one WireGuard peer per other node.\n\n\
        On a node: `wgmesh dataplane` runs the userspace WireGuard device (not needed where \
        the kernel has WireGuard), `wgmesh agent` keeps the device's peers in step with the \
        Nodes, `wgmesh status` and `wgmesh graph` show the mesh, and `wgmesh keys` manages \
        the key store and its tamper-evident audit log.",
    after_help = "Exit status: 0 on success, 1 on any error (including an audit log that does \
        not verify), 2 on a usage error."
)]
pub struct Cli {
    /// Log filter (tracing-subscriber syntax, e.g. `info` or `wgmesh=debug`).
    #[arg(long, env = "WGMESH_LOG", default_value = "info", global = true)]
    pub log: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage this node's WireGuard keys: store, rotation and audit log.
    Keys(KeysArgs),
    /// Run the userspace WireGuard device in the foreground (like wireguard-go -f).
    Dataplane(DataplaneArgs),
    /// Run the node agent: publish this node's key, watch every Node, program the mesh.
    Agent(Box<AgentArgs>),
    /// Show this node's peers like `wg show`, but per node: endpoint, allowed
    /// IPs, last handshake, transfer, key fingerprint, state; and the Nodes
    /// that were rejected, with the reason. Works while the agent is down.
    Status(StatusArgs),
    /// Print this node's view of the mesh as Graphviz DOT (healthy edges solid
    /// green, stale dashed orange, never-handshaken dotted grey, rejected Nodes
    /// as red boxes). Render with `wgmesh graph | dot -Tsvg > mesh.svg`.
    Graph(StatusArgs),
    /// Print the version.
    Version {
        #[arg(long, env = "WGMESH_OUTPUT", value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

#[derive(Debug, Args)]
pub struct KeysArgs {
    /// Directory of the key store (created 0700 by `init`).
    #[arg(long, env = "WGMESH_STORE", default_value = wgmesh::keys::store::DEFAULT_DIR, global = true)]
    pub store: PathBuf,

    /// Who is acting, as written to the audit log. Defaults to `cli:<user>`, taken
    /// from SUDO_USER, then USER, then the numeric uid.
    #[arg(long, env = "WGMESH_ACTOR", global = true)]
    pub actor: Option<String>,

    #[command(subcommand)]
    pub command: KeysCommand,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create the store with a fresh key (generation 1).
    Init {
        /// The Kubernetes node name recorded in the store and every audit record.
        /// Defaults to the host name.
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// Succeed without changes if the store already exists.
        #[arg(long, env = "WGMESH_INIT_IF_MISSING")]
        if_missing: bool,
        /// Why, for the audit log.
        #[arg(long, env = "WGMESH_REASON", default_value = "initial key")]
        reason: String,
    },
    /// Print the public key, fingerprint, generation and age of each key held.
    Show {
        #[arg(long, env = "WGMESH_OUTPUT", value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Rotate the static key, one step at a time: --stage, then --activate, then
    /// --destroy-old, waiting between them for peers to pre-accept the next key
    /// and confirm it. Exactly one step flag is needed; --all-steps runs the
    /// three at once, which cuts traffic until peers learn the new key, so it is
    /// only for a standalone host without peers.
    #[command(group(clap::ArgGroup::new("step").args(["stage", "activate", "destroy_old", "all_steps", "abort"])))]
    Rotate {
        /// Step 1: generate the next key; peers are asked to pre-accept it.
        #[arg(long, env = "WGMESH_ROTATE_STAGE")]
        stage: bool,
        /// Step 2: make the staged key the active one; the old key is kept.
        #[arg(long, env = "WGMESH_ROTATE_ACTIVATE")]
        activate: bool,
        /// Step 3: end the previous key's grace period and destroy it (file
        /// overwritten and removed).
        #[arg(long, env = "WGMESH_ROTATE_DESTROY_OLD")]
        destroy_old: bool,
        /// Abandon a staged rotation: withdraw the staged key and destroy it
        /// (recorded as `aborted`, then `destroyed`); the active key stays.
        #[arg(long, env = "WGMESH_ROTATE_ABORT")]
        abort: bool,
        /// All three steps at once, for a standalone host: with peers, traffic to
        /// this node stops until every peer learns the new key.
        #[arg(long, env = "WGMESH_ROTATE_ALL_STEPS")]
        all_steps: bool,
        /// Why, for the audit log.
        #[arg(long, env = "WGMESH_REASON", default_value = "scheduled rotation")]
        reason: String,
    },
    /// Emergency: destroy every key now and activate a fresh one. Peers drop this
    /// node until they see the new public key.
    Revoke {
        /// Why, for the audit log (required: a revocation must be explained).
        #[arg(long, env = "WGMESH_REASON")]
        reason: String,
    },
    /// Read or verify the audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// The cluster's key inventory, read from the Nodes: every node's key
    /// fingerprint, generation, creation time and age against the maximum key
    /// age (overdue flagged), rotation phase and published audit head.
    Inventory {
        #[command(flatten)]
        source: InventorySource,
        /// text (a table), json, or csv.
        #[arg(long, env = "WGMESH_OUTPUT", value_enum, default_value_t = InventoryOutput::Text)]
        output: InventoryOutput,
    },
    /// Write an evidence bundle an auditor can keep: the key inventory (json and
    /// csv), this node's audit log and head, the verification result (plain and
    /// against --witness logs), the policy in force, and a manifest with the
    /// SHA-256 of every file, the tool version and the time. Parts that cannot be
    /// produced (no API access, no store) are named in the manifest as missing.
    /// Exits 1 when a part is missing or a verification failed (the bundle is
    /// written all the same).
    Evidence {
        /// Directory to write the bundle into (created; must be empty).
        #[arg(long, env = "WGMESH_EVIDENCE_OUT")]
        out: PathBuf,
        /// Other nodes' audit logs to verify this node's log against (a store
        /// or bundle directory holding audit.jsonl, or an audit .jsonl file);
        /// copied into the bundle. Repeat, or separate with commas.
        #[arg(long, env = "WGMESH_WITNESS", value_delimiter = ',')]
        witness: Vec<PathBuf>,
        #[command(flatten)]
        source: InventorySource,
    },
}

/// Where the inventory comes from, and the policy it is judged against.
#[derive(Debug, Args)]
pub struct InventorySource {
    /// kubeconfig file; without it: in-cluster config, then ~/.kube/config.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The cryptoperiod: a key this old or older is overdue (90d, 12h, 2w, 1d12h).
    #[arg(long, env = "WGMESH_MAX_KEY_AGE", default_value = wgmesh::keys::evidence::DEFAULT_MAX_KEY_AGE, value_parser = parse_max_key_age)]
    pub max_key_age: u64,
}

fn parse_max_key_age(text: &str) -> Result<u64, String> {
    wgmesh::keys::evidence::parse_duration(text).map_err(|e| e.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InventoryOutput {
    Text,
    Json,
    Csv,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Print the audit log (verifying it first; a broken log is still printed up
    /// to the first bad line, and the command then fails).
    Show {
        #[arg(long, env = "WGMESH_OUTPUT", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Check the hash chain and the head anchor. Exits 1 and names the first bad
    /// line on any edited, deleted, inserted, reordered or cut record. With
    /// --witness, also checks the log against the heads other nodes recorded
    /// of it (peer-head records): exits 1 naming each witnessed seq the log no
    /// longer contains or contradicts, which catches a history rewritten with
    /// a recomputed chain.
    Verify {
        #[arg(long, env = "WGMESH_OUTPUT", value_enum, default_value_t = Output::Text)]
        output: Output,
        /// Other nodes' audit logs: a store or bundle directory holding
        /// audit.jsonl (and audit.head), or an audit .jsonl file (its anchor
        /// is the same name with .head). Repeat, or separate with commas.
        #[arg(long, env = "WGMESH_WITNESS", value_delimiter = ',')]
        witness: Vec<PathBuf>,
    },
}

/// `wgmesh agent`.
#[derive(Debug, Args)]
#[command(long_about = "Run the node agent.\n\n\
    Opens (or creates) this node's key store, publishes its public key, endpoint and pod CIDRs \
    as wgmesh.dev/ annotations on its Node, watches every Node, and keeps one WireGuard peer per \
    valid remote node on the device behind the UAPI socket (wgmesh dataplane, wireguard-go or \
    boringtun-cli). It brings the interface up with its MTU and routes each cluster CIDR into it, \
    so traffic to a node without a valid peer is dropped, never sent in plaintext. A pass that \
    finds everything in place writes nothing. On SIGTERM it exits and leaves annotations, device \
    and routes in place; if the API server goes away it keeps the last mesh and retries.")]
pub struct AgentArgs {
    /// This node's Kubernetes name (the Downward API's spec.nodeName in a DaemonSet).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// kubeconfig file; without it: in-cluster config, then ~/.kube/config.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Directory of the key store (created on first start).
    #[arg(long, env = "WGMESH_STORE", default_value = wgmesh::keys::store::DEFAULT_DIR)]
    pub store: PathBuf,
    /// WireGuard interface (its UAPI socket is <uapi-dir>/<interface>.sock).
    #[arg(long, short, env = "WGMESH_INTERFACE", default_value = "wgmesh0", value_parser = parse_interface)]
    pub interface: String,
    /// Directory of the UAPI socket.
    #[arg(long, env = "WGMESH_UAPI_DIR", default_value = wgmesh::dataplane::DEFAULT_UAPI_DIR)]
    pub uapi_dir: PathBuf,
    /// UDP port the device listens on and peers send to.
    #[arg(long, env = "WGMESH_LISTEN_PORT", default_value_t = 51820)]
    pub listen_port: u16,
    /// The endpoint peers send to (ip:port or [ipv6]:port). Default: the
    /// wgmesh.dev/force-endpoint annotation, else the Node's InternalIP.
    #[arg(long, env = "WGMESH_ENDPOINT")]
    pub endpoint: Option<std::net::SocketAddr>,
    /// The cluster pod CIDRs (comma-separated, one per family): routed into the
    /// tunnel as a whole, and the bound of pod CIDR claims when Nodes have no spec.podCIDRs.
    #[arg(
        long,
        env = "WGMESH_CLUSTER_CIDRS",
        value_delimiter = ',',
        required = true
    )]
    pub cluster_cidrs: Vec<ipnet::IpNet>,
    /// Interface MTU; default: the underlay MTU minus 80.
    #[arg(long, env = "WGMESH_MTU")]
    pub mtu: Option<u16>,
    /// Persistent keepalive (seconds) for every peer unless its Node sets
    /// wgmesh.dev/persistent-keepalive. 0 = off.
    #[arg(long, env = "WGMESH_PERSISTENT_KEEPALIVE", default_value_t = 0)]
    pub persistent_keepalive: u16,
    /// Do not touch the link or routes (someone else manages them).
    #[arg(long, env = "WGMESH_NO_NETWORK")]
    pub no_network: bool,
    /// Milliseconds between passes that Node events ask for: a change after
    /// a quiet spell is reconciled at once, later events of a burst wait
    /// until this long after the last pass, and are coalesced.
    #[arg(long, env = "WGMESH_DEBOUNCE_MS", default_value_t = 200)]
    pub debounce_ms: u64,
    /// Seconds between device re-checks without Node events.
    #[arg(long, env = "WGMESH_RESYNC_SECONDS", default_value_t = 60)]
    pub resync_seconds: u64,
    /// Do a single reconcile pass and exit.
    #[arg(long, env = "WGMESH_ONCE")]
    pub once: bool,
    /// WireGuard implementation: kernel (generic netlink), uapi (the socket of
    /// wgmesh dataplane, wireguard-go or boringtun-cli), or auto: the kernel
    /// when its WireGuard module is there, else the UAPI socket; the choice
    /// and why are logged.
    #[arg(long, env = "WGMESH_BACKEND", value_enum, default_value_t = wgmesh::wg::kernel::BackendKind::Auto)]
    pub backend: wgmesh::wg::kernel::BackendKind,
    /// Directory for the CNI conflist (bridge + host-local with this node's pod
    /// CIDRs and the tunnel MTU), written as 10-wgmesh.conflist.
    #[arg(long, env = "WGMESH_CNI_DIR", default_value = wgmesh::cni::DEFAULT_DIR)]
    pub cni_dir: PathBuf,
    /// Do not write a CNI config (another CNI plugin manages pods).
    #[arg(long, env = "WGMESH_NO_CNI")]
    pub no_cni: bool,
    /// Replace a 10-wgmesh.conflist that wgmesh did not write.
    #[arg(long, env = "WGMESH_CNI_OVERWRITE")]
    pub cni_overwrite: bool,
    /// Address for /metrics (Prometheus), /healthz and /readyz; "off" disables it.
    #[arg(long, env = "WGMESH_METRICS_LISTEN", default_value = "0.0.0.0:9586")]
    pub metrics_listen: String,
    /// This node's pod CIDRs when its Node has no spec.podCIDRs (clusters
    /// without the controller-manager's node IPAM): published as
    /// wgmesh.dev/pod-cidrs. Without it, a pod-cidrs annotation a person (or
    /// another IPAM) set is kept as it is. Peers accept a claim only inside
    /// --cluster-cidrs and not overlapping an older Node's.
    #[arg(long, env = "WGMESH_POD_CIDRS", value_delimiter = ',')]
    pub pod_cidrs: Vec<ipnet::IpNet>,
    /// Also send node-to-node host traffic (kubelet, hostNetwork pods, SSH)
    /// through the tunnel. WireGuard's own UDP (--listen-port) and the
    /// agent's traffic to the API server stay outside, so the mesh cannot
    /// lock itself out. Off by default, like Cilium's node encryption.
    #[arg(long, env = "WGMESH_ENCRYPT_HOST_TRAFFIC")]
    pub encrypt_host_traffic: bool,
    /// Masquerade pod traffic leaving the cluster (to anything outside the
    /// cluster CIDRs and node addresses) to the node's address, with nftables
    /// (table `inet wgmesh`). Turn off when another component (a cloud's NAT
    /// gateway, the CNI) already does it. On a route-sync gateway it also
    /// masquerades mesh traffic it forwards into its extra prefixes, so the
    /// hosts there answer the gateway (docs/routing.md, "The return path").
    #[arg(long, env = "WGMESH_MASQUERADE", default_value_t = true, action = clap::ArgAction::Set)]
    pub masquerade: bool,
    /// The routing table for pod → remote node address traffic (and host
    /// traffic with --encrypt-host-traffic); its `ip rule`s sit at
    /// --rule-priority.
    #[arg(long, env = "WGMESH_ROUTE_TABLE", default_value_t = 51820)]
    pub route_table: u32,
    /// Priority of wgmesh's `ip rule`s (exemptions take the numbers just below).
    #[arg(long, env = "WGMESH_RULE_PRIORITY", default_value_t = 5210)]
    pub rule_priority: u32,
    /// Rotate the static key when it is this old (the cryptoperiod: 90d,
    /// 12h, 2w, 1d12h); "off": only on request (wgmesh.dev/rotate-requested
    /// or `wgmesh keys rotate --stage`).
    #[arg(long, env = "WGMESH_KEY_MAX_AGE", default_value = "90d", value_parser = parse_optional_duration)]
    pub key_max_age: MaxAge,
    /// Rotate up to this much before --key-max-age, by a fixed per-node
    /// amount, so nodes keyed at the same time spread out.
    #[arg(long, env = "WGMESH_ROTATION_JITTER", default_value = "1d", value_parser = parse_duration)]
    pub rotation_jitter: std::time::Duration,
    /// How long a staged key waits for every peer's confirmation (a
    /// handshake under the new key) before it is activated anyway; the peers
    /// that had not confirmed are named in the audit log.
    #[arg(long, env = "WGMESH_ROTATION_CONFIRM_DEADLINE", default_value = "10m", value_parser = parse_duration)]
    pub rotation_confirm_deadline: std::time::Duration,
    /// How long the previous key is still accepted after activation, for
    /// peers that have not switched yet; then it is destroyed.
    #[arg(long, env = "WGMESH_ROTATION_GRACE", default_value = "180s", value_parser = parse_duration)]
    pub rotation_grace: std::time::Duration,
    /// The window over which a rotation requested on every Node at once is
    /// spread (each node waits a fixed share of it).
    #[arg(long, env = "WGMESH_ROTATION_STAGGER", default_value = "60s", value_parser = parse_duration)]
    pub rotation_stagger: std::time::Duration,
    /// Only write the fail-closed backstops (a blackhole per cluster CIDR)
    /// and exit: no API, no device needed. Run it before anything else on a
    /// booting node (the DaemonSet's init container), so pods never reach
    /// remote pod CIDRs in plaintext before the agent is up.
    #[arg(long, env = "WGMESH_BACKSTOPS_ONLY")]
    pub backstops_only: bool,
    /// Route sync's BGP mode (docs/routing.md): configure BIRD 2 on this
    /// node to peer with the fabric's routers (--bgp-neighbor), announce
    /// this node's pod CIDRs and the MeshRoute prefixes it is a gateway for,
    /// and learn the prefixes MeshRoutes with `learn.nodes` naming this node
    /// allow; the agent publishes those (wgmesh.dev/learned-prefixes) so its
    /// peers route them to it. Needs `bird` and `birdc` (Debian: bird2).
    #[arg(long, env = "WGMESH_BGP")]
    pub bgp: bool,
    /// This node's AS number (required with --bgp).
    #[arg(long, env = "WGMESH_BGP_LOCAL_AS", default_value_t = 0)]
    pub bgp_local_as: u32,
    /// The BGP identifier; default: this node's first IPv4 address.
    #[arg(long, env = "WGMESH_BGP_ROUTER_ID")]
    pub bgp_router_id: Option<std::net::Ipv4Addr>,
    /// A fabric router to peer with, ADDRESS=AS (repeat, or comma-separate in
    /// the variable); one session per neighbor, of its address family.
    #[arg(long, env = "WGMESH_BGP_NEIGHBORS", value_delimiter = ',')]
    pub bgp_neighbor: Vec<wgmesh::routes::bgp::speaker::NeighborSpec>,
    /// A file holding the TCP-MD5 key of every BGP session (read at start;
    /// never logged).
    #[arg(long, env = "WGMESH_BGP_PASSWORD_FILE")]
    pub bgp_password_file: Option<PathBuf>,
    /// Where the agent writes BIRD's config (mode 0600).
    #[arg(
        long,
        env = "WGMESH_BGP_CONFIG",
        default_value = "/run/wgmesh/bird.conf"
    )]
    pub bgp_config: PathBuf,
    /// BIRD's control socket.
    #[arg(
        long,
        env = "WGMESH_BGP_SOCKET",
        default_value = "/run/wgmesh/bird.ctl"
    )]
    pub bgp_socket: PathBuf,
    /// The kernel table BIRD delivers learned routes to (read by the agent;
    /// mesh traffic looks it up at --rule-priority + 1).
    #[arg(long, env = "WGMESH_BGP_TABLE", default_value_t = wgmesh::routes::bgp::config::DEFAULT_TABLE)]
    pub bgp_table: u32,
    /// Per session, more accepted prefixes than this and BIRD shuts the
    /// session down (until `birdc enable` or a restart).
    #[arg(long, env = "WGMESH_BGP_MAX_PREFIXES", default_value_t = wgmesh::routes::bgp::config::DEFAULT_MAX_PREFIXES)]
    pub bgp_max_prefixes: u32,
    /// Do not start BIRD when its control socket does not answer (it runs
    /// in a container or unit of its own).
    #[arg(long, env = "WGMESH_BGP_NO_SPAWN")]
    pub bgp_no_spawn: bool,
    /// Where a BIRD the agent starts writes its stderr.
    #[arg(long, env = "WGMESH_BGP_LOG", default_value = "/run/wgmesh/bird.log")]
    pub bgp_log: PathBuf,
    /// With --bgp: iBGP between the nodes, inside the tunnel (between their
    /// pod gateway addresses), so what a node learns from the fabric
    /// reaches the others while the API server is away. Every node of the
    /// mesh needs it, with the same --bgp-local-as; --bgp-neighbor is then
    /// optional. A full mesh unless --bgp-route-reflectors names nodes.
    #[arg(long, env = "WGMESH_BGP_MESH")]
    pub bgp_mesh: bool,
    /// With --bgp-mesh: nodes that reflect routes (comma-separated Node
    /// names, the same list on every node). Each has a session with every
    /// node; every other node has sessions with them only. Name two, for
    /// when one is down. A full mesh (no reflectors) is suggested up to
    /// about 50 nodes, a rule of thumb, not a measured limit
    /// (docs/routing.md).
    #[arg(long, env = "WGMESH_BGP_ROUTE_REFLECTORS", value_delimiter = ',')]
    pub bgp_route_reflectors: Vec<String>,
}

/// `wgmesh status` and `wgmesh graph`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// This node's Kubernetes name.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// kubeconfig file; without it: in-cluster config, then ~/.kube/config. If
    /// the API cannot be read, the device's peers are shown by key only.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// WireGuard interface.
    #[arg(long, short, env = "WGMESH_INTERFACE", default_value = "wgmesh0", value_parser = parse_interface)]
    pub interface: String,
    /// Directory of the UAPI socket.
    #[arg(long, env = "WGMESH_UAPI_DIR", default_value = wgmesh::dataplane::DEFAULT_UAPI_DIR)]
    pub uapi_dir: PathBuf,
    /// Which device to read, by the agent's rule (`wgmesh agent --backend`):
    /// kernel (generic netlink), uapi (the UAPI socket), or auto: the UAPI
    /// socket if one serves the interface, else an existing kernel WireGuard
    /// link, else the UAPI socket. Never creates a link.
    #[arg(long, env = "WGMESH_BACKEND", value_enum, default_value_t = wgmesh::wg::kernel::BackendKind::Auto)]
    pub backend: wgmesh::wg::kernel::BackendKind,
    /// The cluster pod CIDRs, as given to the agent (to plan exactly as it does).
    #[arg(long, env = "WGMESH_CLUSTER_CIDRS", value_delimiter = ',')]
    pub cluster_cidrs: Vec<ipnet::IpNet>,
    /// BIRD's control socket, as given to `wgmesh agent --bgp-socket`: when it
    /// exists, its BGP sessions are shown (state, since when, last error).
    #[arg(
        long,
        env = "WGMESH_BGP_SOCKET",
        default_value = "/run/wgmesh/bird.ctl"
    )]
    pub bgp_socket: PathBuf,
    /// text (a table) or json (`wgmesh status` only).
    #[arg(long, env = "WGMESH_OUTPUT", value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// `wgmesh dataplane`.
#[derive(Debug, Args)]
#[command(
    long_about = "Run the userspace WireGuard device in the foreground.\n\n\
    Creates the TUN device INTERFACE and serves the standard WireGuard UAPI on \
    <uapi-dir>/INTERFACE.sock (root only), so it is configured like wireguard-go:\n\n  \
    wg set INTERFACE private-key KEYFILE listen-port 51820 peer PUBKEY endpoint IP:PORT allowed-ips CIDR\n  \
    ip addr add 10.99.0.1/24 dev INTERFACE && ip link set INTERFACE up\n\n\
    and read with `wg show INTERFACE`. Until a listen port is set it listens on a random one. \
    SIGTERM or SIGINT stops it; the TUN device goes away with the process and the socket \
    file is removed. The agent restarting does not touch this process, so traffic keeps flowing."
)]
pub struct DataplaneArgs {
    /// Name of the TUN interface (and of the UAPI socket). Must be unique on the host.
    #[arg(long, short, env = "WGMESH_INTERFACE", default_value = "wgmesh0", value_parser = parse_interface)]
    pub interface: String,
    /// Directory of the UAPI socket; `wg` only looks in /var/run/wireguard.
    #[arg(long, env = "WGMESH_UAPI_DIR", default_value = wgmesh::dataplane::DEFAULT_UAPI_DIR)]
    pub uapi_dir: PathBuf,
    /// MTU of the TUN interface: the underlay MTU minus 80 (IPv6 + UDP + WireGuard).
    #[arg(long, env = "WGMESH_MTU", default_value_t = 1420, value_parser = clap::value_parser!(u16).range(576..=65455))]
    pub mtu: u16,
    /// Disable TUN offloads (TSO/GRO through IFF_VNET_HDR), e.g. to compare.
    #[arg(long, env = "WGMESH_NO_OFFLOAD")]
    pub no_offload: bool,
    /// UDP socket send and receive buffer size in bytes (forced past
    /// net.core.rmem_max when running as root).
    #[arg(long, env = "WGMESH_UDP_BUFFER", default_value_t = 16 << 20)]
    pub udp_buffer: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Table,
    Json,
}

/// `--interface`: the project's one interface-name rule
/// (`wgmesh::net::check_interface_name`); clap puts the flag in front of it.
fn parse_interface(text: &str) -> Result<String, String> {
    wgmesh::net::check_interface_name(text)
        .map(|()| text.to_owned())
        .map_err(|e| e.to_string())
}

/// `90d`, `12h`, `1d12h`, `45s` (see `wgmesh::keys::evidence::parse_duration`).
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    wgmesh::keys::evidence::parse_duration(text)
        .map(std::time::Duration::from_secs)
        .map_err(|e| e.to_string())
}

/// `--key-max-age`: a duration, or `None` for "off". (A newtype: clap
/// treats a bare `Option` field as "flag may be absent".)
#[derive(Debug, Clone, Copy)]
pub struct MaxAge(pub Option<std::time::Duration>);

fn parse_optional_duration(text: &str) -> Result<MaxAge, String> {
    match text.trim() {
        "off" | "never" => Ok(MaxAge(None)),
        t => parse_duration(t).map(|d| MaxAge(Some(d))),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// Every `--interface` takes the one rule, and its error names the flag,
    /// the name, what is wrong and the rule.
    #[test]
    fn every_interface_flag_checks_the_one_rule() {
        for command in [
            &["wgmesh", "dataplane"][..],
            &[
                "wgmesh",
                "agent",
                "--node-name",
                "a",
                "--cluster-cidrs",
                "10.244.0.0/16",
            ],
            &["wgmesh", "status", "--node-name", "a"],
        ] {
            let ok = [command, &["--interface", "wg-0.a_b"]].concat();
            if let Err(e) = Cli::try_parse_from(&ok) {
                panic!("{ok:?}: {e}");
            }
            let bad = [command, &["--interface", "much-too-long-nm"]].concat();
            let err = Cli::try_parse_from(&bad).unwrap_err().to_string();
            assert!(
                err.contains("'--interface <INTERFACE>'")
                    && err.contains("\"much-too-long-nm\": longer than 15 bytes")
                    && err.contains(wgmesh::net::INTERFACE_NAME_RULE),
                "{err}"
            );
        }
    }
}
