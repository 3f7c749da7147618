//! The UDP receive path (`Device::on_datagram`) against a hostile network; see
//! `wgmesh_fuzz::udp` for the input format and the invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| wgmesh_fuzz::udp::run(data));
