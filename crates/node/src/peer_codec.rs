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
    instance_key, instance_spec, metadata, option, put_array_len, put_bool, put_f64,
    put_instance_key, put_instance_spec, put_metadata, put_option, put_service_key, put_session_id,
    put_str, put_ttl_lease, put_uint, put_variant, session_id, Reader, ServiceKeyCache,
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

/// Appends a peer message as one frame with structs as arrays: the bytes of
/// `shoal_proto::append_frame_compact(out, msg, max)`. The messages every write makes
/// (batches of instance operations, forwarded registrations and deregistrations, their
/// answers) are written by hand, in the shapes the readers above take; anything else
/// by serde. An owner writes each batch once per peer, and serde's generic encoding
/// took about as many instructions per operation as the decoding did.
pub fn append_peer_msg(out: &mut Vec<u8>, msg: &PeerMsg, max: usize) -> Result<(), FrameError> {
    if !by_hand(msg) {
        return shoal_proto::append_frame_compact(out, msg, max);
    }
    shoal_proto::append_frame_with(out, max, |out| {
        put_peer_msg(out, msg);
        Ok(())
    })
}

/// Whether [`put_peer_msg`] writes `msg`.
fn by_hand(msg: &PeerMsg) -> bool {
    match msg {
        PeerMsg::Batch(b) => b.ops.iter().all(|op| matches!(**op, Op::Instance(_))),
        PeerMsg::ForwardMany { writes, .. } => writes
            .0
            .iter()
            .flat_map(|run| run.iter())
            .all(|w| matches!(w, Write::Register { .. } | Write::Deregister { .. })),
        PeerMsg::ForwardManyReply { outcomes, .. } => outcomes
            .iter()
            .all(|o| matches!(o, ForwardOutcome::Applied { .. })),
        _ => false,
    }
}

/// Writes a message [`by_hand`] takes.
fn put_peer_msg(out: &mut Vec<u8>, msg: &PeerMsg) {
    match msg {
        PeerMsg::Batch(b) => {
            put_variant(out, "Batch");
            put_array_len(out, 2);
            put_array_len(out, b.ops.len());
            for op in &b.ops {
                if let Op::Instance(op) = &**op {
                    put_instance_op(out, op);
                }
            }
            put_array_len(out, b.sessions.len());
            for a in &b.sessions {
                put_announce(out, a);
            }
        }
        PeerMsg::ForwardMany {
            id,
            writes,
            sent_ms,
        } => {
            put_variant(out, "ForwardMany");
            put_array_len(out, 3);
            put_uint(out, *id);
            put_array_len(out, writes.len());
            for w in writes.0.iter().flat_map(|run| run.iter()) {
                put_write(out, w);
            }
            put_uint(out, *sent_ms);
        }
        PeerMsg::ForwardManyReply { id, outcomes } => {
            put_variant(out, "ForwardManyReply");
            put_array_len(out, 2);
            put_uint(out, *id);
            put_array_len(out, outcomes.len());
            for o in outcomes {
                if let ForwardOutcome::Applied { revision } = o {
                    put_variant(out, "Applied");
                    put_array_len(out, 1);
                    put_uint(out, *revision);
                }
            }
        }
        _ => {}
    }
}

/// `{"Instance": [service, key, stamp, state, lapsed, reaped]}`.
fn put_instance_op(out: &mut Vec<u8>, op: &InstanceOp) {
    put_variant(out, "Instance");
    put_array_len(out, 6);
    put_service_key(out, &op.service);
    put_instance_key(out, &op.key);
    put_stamp(out, op.stamp);
    put_option(out, op.state.as_ref(), put_instance);
    put_option(out, op.lapsed.as_ref(), |out, v| put_bool(out, *v));
    put_bool(out, op.reaped);
}

/// `[time, origin]`.
fn put_stamp(out: &mut Vec<u8>, stamp: Stamp) {
    put_array_len(out, 2);
    put_uint(out, stamp.time);
    put_uint(out, stamp.origin);
}

/// `[ip, port, cluster, weight, healthy, enabled, metadata, lease, last_beat_ms,
/// stamp]`.
fn put_instance(out: &mut Vec<u8>, i: &Instance) {
    put_array_len(out, 10);
    put_str(out, &i.ip);
    put_uint(out, u64::from(i.port));
    put_str(out, &i.cluster);
    put_f64(out, i.weight);
    put_bool(out, i.healthy);
    put_bool(out, i.enabled);
    put_metadata(out, &i.metadata);
    match &i.lease {
        Lease::Session(id) => {
            put_variant(out, "Session");
            put_session_id(out, *id);
        }
        Lease::Ttl(ttl) => {
            put_variant(out, "Ttl");
            put_ttl_lease(out, ttl);
        }
    }
    put_uint(out, i.last_beat_ms);
    put_uint(out, i.stamp);
}

/// `[session, home, state, stamp]`, the state by name.
fn put_announce(out: &mut Vec<u8>, a: &SessionAnnounce) {
    put_array_len(out, 4);
    put_session_id(out, a.session);
    put_str(out, a.home.as_str());
    put_str(
        out,
        match a.state {
            SessionState::Live => "Live",
            SessionState::Disconnected => "Disconnected",
            SessionState::Closed => "Closed",
        },
    );
    put_stamp(out, a.stamp);
}

/// `{"Register": [service, instance, session]}` or `{"Deregister": [service,
/// instance]}` (the writes [`by_hand`] takes).
fn put_write(out: &mut Vec<u8>, w: &Write) {
    match w {
        Write::Register {
            service,
            instance,
            session,
        } => {
            put_variant(out, "Register");
            put_array_len(out, 3);
            put_service_key(out, service);
            put_instance_spec(out, instance);
            put_session_id(out, *session);
        }
        Write::Deregister { service, instance } => {
            put_variant(out, "Deregister");
            put_array_len(out, 2);
            put_service_key(out, service);
            put_instance_key(out, instance);
        }
        _ => {}
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
    fn hand_written_messages_are_serde_s_bytes() {
        let max = 1 << 20;
        let mut msgs = messages();
        // Forwards in several runs are one sequence on the wire.
        let run = |svc: usize| {
            Arc::new(vec![Write::Register {
                service: service(svc),
                instance: spec(&format!("10.2.0.{svc}"), None),
                session: SessionId(1 << 100),
            }])
        };
        msgs.push((
            PeerMsg::ForwardMany {
                id: u64::MAX,
                writes: WriteRuns(vec![run(1), run(2), Arc::new(vec![]), run(3)]),
                sent_ms: 0,
            },
            true,
        ));
        // Long batches (array lengths past 15) and long names.
        let long = "n".repeat(300);
        msgs.push((
            PeerMsg::Batch(Batch {
                ops: (0..40)
                    .map(|i| {
                        let mut inst = instance("10.0.0.9", Lease::Session(SessionId(i)));
                        inst.cluster = long[..(i as usize * 7)].to_string();
                        inst.port = [1, 127, 128, 255, 256, 65_535][i as usize % 6];
                        op(i as usize, Some(inst), None, i % 2 == 0)
                    })
                    .collect(),
                sessions: vec![],
            }),
            true,
        ));
        for (msg, fast) in msgs {
            let mut want = vec![1, 2, 3];
            shoal_proto::append_frame_compact(&mut want, &msg, max).unwrap();
            let mut got = vec![1, 2, 3];
            append_peer_msg(&mut got, &msg, max).unwrap();
            assert_eq!(got, want, "{msg:?}");
            assert_eq!(by_hand(&msg), fast, "{msg:?}");
        }
        // Over the limit: refused, nothing appended.
        let (msg, _) = messages().swap_remove(0);
        let mut got = vec![1];
        assert!(append_peer_msg(&mut got, &msg, 10).is_err());
        assert_eq!(got, [1]);
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
