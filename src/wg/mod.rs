//! The WireGuard backend seam. Today: the UAPI text protocol codec shared by
//! the dataplane's UAPI server and (later) the agent's UAPI client.

pub mod proto;
