use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use rtnetlink::packet_core::NLM_F_MULTIPART;

use super::*;
use crate::keys::PrivateKey;

const FAMILY: u16 = 0x1d;

fn pk(i: u32) -> PublicKey {
    let mut b = [0x42u8; 32];
    b[..4].copy_from_slice(&i.to_be_bytes());
    PublicKey::from_bytes(b)
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn peer(i: u32, ips: Vec<IpNet>) -> PeerConfig {
    PeerConfig {
        public_key: pk(i),
        endpoint: Some(SocketAddr::from(([192, 0, 2, (i % 250) as u8 + 1], 51820))),
        allowed_ips: ips,
        persistent_keepalive: Some(25),
        successor: None,
    }
}

/// Parses the bytes as the kernel would see them.
fn parse(bytes: &[u8]) -> (NetlinkHeader, GenlHeader, WireguardMessage) {
    let m = NetlinkMessage::<GenlMessage<WireguardMessage>>::deserialize(bytes).unwrap();
    let header = m.header;
    match m.payload {
        NetlinkPayload::InnerMessage(g) => (header, g.header, g.payload),
        other => panic!("not a WireGuard message: {other:?}"),
    }
}

fn peers_of(m: &WireguardMessage) -> Vec<WireguardPeer> {
    m.attributes
        .iter()
        .find_map(|a| match a {
            WireguardAttribute::Peers(p) => Some(p.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

fn key_of(p: &WireguardPeer) -> PublicKey {
    p.iter()
        .find_map(|a| match a {
            WireguardPeerAttribute::PublicKey(k) => Some(PublicKey::from_bytes(*k)),
            _ => None,
        })
        .expect("every peer entry names its key")
}

fn flags_of(p: &WireguardPeer) -> WireguardPeerFlags {
    p.iter()
        .find_map(|a| match a {
            WireguardPeerAttribute::Flags(f) => Some(*f),
            _ => None,
        })
        .unwrap_or(WireguardPeerFlags::empty())
}

fn ips_of(p: &WireguardPeer) -> Vec<IpNet> {
    p.iter()
        .filter_map(|a| match a {
            WireguardPeerAttribute::AllowedIps(ips) => Some(ips),
            _ => None,
        })
        .flatten()
        .map(|ip| ip_net(ip).unwrap())
        .collect()
}

#[test]
fn a_small_change_set_is_one_message_with_the_right_bytes() {
    let key = PrivateKey::from_bytes([7u8; 32]).unwrap();
    let key_bytes = key.as_x25519().to_bytes();
    let added = PeerConfig {
        public_key: pk(4),
        endpoint: Some("[2001:db8::4]:51820".parse().unwrap()),
        allowed_ips: vec![net("10.244.4.0/24"), net("fd00:4::/64")],
        persistent_keepalive: Some(25),
        successor: None,
    };
    let changes = ChangeSet {
        private_key: Some(key.clone()),
        listen_port: Some(51820),
        fwmark: None,
        peers: vec![
            PeerChange::Remove(pk(1)),
            PeerChange::Update {
                public_key: pk(2),
                endpoint: Some("192.0.2.2:51821".parse().unwrap()),
                allowed_ips: None,
                persistent_keepalive: Some(None),
                successor: None,
            },
            PeerChange::Update {
                public_key: pk(3),
                endpoint: None,
                allowed_ips: Some(vec![net("10.244.3.0/24")]),
                persistent_keepalive: None,
                successor: None,
            },
            PeerChange::Add(added),
        ],
        extra_identity: None,
    };
    let messages = set_messages("wgmesh0", &changes, SAFE_MESSAGE_BYTES);
    assert_eq!(messages.len(), 1);
    let bytes = messages[0].to_bytes(FAMILY, 7);
    assert_eq!(bytes.len(), messages[0].len());

    // nlmsghdr: length, type = the resolved family, REQUEST|ACK, seq.
    assert_eq!(&bytes[0..4], &(bytes.len() as u32).to_ne_bytes());
    assert_eq!(&bytes[4..6], &FAMILY.to_ne_bytes());
    assert_eq!(&bytes[6..8], &(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    assert_eq!(&bytes[8..12], &7u32.to_ne_bytes());
    // genlmsghdr: WG_CMD_SET_DEVICE (1), WG_GENL_VERSION (1).
    assert_eq!(&bytes[16..20], &[1, 1, 0, 0]);
    // WGDEVICE_A_IFNAME (2): "wgmesh0\0", 4 + 8 bytes.
    assert_eq!(&bytes[20..24], &[12, 0, 2, 0]);
    assert_eq!(&bytes[24..32], b"wgmesh0\0");
    // WGDEVICE_A_PRIVATE_KEY (3): the 32 key bytes.
    assert_eq!(&bytes[32..36], &[36, 0, 3, 0]);
    assert_eq!(&bytes[36..68], &key_bytes);
    // WGDEVICE_A_LISTEN_PORT (6): 51820, host order, padded.
    assert_eq!(&bytes[68..72], &[6, 0, 6, 0]);
    assert_eq!(&bytes[72..74], &51820u16.to_ne_bytes());
    // WGDEVICE_A_PEERS (8 | NLA_F_NESTED).
    assert_eq!(&bytes[78..80], &(8u16 | 0x8000).to_ne_bytes());

    let (header, genl, m) = parse(&bytes);
    assert_eq!(header.message_type, FAMILY);
    assert_eq!(genl.cmd, 1);
    assert_eq!(m.cmd, WireguardCmd::SetDevice);
    assert_eq!(
        m.attributes[0],
        WireguardAttribute::IfName("wgmesh0".into())
    );
    assert_eq!(m.attributes[1], WireguardAttribute::PrivateKey(key_bytes));
    assert_eq!(m.attributes[2], WireguardAttribute::ListenPort(51820));

    let peers = peers_of(&m);
    assert_eq!(peers.len(), 4);
    use WireguardPeerAttribute as A;
    use WireguardPeerFlags as F;
    assert_eq!(
        peers[0].0,
        vec![A::PublicKey(*pk(1).as_bytes()), A::Flags(F::RemoveMe)]
    );
    assert_eq!(
        peers[1].0,
        vec![
            A::PublicKey(*pk(2).as_bytes()),
            A::Flags(F::UpdateOnly),
            A::Endpoint("192.0.2.2:51821".parse().unwrap()),
            A::PersistentKeepalive(0),
        ]
    );
    assert_eq!(flags_of(&peers[2]), F::UpdateOnly | F::ReplaceAllowedIps);
    assert_eq!(ips_of(&peers[2]), vec![net("10.244.3.0/24")]);
    assert_eq!(
        peers[3].0,
        vec![
            A::PublicKey(*pk(4).as_bytes()),
            A::Flags(F::ReplaceAllowedIps),
            A::Endpoint("[2001:db8::4]:51820".parse().unwrap()),
            A::PersistentKeepalive(25),
            A::AllowedIps(vec![
                WireguardAllowedIp(vec![
                    WireguardAllowedIpAttr::Family(WireguardAddressFamily::Ipv4),
                    WireguardAllowedIpAttr::IpAddr("10.244.4.0".parse().unwrap()),
                    WireguardAllowedIpAttr::Cidr(24),
                ]),
                WireguardAllowedIp(vec![
                    WireguardAllowedIpAttr::Family(WireguardAddressFamily::Ipv6),
                    WireguardAllowedIpAttr::IpAddr("fd00:4::".parse().unwrap()),
                    WireguardAllowedIpAttr::Cidr(64),
                ]),
            ]),
        ]
    );
    // The allowed IPs on the wire: AF_INET = 2 then 10.244.4.0, cidr 24.
    let v4 = [
        6, 0, 1, 0, 2, 0, 0, 0, 8, 0, 2, 0, 10, 244, 4, 0, 5, 0, 3, 0, 24,
    ];
    assert!(bytes.windows(v4.len()).any(|w| w == v4));
}

#[test]
fn a_thousand_peers_span_several_messages_each_under_the_limit() {
    let key = PrivateKey::generate();
    let mut want: BTreeMap<PublicKey, BTreeSet<IpNet>> = BTreeMap::new();
    let mut peers = Vec::new();
    for i in 0..1000u32 {
        let (a, b) = ((i / 250) as u8, (i % 250) as u8);
        let mut ips = vec![
            net(&format!("10.{a}.{b}.0/24")),
            net(&format!("172.16.{a}.{b}/32")),
            net(&format!("fd00:{a}:{b}::/64")),
            net(&format!("fd01:{a}:{b}::1/128")),
        ];
        // Every 100th peer has far more than a message holds.
        if i % 100 == 0 {
            ips.extend((0..300u32).map(|j| net(&format!("100.{a}.{b}.{}/32", j % 256)).trunc()));
            ips.extend((0..44u32).map(|j| net(&format!("fd02:{i:x}:{j:x}::/48"))));
        }
        ips.sort();
        ips.dedup();
        want.insert(pk(i), ips.iter().copied().collect());
        peers.push(PeerChange::Add(peer(i, ips)));
    }
    let changes = ChangeSet {
        private_key: Some(key.clone()),
        listen_port: Some(51820),
        fwmark: None,
        peers,
        extra_identity: None,
    };
    let messages = set_messages("wgmesh0", &changes, SAFE_MESSAGE_BYTES);
    eprintln!(
        "1,000 peers ({} allowed IPs) -> {} messages of at most {SAFE_MESSAGE_BYTES} bytes (largest {})",
        want.values().map(BTreeSet::len).sum::<usize>(),
        messages.len(),
        messages.iter().map(SetMessage::len).max().unwrap()
    );
    assert!(messages.len() > 10, "{} messages", messages.len());

    let mut seen_first: BTreeSet<PublicKey> = BTreeSet::new();
    let mut got: BTreeMap<PublicKey, Vec<IpNet>> = BTreeMap::new();
    let mut order: Vec<PublicKey> = Vec::new();
    for (n, message) in messages.iter().enumerate() {
        let bytes = message.to_bytes(FAMILY, n as u32 + 1);
        assert!(
            bytes.len() <= SAFE_MESSAGE_BYTES,
            "message {n}: {} bytes",
            bytes.len()
        );
        assert_eq!(bytes.len(), message.len());
        let (_, _, m) = parse(&bytes);
        assert_eq!(
            m.attributes[0],
            WireguardAttribute::IfName("wgmesh0".into())
        );
        let has_key = m
            .attributes
            .iter()
            .any(|a| matches!(a, WireguardAttribute::PrivateKey(_)));
        assert_eq!(has_key, n == 0, "the key rides in the first message only");
        for p in peers_of(&m) {
            let k = key_of(&p);
            let flags = flags_of(&p);
            if seen_first.insert(k) {
                assert_eq!(
                    flags,
                    WireguardPeerFlags::ReplaceAllowedIps,
                    "first chunk of {k}"
                );
                order.push(k);
            } else {
                assert_eq!(flags, WireguardPeerFlags::empty(), "continuation of {k}");
                assert_eq!(order.last(), Some(&k), "a peer's chunks are consecutive");
                assert!(
                    p.iter().all(|a| matches!(
                        a,
                        WireguardPeerAttribute::PublicKey(_)
                            | WireguardPeerAttribute::AllowedIps(_)
                    )),
                    "a continuation carries only key and allowed IPs"
                );
            }
            got.entry(k).or_default().extend(ips_of(&p));
        }
    }
    assert_eq!(order.len(), 1000);
    assert_eq!(
        order,
        (0..1000).map(pk).collect::<Vec<_>>(),
        "peer order kept"
    );
    for (k, ips) in &got {
        let unique: BTreeSet<IpNet> = ips.iter().copied().collect();
        assert_eq!(unique.len(), ips.len(), "an allowed IP of {k} sent twice");
        assert_eq!(&unique, &want[k], "allowed IPs of {k}");
    }
    assert_eq!(got.len(), want.len());
    // The big peers did get split.
    let chunks = messages
        .iter()
        .flat_map(|m| peers_of(&m.0))
        .filter(|p| key_of(p) == pk(500))
        .count();
    assert!(chunks >= 2, "peer 500 in {chunks} chunk(s)");
}

#[test]
fn removal_and_update_only_flags_and_split_updates() {
    let many: Vec<IpNet> = (0..400u32)
        .map(|j| net(&format!("10.{}.{}.0/24", j / 256, j % 256)))
        .collect();
    let changes = ChangeSet {
        peers: vec![
            PeerChange::Remove(pk(1)),
            PeerChange::Update {
                public_key: pk(2),
                endpoint: None,
                allowed_ips: None,
                persistent_keepalive: Some(Some(10)),
                successor: None,
            },
            PeerChange::Update {
                public_key: pk(3),
                endpoint: None,
                allowed_ips: Some(many.clone()),
                persistent_keepalive: None,
                successor: None,
            },
            PeerChange::Update {
                public_key: pk(4),
                endpoint: None,
                allowed_ips: Some(Vec::new()),
                persistent_keepalive: None,
                successor: None,
            },
        ],
        ..ChangeSet::default()
    };
    let messages = set_messages("wgmesh0", &changes, 2048);
    assert!(messages.len() >= 3);
    let entries: Vec<WireguardPeer> = messages
        .iter()
        .flat_map(|m| {
            assert!(m.len() <= 2048);
            peers_of(&parse(&m.to_bytes(FAMILY, 1)).2)
        })
        .collect();
    use WireguardPeerFlags as F;
    assert_eq!(key_of(&entries[0]), pk(1));
    assert_eq!(flags_of(&entries[0]), F::RemoveMe);
    assert!(ips_of(&entries[0]).is_empty());
    assert_eq!(entries[0].len(), 2, "a removal is key and flag only");

    assert_eq!(flags_of(&entries[1]), F::UpdateOnly);
    assert!(entries[1].contains(&WireguardPeerAttribute::PersistentKeepalive(10)));

    let p3: Vec<&WireguardPeer> = entries.iter().filter(|p| key_of(p) == pk(3)).collect();
    assert!(p3.len() >= 2);
    assert_eq!(flags_of(p3[0]), F::UpdateOnly | F::ReplaceAllowedIps);
    for c in &p3[1..] {
        assert_eq!(flags_of(c), F::UpdateOnly, "an update stays update-only");
    }
    let sent: Vec<IpNet> = p3.iter().flat_map(|p| ips_of(p)).collect();
    assert_eq!(sent, many);

    // Replacing with nothing: the flag alone clears the peer's IPs.
    let p4 = entries.iter().find(|p| key_of(p) == pk(4)).unwrap();
    assert_eq!(flags_of(p4), F::UpdateOnly | F::ReplaceAllowedIps);
    assert!(ips_of(p4).is_empty());
}

#[test]
fn nothing_to_change_is_no_message_and_a_key_alone_is_one() {
    assert!(set_messages("wgmesh0", &ChangeSet::default(), SAFE_MESSAGE_BYTES).is_empty());
    let changes = ChangeSet {
        private_key: Some(PrivateKey::generate()),
        ..ChangeSet::default()
    };
    let messages = set_messages("wgmesh0", &changes, SAFE_MESSAGE_BYTES);
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].peer_count(), 0);
    assert_eq!(messages[0].len(), 20 + 12 + 36);
}

#[test]
fn a_limit_too_small_still_makes_progress() {
    let changes = ChangeSet {
        peers: (0..5)
            .map(|i| {
                PeerChange::Add(peer(
                    i,
                    vec![net(&format!("10.0.{i}.0/24")), net("fd00::/64")],
                ))
            })
            .collect(),
        ..ChangeSet::default()
    };
    let messages = set_messages("wgmesh0", &changes, 1);
    let ips: usize = messages
        .iter()
        .flat_map(|m| peers_of(&m.0))
        .map(|p| ips_of(&p).len())
        .sum();
    assert_eq!(ips, 10);
    assert_eq!(messages.len(), 10, "one allowed IP per message");
}

#[test]
fn debug_never_shows_the_private_key() {
    let key = PrivateKey::from_bytes([0xab; 32]).unwrap();
    let changes = ChangeSet {
        private_key: Some(key),
        listen_port: Some(51820),
        fwmark: None,
        peers: vec![PeerChange::Remove(pk(1))],
        extra_identity: None,
    };
    let messages = set_messages("wgmesh0", &changes, SAFE_MESSAGE_BYTES);
    let text = format!("{messages:?}");
    assert!(text.contains("<redacted>"), "{text}");
    assert!(!text.contains("171"), "{text}"); // 0xab
    assert!(!text.to_lowercase().contains("abab"), "{text}");
}

/// The fwmark is a device attribute: it rides in the first message with the
/// key and port (`WGDEVICE_A_FWMARK`, 7), never in a continuation, and 0
/// (clear) is sent like any other value.
#[test]
fn the_fwmark_rides_in_the_first_message() {
    let peers: Vec<PeerChange> = (0..100)
        .map(|i| PeerChange::Add(peer(i, vec![net(&format!("10.1.{i}.0/24"))])))
        .collect();
    for mark in [0x2a_u32, 0] {
        let changes = ChangeSet {
            listen_port: Some(51820),
            fwmark: Some(mark),
            peers: peers.clone(),
            ..ChangeSet::default()
        };
        let messages = set_messages("wgmesh0", &changes, SAFE_MESSAGE_BYTES);
        assert!(messages.len() > 1);
        let bytes = messages[0].to_bytes(FAMILY, 1);
        // IfName (12 bytes) and ListenPort (8) at 20..40, then the mark.
        assert_eq!(&bytes[40..44], &[8, 0, 7, 0]);
        assert_eq!(&bytes[44..48], &mark.to_ne_bytes());
        let (_, _, first) = parse(&bytes);
        assert!(first.attributes.contains(&WireguardAttribute::Fwmark(mark)));
        for m in &messages[1..] {
            let (_, _, rest) = parse(&m.to_bytes(FAMILY, 1));
            assert!(!rest
                .attributes
                .iter()
                .any(|a| matches!(a, WireguardAttribute::Fwmark(_))));
        }
        assert!(format!("{:?}", messages[0]).contains(&format!("fwmark: {mark}")));
    }
    // No fwmark in the change set: none on the wire (the device keeps its own).
    let changes = ChangeSet {
        listen_port: Some(51820),
        ..ChangeSet::default()
    };
    let (_, _, m) =
        parse(&set_messages("wgmesh0", &changes, SAFE_MESSAGE_BYTES)[0].to_bytes(FAMILY, 1));
    assert!(!m
        .attributes
        .iter()
        .any(|a| matches!(a, WireguardAttribute::Fwmark(_))));
}

/// A `WG_CMD_GET_DEVICE` dump as the kernel sends it: two multipart
/// messages (peer 2's allowed IPs continue in the second).
#[test]
fn a_get_device_dump_parses_into_device_state() {
    let private = PrivateKey::from_bytes([9u8; 32]).unwrap();
    let ip = |s: &str| allowed_ip(&net(s));
    use WireguardPeerAttribute as A;
    let first = WireguardMessage {
        cmd: WireguardCmd::GetDevice,
        attributes: vec![
            WireguardAttribute::IfIndex(12),
            WireguardAttribute::IfName("wgmesh0".into()),
            WireguardAttribute::PrivateKey(private.as_x25519().to_bytes()),
            WireguardAttribute::PublicKey(*private.public_key().as_bytes()),
            WireguardAttribute::ListenPort(51820),
            WireguardAttribute::Fwmark(0x2a),
            WireguardAttribute::Peers(vec![
                WireguardPeer(vec![
                    A::PublicKey(*pk(1).as_bytes()),
                    A::PresharedKey([0; 32]),
                    A::Endpoint("192.0.2.1:51820".parse().unwrap()),
                    A::PersistentKeepalive(0),
                    A::LastHandshake(Default::default()),
                    A::RxBytes(10),
                    A::TxBytes(20),
                    A::AllowedIps(vec![ip("10.244.1.0/24")]),
                    A::ProtocolVersion(1),
                ]),
                WireguardPeer(vec![
                    A::PublicKey(*pk(2).as_bytes()),
                    A::Endpoint("[2001:db8::2]:51820".parse().unwrap()),
                    A::PersistentKeepalive(25),
                    A::LastHandshake(netlink_packet_wireguard::WireguardTimeSpec {
                        seconds: 1_700_000_000,
                        nano_seconds: 5,
                    }),
                    A::RxBytes(1),
                    A::TxBytes(2),
                    A::AllowedIps(vec![ip("fd00:2::/64"), ip("10.244.2.0/24")]),
                ]),
            ]),
        ],
    };
    let second = WireguardMessage {
        cmd: WireguardCmd::GetDevice,
        attributes: vec![
            WireguardAttribute::IfIndex(12),
            WireguardAttribute::IfName("wgmesh0".into()),
            WireguardAttribute::Peers(vec![
                WireguardPeer(vec![
                    A::PublicKey(*pk(2).as_bytes()),
                    A::AllowedIps(vec![ip("10.245.2.0/24")]),
                ]),
                WireguardPeer(vec![
                    A::PublicKey(*pk(3).as_bytes()),
                    A::PersistentKeepalive(0),
                ]),
            ]),
        ],
    };
    // Each part as the kernel emits it and as `dump` parses it (the
    // transport that collects the parts is tested in `net::netlink`).
    let messages: Vec<WireguardMessage> = [&first, &second]
        .into_iter()
        .map(|m| {
            let mut buf = vec![0u8; HEADERS_LEN + m.buffer_len()];
            emit_genl(&mut buf, FAMILY, NLM_F_MULTIPART, 42, m.cmd, m);
            parse_wireguard(&buf).unwrap()
        })
        .collect();
    let stats = peer_stats(&messages).unwrap();
    assert_eq!(stats.len(), 3, "peer 2's continuation is not a peer");
    assert_eq!(
        (stats[0].public_key, stats[0].rx_bytes, stats[0].tx_bytes),
        (pk(1), 10, 20)
    );
    assert_eq!(stats[0].last_handshake, None, "0.0 means never");
    assert_eq!(
        stats[1].last_handshake,
        Some(UNIX_EPOCH + Duration::new(1_700_000_000, 5))
    );
    assert_eq!(
        stats[1].endpoint,
        Some("[2001:db8::2]:51820".parse().unwrap())
    );
    assert_eq!((stats[2].public_key, stats[2].endpoint), (pk(3), None));

    // What `dump` keeps of the key: the public half only.
    let mut scrubbed = messages[0].clone();
    scrubbed
        .attributes
        .retain(|a| !matches!(a, WireguardAttribute::PublicKey(_)));
    scrub(&mut scrubbed);
    assert!(!scrubbed
        .attributes
        .iter()
        .any(|a| matches!(a, WireguardAttribute::PrivateKey(_))));
    assert!(scrubbed.attributes.contains(&WireguardAttribute::PublicKey(
        *private.public_key().as_bytes()
    )));

    let state = device_state(messages).unwrap();
    assert_eq!(state.public_key, Some(private.public_key()));
    assert_eq!(state.listen_port, 51820);
    assert_eq!(state.fwmark, 0x2a);
    assert_eq!(
        state.peers,
        vec![
            PeerConfig {
                public_key: pk(1),
                endpoint: Some("192.0.2.1:51820".parse().unwrap()),
                allowed_ips: vec![net("10.244.1.0/24")],
                persistent_keepalive: None,
                successor: None,
            },
            PeerConfig {
                public_key: pk(2),
                endpoint: Some("[2001:db8::2]:51820".parse().unwrap()),
                allowed_ips: vec![
                    net("10.244.2.0/24"),
                    net("10.245.2.0/24"),
                    net("fd00:2::/64")
                ],
                persistent_keepalive: Some(25),
                successor: None,
            },
            PeerConfig {
                public_key: pk(3),
                endpoint: None,
                allowed_ips: vec![],
                persistent_keepalive: None,
                successor: None,
            },
        ]
    );
}

/// The peer table as the kernel's `set_peer` changes it, message by
/// message: remove, update-only, replace, then add allowed IPs (taking
/// them from whichever peer held them).
fn kernel_model(current: &[PeerConfig], messages: &[SetMessage]) -> Vec<PeerConfig> {
    let mut peers: BTreeMap<PublicKey, PeerConfig> =
        current.iter().map(|p| (p.public_key, p.clone())).collect();
    for message in messages {
        let (_, _, m) = parse(&message.to_bytes(FAMILY, 1));
        for entry in peers_of(&m) {
            let key = key_of(&entry);
            let flags = flags_of(&entry);
            if flags.contains(WireguardPeerFlags::RemoveMe) {
                peers.remove(&key);
                continue;
            }
            if let std::collections::btree_map::Entry::Vacant(slot) = peers.entry(key) {
                if flags.contains(WireguardPeerFlags::UpdateOnly) {
                    continue;
                }
                slot.insert(PeerConfig {
                    public_key: key,
                    endpoint: None,
                    allowed_ips: Vec::new(),
                    persistent_keepalive: None,
                    successor: None,
                });
            }
            if flags.contains(WireguardPeerFlags::ReplaceAllowedIps) {
                peers.get_mut(&key).unwrap().allowed_ips.clear();
            }
            for a in entry.iter() {
                let peer = peers.get_mut(&key).unwrap();
                match a {
                    WireguardPeerAttribute::Endpoint(e) => peer.endpoint = Some(*e),
                    WireguardPeerAttribute::PersistentKeepalive(k) => {
                        peer.persistent_keepalive = Some(*k)
                    }
                    _ => {}
                }
            }
            for ip in ips_of(&entry) {
                for other in peers.values_mut() {
                    other.allowed_ips.retain(|have| *have != ip);
                }
                peers.get_mut(&key).unwrap().allowed_ips.push(ip);
            }
        }
    }
    let mut out: Vec<PeerConfig> = peers.into_values().collect();
    for p in &mut out {
        p.normalize();
    }
    out
}

/// Split or not, the messages leave the kernel where the planner's own
/// model of a change set leaves the device.
#[test]
fn split_messages_reach_the_planned_state() {
    let ips = |i: u32, n: u32| -> Vec<IpNet> {
        (0..n)
            .map(|j| net(&format!("10.{i}.{j}.0/24")))
            .chain([net(&format!("fd00:{i:x}::/64"))])
            .collect()
    };
    let current: Vec<PeerConfig> = (0..40).map(|i| peer(i, ips(i, 3))).collect();
    let mut desired: Vec<PeerConfig> = Vec::new();
    for i in 0..40u32 {
        let mut p = peer(i, ips(i, 3));
        match i % 5 {
            0 => continue, // removed
            1 => p.endpoint = Some(SocketAddr::from(([198, 51, 100, i as u8], 4000))),
            2 => p.allowed_ips = ips(i, 40), // grows past a message
            3 => p.persistent_keepalive = None,
            _ => {}
        }
        desired.push(p);
    }
    // A removed peer's CIDRs move to a new one; more new peers follow.
    desired.push(peer(1000, ips(0, 3)));
    desired.extend((1001..1030).map(|i| peer(i, ips(i - 900, 20))));
    for p in &mut desired {
        p.normalize();
    }
    desired.sort_by_key(|p| p.public_key);

    let changes = ChangeSet {
        peers: crate::mesh::diff(&current, &desired),
        ..ChangeSet::default()
    };
    let want = crate::mesh::apply(&current, &changes.peers);
    assert_eq!(want, desired);
    for max in [300, 512, 1024, SAFE_MESSAGE_BYTES, usize::MAX] {
        let messages = set_messages("wgmesh0", &changes, max);
        assert!(messages.iter().all(|m| m.len() <= max));
        assert_eq!(kernel_model(&current, &messages), want, "max_bytes {max}");
    }
}

#[test]
fn a_key_change_is_one_request_new_key_first_with_a_forced_handshake() {
    // Peer 1's node rotated to key 9: add 9 with the allowed IPs (kernel
    // moves each prefix atomically), then remove 1, then take the
    // forcing keepalive off 9 again. A promote (from a change set built
    // for a dual-capable device) comes out the same way.
    let ips = vec![net("10.244.1.0/24"), net("fd00:1::/64")];
    let new = PeerConfig {
        successor: Some(pk(5)),
        persistent_keepalive: None,
        ..peer(9, ips.clone())
    };
    for peers in [
        vec![PeerChange::Add(new.clone()), PeerChange::Remove(pk(1))],
        vec![PeerChange::Promote {
            from: pk(1),
            to: new.clone(),
        }],
    ] {
        let changes = ChangeSet {
            peers,
            extra_identity: Some(None),
            ..ChangeSet::default()
        };
        let messages = set_messages("wgmesh0", &changes, SAFE_MESSAGE_BYTES);
        assert_eq!(messages.len(), 1);
        let (_, _, m) = parse(&messages[0].to_bytes(FAMILY, 1));
        let got = peers_of(&m);
        let keys: Vec<PublicKey> = got.iter().map(key_of).collect();
        assert_eq!(keys, vec![pk(9), pk(1), pk(9)]);
        assert!(flags_of(&got[0]).contains(WireguardPeerFlags::ReplaceAllowedIps));
        assert_eq!(ips_of(&got[0]), ips);
        assert!(flags_of(&got[1]).contains(WireguardPeerFlags::RemoveMe));
        assert!(flags_of(&got[2]).contains(WireguardPeerFlags::UpdateOnly));
        let keepalive = |p: &WireguardPeer| {
            p.iter().find_map(|a| match a {
                WireguardPeerAttribute::PersistentKeepalive(k) => Some(*k),
                _ => None,
            })
        };
        assert_eq!(keepalive(&got[0]), Some(FORCE_HANDSHAKE_KEEPALIVE));
        assert_eq!(keepalive(&got[2]), Some(0));
    }
}
