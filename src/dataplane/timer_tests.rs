//! Timer behaviour under a controlled clock: boringtun's `Tunn` reads
//! `mock_instant`'s thread-local clock when the `mock-time` feature is on, and
//! these tests advance it. Run with
//! `cargo test --features mock-time --lib dataplane::timer_tests`.

use std::time::{Duration, Instant};

use mock_instant::MockClock;

use super::device::TunOutcome;
use super::tests::{ipv4_packet, pair, pump, send, Node};

fn data(from: &mut Node, to: &mut Node, payload: &[u8]) -> bool {
    let p = ipv4_packet(from.dev_addr(), to.dev_addr(), payload);
    send(from, &p);
    pump(from, to);
    to.wire.tun.pop_back().is_some_and(|got| got == p)
}

/// Lets `secs` seconds pass one at a time, ticking both devices like the
/// runtime does and delivering what they send.
fn advance(secs: u64, a: &mut Node, b: &mut Node) {
    for _ in 0..secs {
        MockClock::advance(Duration::from_secs(1));
        a.dev.tick(Instant::now(), &mut a.wire);
        b.dev.tick(Instant::now(), &mut b.wire);
        pump(a, b);
    }
}

/// A fresh pair, with the clock moved off zero (boringtun's timers treat
/// "0 s since the tunnel started" as "never").
fn started_pair() -> (Node, Node) {
    let pair = pair();
    MockClock::advance(Duration::from_secs(1));
    pair
}

#[test]
fn rekey_after_time_makes_a_new_session_without_losing_data() {
    let (mut a, mut b) = started_pair();
    assert!(data(&mut a, &mut b, b"first"));
    let before = a.dev.counters().handshakes_completed;
    // REKEY_AFTER_TIME is 120 s: with traffic flowing, the initiator starts a
    // new handshake on its own, and no packet is lost meanwhile.
    for i in 0..13u8 {
        advance(10, &mut a, &mut b);
        assert!(data(&mut a, &mut b, &[i; 100]), "packet {i} lost");
    }
    assert!(
        a.dev.counters().handshakes_completed > before,
        "no rekey after 125 s"
    );
    assert!(data(&mut a, &mut b, b"after rekey"));
    assert!(data(&mut b, &mut a, b"and back"));
}

#[test]
fn a_lost_initiation_is_retried_after_rekey_timeout() {
    let (mut a, mut b) = started_pair();
    let p = ipv4_packet(a.dev_addr(), b.dev_addr(), b"x");
    assert_eq!(send(&mut a, &p), TunOutcome::Queued);
    // The network eats the first initiation.
    assert_eq!(a.wire.udp.len(), 1);
    a.wire.udp.clear();
    // REKEY_TIMEOUT is 5 s (plus jitter): a retry goes out, and the queued
    // packet is delivered once it completes.
    for _ in 0..7 {
        MockClock::advance(Duration::from_secs(1));
        a.dev.tick(Instant::now(), &mut a.wire);
    }
    assert!(!a.wire.udp.is_empty(), "no retry after 7 s");
    pump(&mut a, &mut b);
    assert_eq!(b.wire.tun.pop_back().as_deref(), Some(&p[..]));
}

#[test]
fn the_receiver_sends_a_keepalive_when_it_has_nothing_to_say() {
    let (mut a, mut b) = started_pair();
    assert!(data(&mut a, &mut b, b"handshake"));
    // Timers count in ticks: let one pass so the next packet is "later" than
    // the handshake response B sent.
    advance(1, &mut a, &mut b);
    assert!(data(&mut a, &mut b, b"one way"));
    let rx_before = a.dev.peers()[0].rx_bytes;
    // KEEPALIVE_TIMEOUT is 10 s: B received data and sent nothing back.
    advance(12, &mut a, &mut b);
    assert!(
        a.dev.peers()[0].rx_bytes > rx_before,
        "no passive keepalive"
    );
}

#[test]
fn persistent_keepalive_keeps_sending() {
    let (mut a, mut b) = started_pair();
    let mut s = a.dev.peer_settings(&b.key).unwrap();
    s.persistent_keepalive = 5;
    a.dev.upsert_peer(s, false);
    assert!(data(&mut a, &mut b, b"x"));
    let rx = b.dev.peers()[0].rx_bytes;
    advance(16, &mut a, &mut b);
    // At least two keepalives (32 bytes each on the wire) in 16 s.
    assert!(
        b.dev.peers()[0].rx_bytes >= rx + 64,
        "persistent keepalive missing"
    );
}

#[test]
fn sessions_expire_and_come_back_on_demand() {
    let (mut a, mut b) = started_pair();
    assert!(data(&mut a, &mut b, b"x"));
    // REJECT_AFTER_TIME * 3 = 540 s of silence clears every session; nothing
    // is sent meanwhile apart from the timers' own attempts, which we drop.
    for _ in 0..600 {
        MockClock::advance(Duration::from_secs(1));
        a.dev.tick(Instant::now(), &mut a.wire);
        b.dev.tick(Instant::now(), &mut b.wire);
        a.wire.udp.clear();
        b.wire.udp.clear();
    }
    let p = ipv4_packet(a.dev_addr(), b.dev_addr(), b"later");
    assert_eq!(
        send(&mut a, &p),
        TunOutcome::Queued,
        "old session still in use"
    );
    pump(&mut a, &mut b);
    assert_eq!(b.wire.tun.pop_back().as_deref(), Some(&p[..]));
}
