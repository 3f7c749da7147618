//! Key material and its lifecycle: the key types, the on-disk store, the rotation
//! state machine and the tamper-evident audit log.

pub mod audit;
pub mod rotation;
pub mod store;
mod types;

pub use types::{Fingerprint, KeyError, PresharedKey, PrivateKey, PublicKey, KEY_B64_LEN, KEY_LEN};
