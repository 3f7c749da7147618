//! Fuzz harnesses for wgmesh's attack surfaces, one module per cargo-fuzz
//! target in `fuzz_targets/`. They live in a library so the seed corpus can be
//! generated, and replayed without sanitizers, by ordinary tests
//! (`cargo test --manifest-path fuzz/Cargo.toml`).

pub mod node_plan;
pub mod uapi;
pub mod udp;

#[cfg(test)]
mod seeds;
