//! Node objects through `node::decode` and `mesh::plan`; see
//! `wgmesh_fuzz::node_plan`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| wgmesh_fuzz::node_plan::run(data));
