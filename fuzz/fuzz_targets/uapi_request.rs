//! The UAPI request parser (`parse_request_bytes`) and its `format_set` round
//! trip; see `wgmesh_fuzz::uapi`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| wgmesh_fuzz::uapi::run(data));
