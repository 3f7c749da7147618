//! BGP mode of route sync: the agent speaks no BGP itself. It configures
//! BIRD 2 on the node, BIRD peers with the fabric and delivers what it
//! learned into a kernel table of its own, and the agent reads that table.
//!
//! ```text
//!   BgpConfig ──render──▶ text ──Bird::install──▶ bird.conf (0600)
//!                                    Bird::configure (birdc configure)
//!   BIRD ◀──BGP──▶ fabric routers
//!     └─ kernel protocols ──▶ kernel table N ──TableReader::routes──▶ Vec<LearnedRoute>
//! ```
//!
//! - [`config`]: the pure renderer. Default-deny import through the admin
//!   prefix list, exports announced from blackhole statics that never
//!   reach the kernel, one session per address family, per-session import
//!   limit, graceful restart, and nothing that touches the main table.
//! - [`engine`]: the config file (atomic, 0600, parse-checked), `birdc`
//!   (`configure`, `show protocols`, `enable`) and starting BIRD; blocking
//!   and bounded.
//! - [`table`]: the rtnetlink dump of table N.
//!
//! What comes out of table N is only what BIRD accepted: the agent's
//! validator still decides what reaches the device (owner-bound prefixes,
//! next hop = the session's peer).

pub mod config;
pub mod engine;
pub mod speaker;
pub mod table;

pub use config::{
    mesh_protocol_names, protocol_name, render, validate, BgpConfig, ConfigError, ImportRule, Mesh,
    MeshSession, Neighbor, Password, Timers, DEFAULT_MAX_PREFIXES, DEFAULT_TABLE,
};
pub use engine::{
    parse_protocols, parse_reply, parse_routes, Bird, BirdRoute, EngineError, ProtoState,
    ProtocolStatus, Reconfigured, ReplyLine, SessionState, Spawn,
};
pub use table::{learned_route, LearnedRoute, TableError, TableReader, MAIN_TABLE, RTPROT_BIRD};
