//! `uapi_request`: raw bytes from the UAPI socket into the request parser.
//!
//! Invariants, beyond "never panics":
//! - a request that parses is exactly one framed message: [`message_len`] says
//!   it ends where the input ends (the server frames with one and parses with
//!   the other, so they must agree);
//! - `get` parses only from `get=1\n\n`;
//! - a `set` survives the round trip: [`format_set`] of it is itself one framed
//!   message that parses back to an equal request, and formatting that again
//!   gives the same text (the formatter is canonical);
//! - every error has an errno and a message.

use wgmesh::uapi::{format_set, message_len, parse_request_bytes, Request};

pub fn run(data: &[u8]) {
    // Framing must not panic on anything, whatever the parser thinks of it.
    let framed = message_len(data);
    match parse_request_bytes(data) {
        Err(e) => {
            let _ = e.errno();
            let _ = e.closes_connection();
            assert!(!e.to_string().is_empty());
        }
        Ok(request) => {
            assert_eq!(
                framed,
                Some(data.len()),
                "a request that parses must be exactly one framed message"
            );
            match request {
                Request::Get => assert_eq!(data, b"get=1\n\n"),
                Request::Set(set) => {
                    let text = format_set(&set);
                    assert_eq!(
                        message_len(text.as_bytes()),
                        Some(text.len()),
                        "format_set must write exactly one framed message"
                    );
                    let back = match parse_request_bytes(text.as_bytes()) {
                        Ok(Request::Set(back)) => back,
                        other => panic!("format_set output does not parse back: {other:?}"),
                    };
                    assert_eq!(
                        back, set,
                        "set request changed in a format/parse round trip"
                    );
                    assert_eq!(
                        format_set(&back).as_str(),
                        text.as_str(),
                        "format_set is not canonical"
                    );
                }
            }
        }
    }
}
