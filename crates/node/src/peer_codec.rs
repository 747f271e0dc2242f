//! A hand-written decoder for the peer messages every client write makes: the owner's
//! batches of replicated operations, the writes a home forwards to an owner, and their
//! answers. Each registration is decoded on every node (forwarded to its owner, then
//! replicated to the others), and serde's generic MessagePack decoding of these
//! messages took more instructions per operation than applying it (docs/benchmarks.md,
//! twenty-first series).
//!
//! It takes only the exact shapes a node of this [`crate::peer::PEER_MESSAGE_SHAPE`]
//! writes with structs as arrays, every field present. Anything else (a message with
//! field names from a peer of another shape, a service's settings, another message)
//! makes it give up, and the message is decoded by serde instead, which gives the same
//! value or the same error: it never accepts what the generic decoding refuses, and
//! never refuses what it accepts.

use std::sync::Arc;

use shoal_proto::mpack::{
    instance_key, instance_spec, metadata, option, session_id, Reader, ServiceKeyCache,
};
use shoal_proto::FrameError;
use shoal_replication::{
    Batch, ForwardOutcome, PeerMsg, SessionAnnounce, SessionState, Write, WriteRuns,
};
use shoal_storage::{Instance, InstanceOp, Lease, NodeId, Op, Stamp};

/// How many service keys a link remembers (see [`ServiceKeyCache`]): about 100 bytes
/// each.
pub const LINK_SERVICE_KEYS: usize = 16_384;

/// Decodes a peer message body: the same as `shoal_proto::decode::<PeerMsg>(body)`.
/// `keys` are the service keys this link has read before.
pub fn decode_peer_msg(body: &[u8], keys: &mut ServiceKeyCache) -> Result<PeerMsg, FrameError> {
    match peer_msg(body, keys) {
        Some(msg) => Ok(msg),
        None => shoal_proto::decode(body),
    }
}

/// The fast path: `None` when the body is not of a shape it takes.
fn peer_msg(body: &[u8], keys: &mut ServiceKeyCache) -> Option<PeerMsg> {
    let mut c = Reader::new(body);
    if c.map_len()? != 1 {
        return None;
    }
    let msg = match c.key()? {
        b"Batch" => PeerMsg::Batch(batch(&mut c, keys)?),
        b"ForwardMany" => {
            if c.array_len()? != 3 {
                return None;
            }
            let id = c.uint()?;
            let writes = c.seq(|c| write(c, keys))?;
            PeerMsg::ForwardMany {
                id,
                writes: WriteRuns::one(Arc::new(writes)),
                sent_ms: c.uint()?,
            }
        }
        b"ForwardManyReply" => {
            if c.array_len()? != 2 {
                return None;
            }
            let id = c.uint()?;
            // {"Applied": [revision]}; a refusal is left to serde.
            let outcomes = c.seq(|c| {
                if c.map_len()? != 1 || c.key()? != b"Applied" || c.array_len()? != 1 {
                    return None;
                }
                Some(ForwardOutcome::Applied {
                    revision: c.uint()?,
                })
            })?;
            PeerMsg::ForwardManyReply { id, outcomes }
        }
        _ => return None,
    };
    c.at_end().then_some(msg)
}

/// `[ops, sessions]`.
fn batch(c: &mut Reader<'_>, keys: &mut ServiceKeyCache) -> Option<Batch> {
    if c.array_len()? != 2 {
        return None;
    }
    let ops = c.seq(|c| instance_op(c, keys).map(Arc::new))?;
    let sessions = c.seq(announce)?;
    Some(Batch { ops, sessions })
}

/// `{"Instance": [service, key, stamp, state, lapsed, reaped]}`.
fn instance_op(c: &mut Reader<'_>, keys: &mut ServiceKeyCache) -> Option<Op> {
    if c.map_len()? != 1 || c.key()? != b"Instance" || c.array_len()? != 6 {
        return None;
    }
    Some(Op::Instance(InstanceOp {
        service: keys.read(c)?,
        key: instance_key(c)?,
        stamp: stamp(c)?,
        state: option(c, instance)?,
        lapsed: option(c, Reader::bool)?,
        reaped: c.bool()?,
    }))
}

/// `[time, origin]`.
fn stamp(c: &mut Reader<'_>) -> Option<Stamp> {
    if c.array_len()? != 2 {
        return None;
    }
    Some(Stamp {
        time: c.uint()?,
        origin: c.uint()?,
    })
}

/// `[ip, port, cluster, weight, healthy, enabled, metadata, lease, last_beat_ms,
/// stamp]`.
fn instance(c: &mut Reader<'_>) -> Option<Instance> {
    if c.array_len()? != 10 {
        return None;
    }
    Some(Instance {
        ip: c.string()?,
        port: u16::try_from(c.uint()?).ok()?,
        cluster: c.string()?,
        weight: c.number()?,
        healthy: c.bool()?,
        enabled: c.bool()?,
        metadata: metadata(c)?,
        lease: lease(c)?,
        last_beat_ms: c.uint()?,
        stamp: c.uint()?,
    })
}

/// `{"Session": id}` or `{"Ttl": [unhealthy_after_ms, remove_after_ms]}`.
fn lease(c: &mut Reader<'_>) -> Option<Lease> {
    if c.map_len()? != 1 {
        return None;
    }
    match c.key()? {
        b"Session" => session_id(c).map(Lease::Session),
        b"Ttl" => shoal_proto::mpack::ttl_lease(c).map(Lease::Ttl),
        _ => None,
    }
}

/// `[session, home, state, stamp]`, the state by name.
fn announce(c: &mut Reader<'_>) -> Option<SessionAnnounce> {
    if c.array_len()? != 4 {
        return None;
    }
    Some(SessionAnnounce {
        session: session_id(c)?,
        home: NodeId::new(c.str()?),
        state: match c.key()? {
            b"Live" => SessionState::Live,
            b"Disconnected" => SessionState::Disconnected,
            b"Closed" => SessionState::Closed,
            _ => return None,
        },
        stamp: stamp(c)?,
    })
}

/// `{"Register": [service, instance, session]}` or `{"Deregister": [service,
/// instance]}`; other writes are left to serde.
fn write(c: &mut Reader<'_>, keys: &mut ServiceKeyCache) -> Option<Write> {
    if c.map_len()? != 1 {
        return None;
    }
    match c.key()? {
        b"Register" => {
            if c.array_len()? != 3 {
                return None;
            }
            Some(Write::Register {
                service: keys.read(c)?,
                instance: instance_spec(c)?,
                session: session_id(c)?,
            })
        }
        b"Deregister" => {
            if c.array_len()? != 2 {
                return None;
            }
            Some(Write::Deregister {
                service: keys.read(c)?,
                instance: instance_key(c)?,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use shoal_replication::{Ack, Ping};
    use shoal_storage::{
        InstanceKey, InstanceSpec, MetaOp, ServiceKey, ServiceMeta, SessionId, TtlLease,
    };

    fn keys() -> ServiceKeyCache {
        ServiceKeyCache::new(LINK_SERVICE_KEYS)
    }

    fn service(i: usize) -> ServiceKey {
        ServiceKey::new("public", "DEFAULT_GROUP", format!("svc-{i}"))
    }

    fn instance(ip: &str, lease: Lease) -> Instance {
        Instance {
            ip: ip.into(),
            port: 8080,
            cluster: "DEFAULT".into(),
            weight: 2.5,
            healthy: true,
            enabled: false,
            metadata: [("zone".to_string(), "é-1".to_string())].into(),
            lease,
            last_beat_ms: 1_700_000_000_000,
            stamp: 41,
        }
    }

    fn op(svc: usize, inst: Option<Instance>, lapsed: Option<bool>, reaped: bool) -> Arc<Op> {
        let key = inst.as_ref().map_or(
            InstanceKey {
                cluster: "c".into(),
                ip: "::1".into(),
                port: 1,
            },
            Instance::key,
        );
        Arc::new(Op::Instance(InstanceOp {
            service: service(svc),
            key,
            stamp: Stamp {
                time: (1 << 40) + svc as u64,
                origin: u64::MAX,
            },
            state: inst,
            lapsed,
            reaped,
        }))
    }

    fn spec(ip: &str, ttl: Option<TtlLease>) -> InstanceSpec {
        InstanceSpec {
            weight: 3.0,
            metadata: [("k".to_string(), "v".to_string())].into(),
            ttl,
            ..InstanceSpec::new(ip, 9000)
        }
    }

    /// Messages of every shape the fast path takes, and some it leaves to serde.
    fn messages() -> Vec<(PeerMsg, bool)> {
        let ttl = TtlLease {
            unhealthy_after_ms: 5,
            remove_after_ms: 300_000,
        };
        let batch = Batch {
            ops: vec![
                op(
                    1,
                    Some(instance("10.0.0.1", Lease::Session(SessionId(7)))),
                    None,
                    false,
                ),
                op(
                    1,
                    Some(instance("10.0.0.2", Lease::Ttl(ttl.clone()))),
                    Some(true),
                    false,
                ),
                op(2, None, None, true),
                op(
                    3,
                    Some(instance("fe80::1", Lease::Session(SessionId(u128::MAX)))),
                    Some(false),
                    false,
                ),
            ],
            sessions: ["Live", "Disconnected", "Closed"]
                .iter()
                .enumerate()
                .map(|(i, _)| SessionAnnounce {
                    session: SessionId(i as u128 + 1),
                    home: NodeId::new(format!("node-{i}")),
                    state: [
                        SessionState::Live,
                        SessionState::Disconnected,
                        SessionState::Closed,
                    ][i],
                    stamp: Stamp {
                        time: i as u64,
                        origin: 3,
                    },
                })
                .collect(),
        };
        let writes = vec![
            Write::Register {
                service: service(1),
                instance: spec("10.1.0.1", None),
                session: SessionId(99),
            },
            Write::Deregister {
                service: service(1),
                instance: InstanceKey {
                    cluster: "DEFAULT".into(),
                    ip: "10.1.0.1".into(),
                    port: 9000,
                },
            },
            Write::Register {
                service: service(2),
                instance: spec("10.1.0.2", Some(ttl)),
                session: SessionId(0),
            },
        ];
        let meta = Arc::new(Op::Meta(MetaOp {
            service: service(4),
            stamp: Stamp { time: 1, origin: 2 },
            meta: ServiceMeta::default(),
        }));
        vec![
            (PeerMsg::Batch(batch.clone()), true),
            (
                PeerMsg::Batch(Batch {
                    ops: vec![],
                    sessions: vec![],
                }),
                true,
            ),
            (
                PeerMsg::ForwardMany {
                    id: 12,
                    writes: WriteRuns::one(Arc::new(writes.clone())),
                    sent_ms: 1_700_000_000_123,
                },
                true,
            ),
            (
                PeerMsg::ForwardManyReply {
                    id: 12,
                    outcomes: vec![
                        ForwardOutcome::Applied { revision: 1 },
                        ForwardOutcome::Applied { revision: 1 << 50 },
                    ],
                },
                true,
            ),
            // Left to serde: a settings operation, other writes, a refusal, other messages.
            (
                PeerMsg::Batch(Batch {
                    ops: vec![batch.ops[0].clone(), meta],
                    sessions: vec![],
                }),
                false,
            ),
            (
                PeerMsg::ForwardMany {
                    id: 1,
                    writes: WriteRuns::one(Arc::new(vec![Write::Beat {
                        service: service(1),
                        instance: InstanceKey {
                            cluster: "DEFAULT".into(),
                            ip: "10.1.0.1".into(),
                            port: 9000,
                        },
                    }])),
                    sent_ms: 0,
                },
                false,
            ),
            (
                PeerMsg::ForwardManyReply {
                    id: 3,
                    outcomes: vec![ForwardOutcome::Rejected {
                        code: "invalid".into(),
                        message: "no".into(),
                    }],
                },
                false,
            ),
            (
                PeerMsg::Forward {
                    id: 4,
                    write: writes[0].clone(),
                    sent_ms: 5,
                },
                false,
            ),
            (
                PeerMsg::Ping(Ping {
                    version: 1,
                    addr: "127.0.0.1:7400".into(),
                    ready: true,
                    members: vec![],
                }),
                false,
            ),
            (
                PeerMsg::Ack(Ack {
                    version: 1,
                    ready: false,
                }),
                false,
            ),
        ]
    }

    /// Both decodings of `body`: equal values, or both refused.
    fn agree(body: &[u8], keys: &mut ServiceKeyCache) -> Option<PeerMsg> {
        let generic = shoal_proto::decode::<PeerMsg>(body);
        let fast = decode_peer_msg(body, keys);
        match (&generic, &fast) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "body {body:02x?}"),
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
            _ => panic!("generic {generic:?}, fast {fast:?}, body {body:02x?}"),
        }
        fast.ok()
    }

    #[test]
    fn every_message_decodes_as_serde_decodes_it() {
        let mut keys = keys();
        for (msg, fast) in messages() {
            let compact = rmp_serde::to_vec(&msg).unwrap();
            assert_eq!(agree(&compact, &mut keys), Some(msg.clone()));
            assert_eq!(
                peer_msg(&compact, &mut keys).is_some(),
                fast,
                "fast path for {msg:?}"
            );
            // With field names (a peer of another shape): always serde's.
            let named = rmp_serde::to_vec_named(&msg).unwrap();
            assert_eq!(agree(&named, &mut keys), Some(msg.clone()));
            assert!(peer_msg(&named, &mut keys).is_none());
        }
    }

    #[test]
    fn damaged_messages_decode_as_serde_decodes_them() {
        let seed = match std::env::var("SHOAL_TEST_SEED") {
            Ok(s) => s.parse().expect("SHOAL_TEST_SEED must be a u64"),
            Err(_) => rand::random(),
        };
        println!("damaged_messages_decode_as_serde_decodes_them: SHOAL_TEST_SEED={seed}");
        let mut rng = StdRng::seed_from_u64(seed);
        let bodies: Vec<Vec<u8>> = messages()
            .iter()
            .map(|(m, _)| rmp_serde::to_vec(m).unwrap())
            .collect();
        let mut keys = keys();
        // Every cut short.
        for body in &bodies {
            for len in 0..body.len() {
                agree(&body[..len], &mut keys);
            }
        }
        // Random damage: bytes changed, added and removed, lengths and markers
        // included; trailing bytes.
        for _ in 0..20_000 {
            let mut body = bodies[rng.random_range(0..bodies.len())].clone();
            for _ in 0..rng.random_range(1..=3) {
                let at = rng.random_range(0..body.len());
                match rng.random_range(0..4) {
                    0 => body[at] = rng.random(),
                    1 => body[at] ^= 1 << rng.random_range(0..8),
                    2 => body.insert(at, rng.random()),
                    _ => {
                        body.remove(at);
                    }
                }
                if body.is_empty() {
                    break;
                }
            }
            agree(&body, &mut keys);
        }
    }

    #[test]
    fn a_link_shares_the_keys_it_read_and_holds_at_most_its_cap() {
        let mut keys = ServiceKeyCache::new(2);
        let batch = |svc: &[usize]| {
            let msg = PeerMsg::Batch(Batch {
                ops: svc.iter().map(|&s| op(s, None, None, false)).collect(),
                sessions: vec![],
            });
            rmp_serde::to_vec(&msg).unwrap()
        };
        let services = |msg: PeerMsg| match msg {
            PeerMsg::Batch(b) => b
                .ops
                .iter()
                .map(|o| o.service().clone())
                .collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        };
        let first = services(decode_peer_msg(&batch(&[1, 1]), &mut keys).unwrap());
        let again = services(decode_peer_msg(&batch(&[1]), &mut keys).unwrap());
        assert_eq!(keys.len(), 1);
        assert!(ServiceKey::ptr_eq(&first[0], &first[1]));
        assert!(ServiceKey::ptr_eq(&first[0], &again[0]));
        decode_peer_msg(&batch(&[2, 3, 4]), &mut keys).unwrap();
        assert!(keys.len() <= 2, "{}", keys.len());
    }
}
