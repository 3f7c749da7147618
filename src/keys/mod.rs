//! Key material and its lifecycle: the key types, the on-disk store, the rotation
//! state machine, the tamper-evident audit log, and the evidence built from
//! them (key inventory, evidence bundle).

pub mod audit;
pub mod evidence;
pub mod rotation;
pub mod schedule;
pub mod store;
mod types;

pub use types::{Fingerprint, KeyError, PresharedKey, PrivateKey, PublicKey, KEY_B64_LEN, KEY_LEN};
