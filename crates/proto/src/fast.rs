//! A hand-written decoder for the frames a client receives most: `View` answers and
//! `Push` frames, whose instances are arrays (see [`crate::compact`]), and the
//! `Applied` answers to writes; and one for the frames a node receives most, a client's
//! registrations and deregistrations in arrays ([`decode_client_frame`], which follows
//! the same rule: exactly this version's shape, anything else to serde).
//!
//! It reads the MessagePack bytes directly: each string is checked as UTF-8 once and
//! copied once into the `String` it becomes, and no field goes through serde's generic
//! machinery. It only takes the exact shapes nodes write (maps with the known keys,
//! instances as arrays of at least ten fields, appended fields skipped, unknown keys of
//! the view skipped; weights as integers or floats, leases by variant index or name, a
//! Ttl lease as an array or a map: the current rows and the previous ones). Anything
//! else, malformed or merely unusual (instances as maps, an error answer, another
//! frame), makes it give up, and [`decode_server_frame`] decodes the frame with the
//! generic serde decoding instead, which gives the same value or the same error as
//! before. So it never accepts what the generic decoding refuses, and never refuses
//! what it accepts.

use shoal_storage::{
    Instance, InstanceKey, InstanceSpec, Lease, ServiceKey, ServiceView, SessionId, TtlLease,
};

use crate::frame::{append_frame_with, decode, new_frame, put_response_head, FrameError};
use crate::messages::{ClientFrame, ClientFrameRef, Request, RequestId, Response, ServerFrame};
use crate::mpack::{self, instance_key, instance_spec, metadata, Reader as Cur, ServiceKeyCache};

/// Fields of an instance in the array form (the ones this version knows).
const INSTANCE_FIELDS: usize = 10;

/// Decodes a frame body sent by a node. `View` answers and pushes take the fast path;
/// every other frame, and any body the fast path does not take, is decoded by serde
/// ([`decode`]): the result is the same as `decode::<ServerFrame>(body)`.
pub fn decode_server_frame(body: &[u8]) -> Result<ServerFrame, FrameError> {
    match server_frame(body) {
        Some(frame) => Ok(frame),
        None => decode(body),
    }
}

/// Decodes a frame body sent by a client. Registrations and deregistrations sent with
/// structs as arrays (what a client of this request shape sends, see
/// [`crate::REQUEST_SHAPE`]) take the fast path; every other frame, and any body the
/// fast path does not take, is decoded by serde ([`decode`]): the result is the same as
/// `decode::<ClientFrame>(body)`. `keys` are service keys read before (a node keeps
/// one set for all its clients: they write to the same services again and again).
pub fn decode_client_frame(
    body: &[u8],
    keys: &mut ServiceKeyCache,
) -> Result<ClientFrame, FrameError> {
    match client_frame(body, keys) {
        Some(frame) => Ok(frame),
        None => decode(body),
    }
}

/// The fast path of [`decode_client_frame`]: `{"Request": [id, {"Register": [service,
/// instance]}]}` or the same with `"Deregister"`; `None` for anything else.
fn client_frame(body: &[u8], keys: &mut ServiceKeyCache) -> Option<ClientFrame> {
    let mut c = Cur::new(body);
    if c.map_len()? != 1 || c.key()? != b"Request" || c.array_len()? != 2 {
        return None;
    }
    let id = c.uint()?;
    if c.map_len()? != 1 {
        return None;
    }
    let request = match c.key()? {
        b"Register" => {
            if c.array_len()? != 2 {
                return None;
            }
            Request::Register {
                service: keys.read(&mut c)?,
                instance: instance_spec(&mut c)?,
            }
        }
        b"Deregister" => {
            if c.array_len()? != 2 {
                return None;
            }
            Request::Deregister {
                service: keys.read(&mut c)?,
                instance: instance_key(&mut c)?,
            }
        }
        _ => return None,
    };
    c.at_end()
        .then_some(ClientFrame::Request { id, body: request })
}

/// A registration or a deregistration by reference: what [`encode_write_compact`]
/// encodes without the request being built (a client that keeps its own copy of the
/// instance sends it from there).
#[derive(Clone, Copy, Debug)]
pub enum WriteRef<'a> {
    /// [`Request::Register`].
    Register {
        /// The service.
        service: &'a ServiceKey,
        /// The instance registered.
        instance: &'a InstanceSpec,
    },
    /// [`Request::Deregister`].
    Deregister {
        /// The service.
        service: &'a ServiceKey,
        /// The instance removed.
        instance: &'a InstanceKey,
    },
}

impl WriteRef<'_> {
    /// The request it stands for, copied.
    pub fn to_request(self) -> Request {
        match self {
            WriteRef::Register { service, instance } => Request::Register {
                service: service.clone(),
                instance: instance.clone(),
            },
            WriteRef::Deregister { service, instance } => Request::Deregister {
                service: service.clone(),
                instance: instance.clone(),
            },
        }
    }
}

/// Encodes `ClientFrame::Request { id, body }` with structs as arrays: the bytes of
/// [`crate::encode_frame_compact`] for the same frame. Registrations and
/// deregistrations, the requests a client sends most, are written by hand
/// ([`encode_write_compact`]); every other request by serde.
pub fn encode_request_compact(
    id: RequestId,
    body: &Request,
    max: usize,
) -> Result<Vec<u8>, FrameError> {
    let write = match body {
        Request::Register { service, instance } => WriteRef::Register { service, instance },
        Request::Deregister { service, instance } => WriteRef::Deregister { service, instance },
        _ => return crate::encode_frame_compact(&ClientFrameRef::Request { id, body }, max),
    };
    encode_write_compact(id, write, max)
}

/// Encodes the request `write` stands for as [`encode_request_compact`] does, by hand.
pub fn encode_write_compact(
    id: RequestId,
    write: WriteRef<'_>,
    max: usize,
) -> Result<Vec<u8>, FrameError> {
    let (name, service) = match write {
        WriteRef::Register { service, .. } => ("Register", service),
        WriteRef::Deregister { service, .. } => ("Deregister", service),
    };
    new_frame(|out| {
        append_frame_with(out, max, |out| {
            // {"Request": [id, {name: [service, instance]}]}
            mpack::put_variant(out, "Request");
            mpack::put_array_len(out, 2);
            mpack::put_uint(out, id);
            mpack::put_variant(out, name);
            mpack::put_array_len(out, 2);
            mpack::put_service_key(out, service);
            match write {
                WriteRef::Register { instance, .. } => mpack::put_instance_spec(out, instance),
                WriteRef::Deregister { instance, .. } => mpack::put_instance_key(out, instance),
            }
            Ok(())
        })
    })
}

/// Appends the frame `ServerFrame::Response { id, result: Ok(Response::Applied {
/// revision }) }`, the answer to every write, as [`crate::append_frame`] writes it
/// (with field names): the same bytes, written by hand.
pub fn append_applied_answer(
    out: &mut Vec<u8>,
    id: RequestId,
    revision: u64,
    max: usize,
) -> Result<(), FrameError> {
    append_frame_with(out, max, |out| {
        // {"Response": {"id": id, "result": {"Ok": {"Applied": {"revision": n}}}}}
        put_response_head(out, id);
        mpack::put_variant(out, "Ok");
        mpack::put_variant(out, "Applied");
        mpack::put_map_len(out, 1);
        mpack::put_str(out, "revision");
        mpack::put_uint(out, revision);
        Ok(())
    })
}

/// The fast path: `None` when the body is not of the shape it takes.
fn server_frame(body: &[u8]) -> Option<ServerFrame> {
    let mut c = Cur::new(body);
    if c.map_len()? != 1 {
        return None;
    }
    let frame = match c.key()? {
        b"Response" => {
            let (mut id, mut answer) = (None, None);
            for _ in 0..c.map_len()? {
                match c.key()? {
                    b"id" if id.is_none() => id = Some(c.uint()?),
                    b"result" if answer.is_none() => {
                        // Ok(View(view)): {"Ok": {"View": view}}, or
                        // Ok(Applied{revision}): {"Ok": {"Applied": {"revision": n}}}.
                        if c.map_len()? != 1 || c.key()? != b"Ok" {
                            return None;
                        }
                        if c.map_len()? != 1 {
                            return None;
                        }
                        answer = Some(match c.key()? {
                            b"View" => Response::View(service_view(&mut c)?),
                            b"Applied" => {
                                if c.map_len()? != 1 || c.key()? != b"revision" {
                                    return None;
                                }
                                Response::Applied {
                                    revision: c.uint()?,
                                }
                            }
                            _ => return None,
                        });
                    }
                    _ => return None,
                }
            }
            ServerFrame::Response {
                id: id?,
                result: Ok(answer?),
            }
        }
        b"Push" => ServerFrame::Push(service_view(&mut c)?),
        _ => return None,
    };
    // Whatever follows is the generic decoding's business.
    c.at_end().then_some(frame)
}

fn service_view(c: &mut Cur<'_>) -> Option<ServiceView> {
    let (mut key, mut revision, mut instances, mut protected) = (None, None, None, None);
    // As the serde decoding of the view: the last of repeated keys wins, unknown keys
    // are skipped.
    for _ in 0..c.map_len()? {
        match c.key()? {
            b"key" => key = Some(service_key(c)?),
            b"revision" => revision = Some(c.uint()?),
            b"instances" => instances = Some(rows(c)?),
            b"protected" => protected = Some(c.bool()?),
            other => {
                // Unknown keys are still names: UTF-8.
                std::str::from_utf8(other).ok()?;
                c.skip()?;
            }
        }
    }
    Some(ServiceView {
        key: key?,
        revision: revision?,
        instances: instances?,
        protected: protected?,
    })
}

fn service_key(c: &mut Cur<'_>) -> Option<ServiceKey> {
    let (mut namespace, mut group, mut service) = (None, None, None);
    for _ in 0..c.map_len()? {
        let slot = match c.key()? {
            b"namespace" => &mut namespace,
            b"group" => &mut group,
            b"service" => &mut service,
            _ => return None,
        };
        if slot.is_some() {
            return None;
        }
        *slot = Some(c.string()?);
    }
    Some(ServiceKey::new(namespace?, group?, service?))
}

fn rows(c: &mut Cur<'_>) -> Option<Vec<Instance>> {
    let mut cluster = "";
    c.seq(|c| row(c, &mut cluster))
}

/// One instance. `cluster` is the previous row's cluster: most rows repeat it, and
/// its bytes need no second UTF-8 check.
fn row<'a>(c: &mut Cur<'a>, cluster: &mut &'a str) -> Option<Instance> {
    let fields = c.array_len()?;
    if fields < INSTANCE_FIELDS {
        return None;
    }
    let inst = Instance {
        ip: c.string()?,
        port: u16::try_from(c.uint()?).ok()?,
        cluster: {
            let b = c.key()?;
            if b != cluster.as_bytes() {
                *cluster = std::str::from_utf8(b).ok()?;
            }
            String::from(*cluster)
        },
        weight: c.number()?,
        healthy: c.bool()?,
        enabled: c.bool()?,
        metadata: metadata(c)?,
        lease: lease(c)?,
        last_beat_ms: c.uint()?,
        stamp: c.uint()?,
    };
    // Fields a newer version appended.
    for _ in INSTANCE_FIELDS..fields {
        c.skip()?;
    }
    Some(inst)
}

fn lease(c: &mut Cur<'_>) -> Option<Lease> {
    // An enum: {variant: content}, the variant by index (what nodes write now) or by
    // name (what they wrote before): {0: id} or {"Session": id}, {1: [unhealthy,
    // remove]} or {"Ttl": {"unhealthy_after_ms": .., "remove_after_ms": ..}}.
    if c.map_len()? != 1 {
        return None;
    }
    let session = match c.peek()? {
        0x00..=0x7f | 0xcc..=0xcf => match c.uint()? {
            0 => true,
            1 => false,
            _ => return None,
        },
        _ => match c.key()? {
            b"Session" => true,
            b"Ttl" => false,
            _ => return None,
        },
    };
    if session {
        return Some(Lease::Session(SessionId(c.u128()?)));
    }
    let (unhealthy, remove) = match c.peek()? {
        0x90..=0x9f | 0xdc | 0xdd => {
            // Exactly the two fields; anything else is left to the generic decoding.
            if c.array_len()? != 2 {
                return None;
            }
            (c.uint()?, c.uint()?)
        }
        _ => {
            let (mut unhealthy, mut remove) = (None, None);
            for _ in 0..c.map_len()? {
                let slot = match c.key()? {
                    b"unhealthy_after_ms" => &mut unhealthy,
                    b"remove_after_ms" => &mut remove,
                    _ => return None,
                };
                if slot.is_some() {
                    return None;
                }
                *slot = Some(c.uint()?);
            }
            (unhealthy?, remove?)
        }
    };
    Some(Lease::Ttl(TtlLease {
        unhealthy_after_ms: unhealthy,
        remove_after_ms: remove,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mpack::EDGE_UINTS;
    use crate::{
        append_response_frame, encode_frame, encode_result, ErrorBody, ErrorCode,
        DEFAULT_MAX_FRAME_BYTES,
    };
    use std::collections::BTreeMap;

    fn keys() -> ServiceKeyCache {
        ServiceKeyCache::new(64)
    }

    fn inst(ip: &str, lease: Lease, meta: &[(&str, &str)]) -> Instance {
        Instance {
            ip: ip.into(),
            port: 8080,
            cluster: "DEFAULT".into(),
            weight: 2.5,
            healthy: true,
            enabled: false,
            metadata: meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            lease,
            last_beat_ms: 1_700_000_000_000,
            stamp: 41,
        }
    }

    fn view(n: usize) -> ServiceView {
        let leases = [
            Lease::Session(SessionId(0)),
            Lease::Session(SessionId(u128::MAX - 3)),
            Lease::Ttl(TtlLease::default()),
        ];
        ServiceView {
            key: ServiceKey::new("ns", "g", "orders"),
            revision: 1 << 40,
            instances: (0..n)
                .map(|i| {
                    let meta: &[(&str, &str)] = if i % 2 == 0 {
                        &[]
                    } else {
                        &[("seq", "7"), ("zone", "é")]
                    };
                    let mut x = inst(
                        &format!("10.0.{}.{}", i / 256, i % 256),
                        leases[i % 3].clone(),
                        meta,
                    );
                    x.port = 1 + (i % 60_000) as u16;
                    x.stamp = i as u64 * 1_000;
                    x.healthy = i % 5 != 0;
                    x.weight = [1.0, 2.5, 0.1, 10_000.0, 0.0, 300.0][i % 6];
                    x.last_beat_ms = 1_700_000_000_000 + i as u64;
                    if i % 4 == 3 {
                        x.cluster = "eu-é".into();
                    }
                    x
                })
                .collect(),
            protected: true,
        }
    }

    fn frames() -> Vec<ServerFrame> {
        let mut out = Vec::new();
        for n in [0, 1, 3, 16, 140, 70_000] {
            out.push(ServerFrame::Push(view(n)));
            for id in [0, 127, 128, 70_000, u64::MAX] {
                out.push(ServerFrame::Response {
                    id,
                    result: Ok(Response::View(view(n.min(20)))),
                });
            }
        }
        out
    }

    /// `frame` as a client reads it (see [`crate::compact`]).
    fn as_clients_see(frame: &ServerFrame) -> ServerFrame {
        match frame {
            ServerFrame::Push(v) => ServerFrame::Push(crate::compact::as_clients_see(v)),
            ServerFrame::Response {
                id,
                result: Ok(Response::View(v)),
            } => ServerFrame::Response {
                id: *id,
                result: Ok(Response::View(crate::compact::as_clients_see(v))),
            },
            other => other.clone(),
        }
    }

    #[test]
    fn answers_and_pushes_take_the_fast_path_and_equal_serde() {
        for frame in frames() {
            let bytes = encode_frame(&frame, 64 << 20).unwrap();
            let body = &bytes[4..];
            let seen = as_clients_see(&frame);
            assert_eq!(server_frame(body).as_ref(), Some(&seen));
            assert_eq!(decode_server_frame(body).unwrap(), seen);
            assert_eq!(decode::<ServerFrame>(body).unwrap(), seen);
        }
        // As the node frames a cached answer.
        let result = encode_result(&Ok(Response::View(view(140)))).unwrap();
        let mut buf = Vec::new();
        append_response_frame(&mut buf, 99, &result, DEFAULT_MAX_FRAME_BYTES).unwrap();
        let got = server_frame(&buf[4..]).unwrap();
        assert_eq!(
            got,
            ServerFrame::Response {
                id: 99,
                result: Ok(Response::View(crate::compact::as_clients_see(&view(140))))
            }
        );
    }

    #[test]
    fn previous_rows_take_the_fast_path_in_full() {
        // Leases by name with their session ids, f64 weights, stamps: nodes before
        // the current row form.
        for n in [0, 1, 3, 16, 140] {
            let v = view(n);
            let body = crate::compact::previous::push_body(&v);
            let frame = ServerFrame::Push(v);
            assert_eq!(server_frame(&body).as_ref(), Some(&frame));
            assert_eq!(decode::<ServerFrame>(&body).unwrap(), frame);
        }
    }

    #[test]
    fn leases_in_every_form_are_read_as_serde_reads_them() {
        // {variant: content} with the variant by index or name, the Ttl lease as an
        // array or a map, well-formed or not: the fast path gives serde's result or
        // leaves the lease to it.
        let forms: &[&[u8]] = &[
            &[0x81, 0x00, 0x00],
            &[0x81, 0x00, 0x2a],
            &[0x81, 0xcc, 0x00, 0xcd, 0x01, 0x00],
            &[0x81, 0x01, 0x92, 0x01, 0x02],
            &[0x81, 0x01, 0x92, 0xcd, 0x3a, 0x98, 0xcd, 0x75, 0x30],
            &[0x81, 0x01, 0x91, 0x01],
            &[0x81, 0x01, 0x93, 0x01, 0x02, 0x03],
            &[0x81, 0x01, 0x82, 0x00, 0x01, 0x01, 0x02],
            &[0x81, 0x02, 0x00],
            &[0x81, 0xff, 0x00],
            &[0x81, 0x00, 0xc0],
            &[0x81, 0x00, 0xc4, 0x02, 0x00, 0x01],
            &[0x81, 0xa3, b'T', b't', b'l', 0x92, 0x05, 0x06],
            &[0x81, 0xa7, b'S', b'e', b's', b's', b'i', b'o', b'n', 0x07],
            &[0x82, 0x00, 0x00, 0x01, 0x92, 0x01, 0x02],
            &[0x00],
            &[0xc0],
            &[0x91, 0x00],
        ];
        let mut fast_taken = 0;
        for lease_bytes in forms {
            // A push with one row whose lease is `lease_bytes`.
            let mut body = vec![0x81, 0xa4, b'P', b'u', b's', b'h', 0x84];
            body.extend_from_slice(&rmp_serde::to_vec_named(&"key").unwrap());
            body.extend_from_slice(&rmp_serde::to_vec_named(&ServiceKey::named("a")).unwrap());
            body.extend_from_slice(&rmp_serde::to_vec_named(&"revision").unwrap());
            body.push(0x01);
            body.extend_from_slice(&rmp_serde::to_vec_named(&"instances").unwrap());
            body.extend_from_slice(&[0x91, 0x9a, 0xa1, b'a', 0x01, 0xa1, b'c', 0x01, 0xc3]);
            body.extend_from_slice(&[0xc3, 0x80]);
            body.extend_from_slice(lease_bytes);
            body.extend_from_slice(&[0x00, 0x00]);
            body.extend_from_slice(&rmp_serde::to_vec_named(&"protected").unwrap());
            body.push(0xc2);
            let fast = server_frame(&body);
            fast_taken += usize::from(fast.is_some());
            let slow = decode::<ServerFrame>(&body);
            match (&fast, &slow) {
                (Some(a), Ok(b)) => assert_eq!(a, b, "{lease_bytes:x?}"),
                (None, _) => {}
                (Some(a), Err(e)) => panic!("{lease_bytes:x?}: fast {a:?}, serde {e}"),
            }
            match (decode_server_frame(&body), slow) {
                (Ok(a), Ok(b)) => assert_eq!(a, b),
                (Err(_), Err(_)) => {}
                (a, b) => panic!("{lease_bytes:x?}: fast {a:?}, serde {b:?}"),
            }
        }
        // The well-formed ones: {0: 0}, {0: 42}, {0: 256} as a wider int, {1: [..]}
        // twice, {"Ttl": [..]} and {"Session": 7}.
        assert_eq!(fast_taken, 7);
        // The current forms do take the fast path.
        for (lease_bytes, lease) in [
            (&[0x81, 0x00, 0x00][..], Lease::Session(SessionId(0))),
            (
                &[0x81, 0x01, 0x92, 0x01, 0x02][..],
                Lease::Ttl(TtlLease {
                    unhealthy_after_ms: 1,
                    remove_after_ms: 2,
                }),
            ),
        ] {
            let mut c = Cur::new(lease_bytes);
            assert_eq!(super::lease(&mut c), Some(lease));
            assert_eq!(c.left(), 0);
        }
    }

    #[test]
    fn other_frames_go_through_serde() {
        let others = [
            ServerFrame::Response {
                id: 1,
                result: Ok(Response::Done),
            },
            ServerFrame::Response {
                id: 2,
                result: Err(ErrorBody::new(ErrorCode::NotFound, "nope")),
            },
            ServerFrame::Response {
                id: 3,
                result: Ok(Response::AppliedMany(vec![Ok(4)])),
            },
            ServerFrame::Error(ErrorBody::new(ErrorCode::MalformedFrame, "x")),
        ];
        for frame in others {
            let bytes = encode_frame(&frame, DEFAULT_MAX_FRAME_BYTES).unwrap();
            assert!(server_frame(&bytes[4..]).is_none());
            assert_eq!(decode_server_frame(&bytes[4..]).unwrap(), frame);
        }
    }

    #[test]
    fn applied_answers_take_the_fast_path_and_equal_serde() {
        for (id, revision) in [(0, 0), (1, 4), (300, 70_000), (u64::MAX, u64::MAX)] {
            let frame = ServerFrame::Response {
                id,
                result: Ok(Response::Applied { revision }),
            };
            let bytes = encode_frame(&frame, DEFAULT_MAX_FRAME_BYTES).unwrap();
            assert_eq!(server_frame(&bytes[4..]).as_ref(), Some(&frame));
            assert_eq!(decode::<ServerFrame>(&bytes[4..]).unwrap(), frame);
            // As the node frames a write's answer.
            let result = encode_result(&Ok(Response::Applied { revision })).unwrap();
            let mut buf = Vec::new();
            append_response_frame(&mut buf, id, &result, DEFAULT_MAX_FRAME_BYTES).unwrap();
            assert_eq!(server_frame(&buf[4..]).as_ref(), Some(&frame));
            mutated_bodies_agree_with_serde(&buf[4..]);
        }
        // Other shapes are serde's: as an array, with an unknown key, a revision that
        // is not an integer.
        #[derive(serde::Serialize)]
        #[serde(rename = "ServerFrame")]
        enum Odd<R> {
            Response { id: u64, result: Result<R, ()> },
        }
        #[derive(serde::Serialize)]
        enum Applied<T> {
            Applied(T),
        }
        #[derive(serde::Serialize)]
        struct Two {
            revision: u64,
            extra: u8,
        }
        #[derive(serde::Serialize)]
        struct Text {
            revision: &'static str,
        }
        let compact = rmp_serde::to_vec(&ServerFrame::Response {
            id: 5,
            result: Ok(Response::Applied { revision: 6 }),
        })
        .unwrap();
        let extra = rmp_serde::to_vec_named(&Odd::Response {
            id: 5,
            result: Ok(Applied::Applied(Two {
                revision: 6,
                extra: 1,
            })),
        })
        .unwrap();
        let text = rmp_serde::to_vec_named(&Odd::Response {
            id: 5,
            result: Ok(Applied::Applied(Text { revision: "6" })),
        })
        .unwrap();
        for body in [&compact, &extra, &text] {
            assert!(server_frame(body).is_none());
            let fast = decode_server_frame(body).map_err(|e| e.to_string());
            let slow = decode::<ServerFrame>(body).map_err(|e| e.to_string());
            assert_eq!(fast, slow);
        }
    }

    #[test]
    fn instances_as_maps_are_read() {
        #[derive(serde::Serialize)]
        enum Plain {
            Push(ServiceView),
        }
        let v = view(5);
        let named = rmp_serde::to_vec_named(&Plain::Push(v.clone())).unwrap();
        assert!(server_frame(&named).is_none());
        assert_eq!(decode_server_frame(&named).unwrap(), ServerFrame::Push(v));
    }

    #[test]
    fn appended_fields_are_skipped_on_the_fast_path() {
        // Rows of 10 known fields plus values of every kind, and a view with an
        // unknown key: a newer node.
        type Row = (
            &'static str,
            u16,
            &'static str,
            f64,
            bool,
            bool,
            BTreeMap<String, String>,
            Lease,
            u64,
            u64,
            Extra,
        );
        #[derive(serde::Serialize)]
        struct Extra {
            s: String,
            n: i64,
            f: f32,
            list: Vec<Option<u32>>,
            #[serde(with = "serde_bytes_like")]
            bytes: Vec<u8>,
            nested: BTreeMap<String, Vec<BTreeMap<String, u64>>>,
        }
        mod serde_bytes_like {
            pub fn serialize<S: serde::Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(b)
            }
        }
        #[derive(serde::Serialize)]
        struct ViewV2 {
            zone: Vec<String>,
            key: ServiceKey,
            revision: u64,
            instances: Vec<Row>,
            protected: bool,
            later: (i8, String),
        }
        #[derive(serde::Serialize)]
        enum Frame {
            Push(ViewV2),
        }
        let extra = || Extra {
            s: "x".repeat(300),
            n: -70_000,
            f: 1.5,
            list: vec![None, Some(1), Some(70_000)],
            bytes: vec![1; 70_000],
            nested: [(
                "a".to_string(),
                vec![[("b".to_string(), 1u64 << 40)].into()],
            )]
            .into(),
        };
        let row = |ip| {
            (
                ip,
                80,
                "DEFAULT",
                1.0,
                true,
                true,
                BTreeMap::new(),
                Lease::Session(SessionId(5)),
                7,
                9,
                extra(),
            )
        };
        let bytes = rmp_serde::to_vec_named(&Frame::Push(ViewV2 {
            zone: vec!["z".into()],
            key: ServiceKey::named("a"),
            revision: 1,
            instances: vec![row("10.0.0.1"), row("10.0.0.2")],
            protected: false,
            later: (-1, "y".into()),
        }))
        .unwrap();
        let ServerFrame::Push(v) = server_frame(&bytes).expect("fast path") else {
            panic!("not a push");
        };
        assert_eq!(v.instances.len(), 2);
        assert_eq!(v.instances[1].ip, "10.0.0.2");
        assert_eq!(v.instances[1].lease, Lease::Session(SessionId(5)));
        assert_eq!(v.instances[1].stamp, 9);
        assert_eq!(decode::<ServerFrame>(&bytes).unwrap(), ServerFrame::Push(v));
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        let frame = ServerFrame::Push(view(20));
        let bytes = encode_frame(&frame, DEFAULT_MAX_FRAME_BYTES).unwrap();
        mutated_bodies_agree_with_serde(&bytes[4..]);
        // The previous rows too.
        mutated_bodies_agree_with_serde(&crate::compact::previous::push_body(&view(20)));
    }

    /// Every truncation of `body` is an error; every byte of it changed to a few
    /// values never panics, and what decodes equals serde's result.
    fn mutated_bodies_agree_with_serde(body: &[u8]) {
        // Every truncation.
        for end in 0..body.len() {
            assert!(decode_server_frame(&body[..end]).is_err(), "cut at {end}");
        }
        // Every byte changed to a few values: no panic; what decodes equals serde.
        for i in 0..body.len() {
            for b in [
                0x00, 0x01, 0x02, 0x7f, 0x81, 0x90, 0x92, 0x9f, 0xa1, 0xc0, 0xc1, 0xc4, 0xca, 0xcb,
                0xcf, 0xdd, 0xdf, 0xff,
            ] {
                let mut m = body.to_vec();
                m[i] = b;
                let fast = decode_server_frame(&m);
                let slow = decode::<ServerFrame>(&m);
                match (fast, slow) {
                    (Ok(a), Ok(b)) => assert_eq!(a, b, "byte {i} = {b:?}"),
                    (Err(_), Err(_)) => {}
                    (a, b) => panic!("byte {i}: fast {a:?}, serde {b:?}"),
                }
            }
        }
    }

    /// A registration and a deregistration, as a client of this shape sends them.
    fn client_writes() -> Vec<ClientFrame> {
        let service = ServiceKey::new("prod", "payments", "orders-é");
        let mut spec = shoal_storage::InstanceSpec::new("10.0.0.1", 8080);
        spec.metadata.insert("zone".into(), "a".into());
        let mut ttl = spec.clone();
        ttl.ttl = Some(TtlLease::default());
        ttl.weight = 0.25;
        ttl.ip = "fe80::1".into();
        [
            Request::Register {
                service: service.clone(),
                instance: spec.clone(),
            },
            Request::Register {
                service: service.clone(),
                instance: ttl,
            },
            Request::Deregister {
                service,
                instance: spec.key(),
            },
        ]
        .into_iter()
        .enumerate()
        .map(|(i, body)| ClientFrame::Request {
            id: 1 << (i * 20),
            body,
        })
        .collect()
    }

    #[test]
    fn client_writes_take_the_fast_path_and_equal_serde() {
        for frame in client_writes() {
            let compact = crate::encode_frame_compact(&frame, DEFAULT_MAX_FRAME_BYTES).unwrap();
            let body = &compact[4..];
            assert_eq!(client_frame(body, &mut keys()), Some(frame.clone()));
            assert_eq!(decode::<ClientFrame>(body).unwrap(), frame);
            // With field names (a client of another shape): serde's.
            let named = encode_frame(&frame, DEFAULT_MAX_FRAME_BYTES).unwrap();
            assert_eq!(client_frame(&named[4..], &mut keys()), None);
            assert_eq!(
                decode_client_frame(&named[4..], &mut keys()).unwrap(),
                frame
            );
        }
        // Other requests, and the hello, are serde's.
        for body in [Request::Ping, Request::Members] {
            let frame = ClientFrame::Request { id: 3, body };
            let compact = crate::encode_frame_compact(&frame, DEFAULT_MAX_FRAME_BYTES).unwrap();
            assert_eq!(client_frame(&compact[4..], &mut keys()), None);
            assert_eq!(
                decode_client_frame(&compact[4..], &mut keys()).unwrap(),
                frame
            );
        }
    }

    /// Writes over the edges of every MessagePack form their fields can take: string
    /// lengths around 32, 256 and 65 536, maps past 15 entries, numbers past each width.
    fn varied_client_writes() -> Vec<(RequestId, Request)> {
        let long = |n: usize| "x".repeat(n);
        let mut out = Vec::new();
        let mut id = 0u64;
        for name_len in [1, 31, 32, 255, 256, 65_535, 65_536] {
            let service = ServiceKey::new(long(name_len), "g", "é".repeat(name_len / 2 + 1));
            for port in [1u16, 127, 128, 255, 256, 65_535] {
                let mut spec = shoal_storage::InstanceSpec::new("10.1.2.3", port);
                spec.cluster = long(name_len.min(300));
                spec.weight = [0.0, 1.0, 0.125, 1e300][usize::from(port) % 4];
                spec.healthy = port % 2 == 0;
                spec.enabled = port % 3 == 0;
                let entries = [0usize, 1, 15, 16, 17][usize::from(port) % 5];
                for k in 0..entries {
                    spec.metadata.insert(format!("k{k}"), long(k * 20));
                }
                if port > 200 {
                    spec.ttl = Some(TtlLease {
                        unhealthy_after_ms: u64::from(port) << 20,
                        remove_after_ms: u64::MAX,
                    });
                }
                id += 1;
                out.push((
                    EDGE_UINTS[id as usize % EDGE_UINTS.len()],
                    Request::Register {
                        service: service.clone(),
                        instance: spec.clone(),
                    },
                ));
                out.push((
                    EDGE_UINTS[(id as usize + 3) % EDGE_UINTS.len()],
                    Request::Deregister {
                        service: service.clone(),
                        instance: spec.key(),
                    },
                ));
            }
        }
        out
    }

    #[test]
    fn hand_written_requests_are_serde_s_bytes() {
        let max = 1 << 20;
        for (id, body) in varied_client_writes() {
            let frame = ClientFrameRef::Request { id, body: &body };
            let want = crate::encode_frame_compact(&frame, max).unwrap();
            assert_eq!(encode_request_compact(id, &body, max).unwrap(), want);
            // The same request by reference: the same bytes, the same request back.
            let write = match &body {
                Request::Register { service, instance } => WriteRef::Register { service, instance },
                Request::Deregister { service, instance } => {
                    WriteRef::Deregister { service, instance }
                }
                other => panic!("not a write: {other:?}"),
            };
            assert_eq!(encode_write_compact(id, write, max).unwrap(), want);
            assert_eq!(write.to_request(), body);
            // And the node reads it back, on the fast path.
            let back = client_frame(&want[4..], &mut keys()).expect("fast path");
            assert_eq!(back, ClientFrame::Request { id, body });
        }
        // Too large for the limit: the same error as serde's path.
        let (id, body) = varied_client_writes().pop().unwrap();
        let frame = ClientFrameRef::Request { id, body: &body };
        let len = crate::encode_frame_compact(&frame, max).unwrap().len() - 4;
        let want = crate::encode_frame_compact(&frame, len - 1).unwrap_err();
        let got = encode_request_compact(id, &body, len - 1).unwrap_err();
        assert_eq!(got.to_string(), want.to_string());
        // Other requests are serde's.
        for body in [Request::Ping, Request::Members] {
            let frame = ClientFrameRef::Request { id: 9, body: &body };
            let want = crate::encode_frame_compact(&frame, max).unwrap();
            assert_eq!(encode_request_compact(9, &body, max).unwrap(), want);
        }
    }

    #[test]
    fn hand_written_applied_answers_are_serde_s_bytes() {
        for id in EDGE_UINTS {
            for revision in EDGE_UINTS {
                let frame = ServerFrame::Response {
                    id,
                    result: Ok(Response::Applied { revision }),
                };
                let want = encode_frame(&frame, DEFAULT_MAX_FRAME_BYTES).unwrap();
                let mut got = vec![7];
                append_applied_answer(&mut got, id, revision, DEFAULT_MAX_FRAME_BYTES).unwrap();
                assert_eq!(&got[1..], &want[..]);
                assert_eq!(decode_server_frame(&want[4..]).unwrap(), frame);
            }
        }
        let mut out = vec![7];
        assert!(append_applied_answer(&mut out, 1, 1, 10).is_err());
        assert_eq!(out, [7]);
    }

    #[test]
    fn damaged_client_writes_decode_as_serde_decodes_them() {
        for frame in client_writes() {
            let compact = crate::encode_frame_compact(&frame, DEFAULT_MAX_FRAME_BYTES).unwrap();
            let body = &compact[4..];
            // One cache for every damaged copy, as a node keeps one for all its clients.
            let mut cache = keys();
            let mut agree =
                |m: &[u8]| match (decode_client_frame(m, &mut cache), decode::<ClientFrame>(m)) {
                    (Ok(a), Ok(b)) => assert_eq!(a, b, "{m:02x?}"),
                    (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
                    (a, b) => panic!("fast {a:?}, serde {b:?}, body {m:02x?}"),
                };
            for end in 0..body.len() {
                agree(&body[..end]);
            }
            for i in 0..body.len() {
                for b in [
                    0x00, 0x01, 0x02, 0x7f, 0x80, 0x81, 0x90, 0x92, 0x93, 0x9f, 0xa1, 0xc0, 0xc1,
                    0xc2, 0xc3, 0xc4, 0xca, 0xcb, 0xcd, 0xcf, 0xd0, 0xdd, 0xdf, 0xff,
                ] {
                    let mut m = body.to_vec();
                    m[i] = b;
                    agree(&m);
                }
            }
            // A byte too many at the end.
            let mut m = body.to_vec();
            m.push(0xc0);
            agree(&m);
        }
    }

    #[test]
    fn lies_and_short_rows_are_refused() {
        let frame = ServerFrame::Push(view(20));
        let bytes = encode_frame(&frame, DEFAULT_MAX_FRAME_BYTES).unwrap();
        let body = &bytes[4..];
        // Lengths that lie.
        for lie in [
            &[
                0x81, 0xa4, b'P', b'u', b's', b'h', 0xdf, 0xff, 0xff, 0xff, 0xff,
            ][..],
            &[
                0x81, 0xa4, b'P', b'u', b's', b'h', 0x81, 0xa9, b'i', b'n', b's', b't', b'a', b'n',
                b'c', b'e', b's', 0xdd, 0xff, 0xff, 0xff, 0xff,
            ][..],
            &[
                0x81, 0xa4, b'P', b'u', b's', b'h', 0x81, 0xa1, b'z', 0xdf, 0xff, 0xff, 0xff, 0xff,
            ][..],
        ] {
            assert!(server_frame(lie).is_none());
            assert!(decode_server_frame(lie).is_err());
        }
        // A short row is refused, as by serde.
        let mut c = Cur::new(&[0x92, 0xa1, b'a', 0x01]);
        assert!(row(&mut c, &mut "").is_none());
        // Invalid UTF-8 in an ip.
        let mut bad = body.to_vec();
        let at = bad.windows(7).position(|w| w == b"10.0.0.").unwrap();
        bad[at] = 0xff;
        assert!(server_frame(&bad).is_none());
        assert!(decode_server_frame(&bad).is_err());
    }

    #[test]
    fn skip_walks_every_kind_of_value() {
        let value = (
            "s".repeat(40),
            "t".repeat(300),
            vec![1u64, 300, 70_000, 1 << 40],
            (-1i8, -200i16, -70_000i32, -(1i64 << 40)),
            (1.5f32, 2.5f64, true, false, ()),
            [("k".to_string(), vec![Some(1u8), None])]
                .into_iter()
                .collect::<BTreeMap<_, _>>(),
            vec![0u8; 20],
        );
        let mut bytes = rmp_serde::to_vec(&value).unwrap();
        bytes.push(0x2a);
        let mut c = Cur::new(&bytes);
        c.skip().unwrap();
        assert_eq!(c.uint(), Some(42));
        assert_eq!(c.left(), 0);
        // Ext types.
        for ext in [
            &[0xd4, 1, 0][..],
            &[0xd5, 1, 0, 0],
            &[0xd6, 1, 0, 0, 0, 0],
            &[0xd7, 1, 0, 0, 0, 0, 0, 0, 0, 0],
            &[0xc7, 2, 1, 0, 0],
            &[0xc8, 0, 1, 1, 0],
        ] {
            let mut c = Cur::new(ext);
            c.skip().unwrap();
            assert_eq!(c.left(), 0, "{ext:?}");
        }
        let mut c = Cur::new(&[0xc1]);
        assert!(c.skip().is_none());
    }
}
