//! The wire form of a [`ServiceView`] in `View` answers and `Push` frames: the view is
//! a map like every struct, but each of its instances is an **array** of its fields in
//! a fixed order (`ip, port, cluster, weight, healthy, enabled, metadata, lease,
//! last_beat_ms, stamp`) instead of a map with their names. Answers hold many
//! instances, and the names were about half of their bytes and most of the decoding
//! work.
//!
//! These rows go to clients only (peers replicate with their own messages, the HTTP
//! side writes JSON), so they leave out what a client has no use for, in forms that a
//! reader of the previous row form still decodes:
//! - `weight`: a MessagePack integer when it is a whole number (1 to 3 bytes for the
//!   valid 0..=10000), else an f32 when that is exact (5 bytes), else an f64;
//! - `lease`: `{0: 0}` for a session lease (variant 0 by index, session id 0: answers
//!   never carry a session id, it resumes a session) and `{1: [unhealthy_after_ms,
//!   remove_after_ms]}` for a Ttl lease (variant 1 by index, the `TtlLease` as an
//!   array), instead of `{"Session": <16-byte bin>}` and `{"Ttl": {names: ..}}`;
//! - `last_beat_ms`: the last beat of a Ttl instance, `0` for a session instance;
//! - `stamp`: always `0` (the view's `revision` is what a client orders views by).
//!
//! Compatibility: a newer version may append fields to the array; a reader ignores the
//! elements after the ones it knows. A reader also accepts instances as maps (the form
//! older nodes send) and the previous array form (leases by variant name with the
//! session id, f64 weights, stamps). Serde's derived decoding of a struct accepts the
//! array form too, enum variants by index and integers for an f64, so a reader that
//! decodes `Instance` as a plain struct, as the previous versions of this one, reads
//! these rows.

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, SerializeStruct, SerializeTuple};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use shoal_storage::{Instance, Lease, ServiceKey, ServiceView};

/// Fields of an instance in the array form.
const INSTANCE_FIELDS: usize = 10;

/// Serializes a view with its instances as arrays.
pub fn serialize<S: Serializer>(view: &ServiceView, s: S) -> Result<S::Ok, S::Error> {
    let mut st = s.serialize_struct("ServiceView", 4)?;
    st.serialize_field("key", &view.key)?;
    st.serialize_field("revision", &view.revision)?;
    st.serialize_field("instances", &Rows(&view.instances))?;
    st.serialize_field("protected", &view.protected)?;
    st.end()
}

struct Rows<'a>(&'a [Instance]);

impl Serialize for Rows<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(Row))
    }
}

struct Row<'a>(&'a Instance);

impl Serialize for Row<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let i = self.0;
        let mut t = s.serialize_tuple(INSTANCE_FIELDS)?;
        t.serialize_element(&i.ip)?;
        t.serialize_element(&i.port)?;
        t.serialize_element(&i.cluster)?;
        t.serialize_element(&Weight(i.weight))?;
        t.serialize_element(&i.healthy)?;
        t.serialize_element(&i.enabled)?;
        t.serialize_element(&i.metadata)?;
        t.serialize_element(&LeaseMark(&i.lease))?;
        let last_beat_ms = match i.lease {
            Lease::Ttl(_) => i.last_beat_ms,
            Lease::Session(_) => 0,
        };
        t.serialize_element(&last_beat_ms)?;
        // stamp
        t.serialize_element(&0u8)?;
        t.end()
    }
}

/// A weight in the shortest form that gives it back exactly.
struct Weight(f64);

impl Serialize for Weight {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let w = self.0;
        // Not -0.0: its integer form would read back as 0.0.
        if w.is_sign_positive() && w.fract() == 0.0 && w <= f64::from(u32::MAX) {
            s.serialize_u32(w as u32)
        } else if f64::from(w as f32).to_bits() == w.to_bits() {
            s.serialize_f32(w as f32)
        } else {
            s.serialize_f64(w)
        }
    }
}

/// A lease as clients see it: the variant by index, no session id.
struct LeaseMark<'a>(&'a Lease);

/// The variant indexes of [`Lease`] (its declaration order, which serde's derived
/// decoding goes by).
const SESSION_VARIANT: u8 = 0;
const TTL_VARIANT: u8 = 1;

impl Serialize for LeaseMark<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(1))?;
        match self.0 {
            Lease::Session(_) => m.serialize_entry(&SESSION_VARIANT, &0u8)?,
            Lease::Ttl(t) => {
                m.serialize_entry(&TTL_VARIANT, &(t.unhealthy_after_ms, t.remove_after_ms))?
            }
        }
        m.end()
    }
}

/// What a client reads of `view` once it went through [`serialize`]: session ids,
/// stamps and the last beats of session instances are 0.
#[cfg(test)]
pub(crate) fn as_clients_see(view: &ServiceView) -> ServiceView {
    use shoal_storage::SessionId;
    let mut v = view.clone();
    for i in &mut v.instances {
        i.stamp = 0;
        if let Lease::Session(id) = &mut i.lease {
            *id = SessionId(0);
            i.last_beat_ms = 0;
        }
    }
    v
}

/// The previous form of the rows (leases by variant name with their session ids, f64
/// weights, stamps), as nodes before the current one wrote them: for tests of the
/// readers.
#[cfg(test)]
pub(crate) mod previous {
    use serde::Serialize;
    use shoal_storage::{Instance, ServiceKey, ServiceView};

    type Row<'a> = (
        &'a str,
        u16,
        &'a str,
        f64,
        bool,
        bool,
        &'a std::collections::BTreeMap<String, String>,
        &'a shoal_storage::Lease,
        u64,
        u64,
    );

    #[derive(Serialize)]
    struct View<'a> {
        key: &'a ServiceKey,
        revision: u64,
        instances: Vec<Row<'a>>,
        protected: bool,
    }

    #[derive(Serialize)]
    enum Frame<'a> {
        Push(View<'a>),
    }

    fn row(i: &Instance) -> Row<'_> {
        (
            &i.ip,
            i.port,
            &i.cluster,
            i.weight,
            i.healthy,
            i.enabled,
            &i.metadata,
            &i.lease,
            i.last_beat_ms,
            i.stamp,
        )
    }

    /// The body of a `Push` frame of `v` in the previous row form.
    pub(crate) fn push_body(v: &ServiceView) -> Vec<u8> {
        rmp_serde::to_vec_named(&Frame::Push(View {
            key: &v.key,
            revision: v.revision,
            instances: v.instances.iter().map(row).collect(),
            protected: v.protected,
        }))
        .unwrap()
    }
}

/// Deserializes a view whose instances are arrays (or maps).
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ServiceView, D::Error> {
    d.deserialize_struct(
        "ServiceView",
        &["key", "revision", "instances", "protected"],
        ViewVisitor,
    )
}

struct ViewVisitor;

impl<'de> Visitor<'de> for ViewVisitor {
    type Value = ServiceView;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a service view")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ServiceView, A::Error> {
        let mut key: Option<ServiceKey> = None;
        let mut revision: Option<u64> = None;
        let mut instances: Option<Vec<Instance>> = None;
        let mut protected: Option<bool> = None;
        while let Some(name) = map.next_key::<&str>()? {
            match name {
                "key" => key = Some(map.next_value()?),
                "revision" => revision = Some(map.next_value()?),
                "instances" => instances = Some(map.next_value_seed(RowsSeed)?),
                "protected" => protected = Some(map.next_value()?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(ServiceView {
            key: key.ok_or_else(|| de::Error::missing_field("key"))?,
            revision: revision.ok_or_else(|| de::Error::missing_field("revision"))?,
            instances: instances.ok_or_else(|| de::Error::missing_field("instances"))?,
            protected: protected.ok_or_else(|| de::Error::missing_field("protected"))?,
        })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ServiceView, A::Error> {
        let missing = |n| de::Error::invalid_length(n, &"a service view of 4 fields");
        let view = ServiceView {
            key: seq.next_element()?.ok_or_else(|| missing(0))?,
            revision: seq.next_element()?.ok_or_else(|| missing(1))?,
            instances: seq.next_element_seed(RowsSeed)?.ok_or_else(|| missing(2))?,
            protected: seq.next_element()?.ok_or_else(|| missing(3))?,
        };
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(view)
    }
}

struct RowsSeed;

impl<'de> DeserializeSeed<'de> for RowsSeed {
    type Value = Vec<Instance>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<Instance>, D::Error> {
        d.deserialize_seq(RowsVisitor)
    }
}

struct RowsVisitor;

impl<'de> Visitor<'de> for RowsVisitor {
    type Value = Vec<Instance>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of instances")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Instance>, A::Error> {
        // The hint comes from the sender: bound it, the frame limit bounds the rest.
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(RowOf(inst)) = seq.next_element()? {
            out.push(inst);
        }
        Ok(out)
    }
}

struct RowOf(Instance);

impl<'de> Deserialize<'de> for RowOf {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<RowOf, D::Error> {
        d.deserialize_any(RowVisitor)
    }
}

struct RowVisitor;

impl<'de> Visitor<'de> for RowVisitor {
    type Value = RowOf;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an instance (array or map)")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RowOf, A::Error> {
        let missing = |n| de::Error::invalid_length(n, &"an instance of 10 fields");
        let inst = Instance {
            ip: seq.next_element()?.ok_or_else(|| missing(0))?,
            port: seq.next_element()?.ok_or_else(|| missing(1))?,
            cluster: seq.next_element()?.ok_or_else(|| missing(2))?,
            weight: seq.next_element()?.ok_or_else(|| missing(3))?,
            healthy: seq.next_element()?.ok_or_else(|| missing(4))?,
            enabled: seq.next_element()?.ok_or_else(|| missing(5))?,
            metadata: seq.next_element()?.ok_or_else(|| missing(6))?,
            lease: seq.next_element()?.ok_or_else(|| missing(7))?,
            last_beat_ms: seq.next_element()?.ok_or_else(|| missing(8))?,
            stamp: seq.next_element()?.ok_or_else(|| missing(9))?,
        };
        // Fields a newer version appended.
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(RowOf(inst))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RowOf, A::Error> {
        Instance::deserialize(de::value::MapAccessDeserializer::new(map)).map(RowOf)
    }
}

#[cfg(test)]
mod tests {
    use crate::{decode, encode_frame, Response, ServerFrame, DEFAULT_MAX_FRAME_BYTES};
    use shoal_storage::{Instance, Lease, ServiceKey, ServiceView, SessionId, TtlLease};

    fn view() -> ServiceView {
        let inst = |ip: &str, lease| Instance {
            ip: ip.into(),
            port: 8080,
            cluster: "eu".into(),
            weight: 2.5,
            healthy: true,
            enabled: false,
            metadata: [("seq".to_string(), "7".to_string())].into(),
            lease,
            last_beat_ms: 1_700_000_000_000,
            stamp: 41,
        };
        ServiceView {
            key: ServiceKey::named("orders"),
            revision: 42,
            instances: vec![
                inst("10.0.0.1", Lease::Session(SessionId(u128::MAX - 3))),
                inst("::1", Lease::Ttl(TtlLease::default())),
            ],
            protected: true,
        }
    }

    /// The frames as a version that encoded instances as maps knew them.
    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    enum PlainFrame {
        Push(ServiceView),
    }

    #[test]
    fn views_round_trip_with_instances_as_arrays() {
        let seen = super::as_clients_see(&view());
        for (frame, expected) in [
            (ServerFrame::Push(view()), ServerFrame::Push(seen.clone())),
            (
                ServerFrame::Response {
                    id: 3,
                    result: Ok(Response::View(view())),
                },
                ServerFrame::Response {
                    id: 3,
                    result: Ok(Response::View(seen.clone())),
                },
            ),
        ] {
            let bytes = encode_frame(&frame, DEFAULT_MAX_FRAME_BYTES).unwrap();
            // No instance field names on the wire, the view's own names are.
            assert!(!bytes.windows(12).any(|w| w == b"last_beat_ms"));
            assert!(!bytes.windows(7).any(|w| w == b"Session"));
            assert!(bytes.windows(9).any(|w| w == b"instances"));
            assert_eq!(decode::<ServerFrame>(&bytes[4..]).unwrap(), expected);
            // What a client sees is what it is sent again.
            let again = encode_frame(&expected, DEFAULT_MAX_FRAME_BYTES).unwrap();
            assert_eq!(again, bytes);
        }
        // The Ttl lease and the last beat of a Ttl instance are kept.
        assert_eq!(seen.instances[1].lease, Lease::Ttl(TtlLease::default()));
        assert_eq!(seen.instances[1].last_beat_ms, 1_700_000_000_000);
        assert_eq!(seen.instances[0].lease, Lease::Session(SessionId(0)));
        assert_eq!(seen.instances[0].last_beat_ms, 0);
        assert_eq!(seen.instances[0].stamp, 0);
    }

    #[test]
    fn every_form_reads_every_other() {
        let v = view();
        let seen = super::as_clients_see(&v);
        let compact = encode_frame(&ServerFrame::Push(v.clone()), DEFAULT_MAX_FRAME_BYTES).unwrap();
        let named = rmp_serde::to_vec_named(&PlainFrame::Push(v.clone())).unwrap();
        let previous = super::previous::push_body(&v);
        assert!(
            compact.len() - 4 < previous.len() * 3 / 4,
            "{} vs {}",
            compact.len(),
            previous.len()
        );
        assert!(previous.len() < named.len() * 3 / 4);
        // A reader that decodes instances as plain structs (as the previous versions
        // of this one) reads the array form...
        assert_eq!(
            decode::<PlainFrame>(&compact[4..]).unwrap(),
            PlainFrame::Push(seen.clone())
        );
        assert_eq!(
            decode::<PlainFrame>(&previous).unwrap(),
            PlainFrame::Push(v.clone())
        );
        // ...and this reader reads instances as maps and the previous rows, in full.
        assert_eq!(
            decode::<ServerFrame>(&named).unwrap(),
            ServerFrame::Push(v.clone())
        );
        assert_eq!(
            decode::<ServerFrame>(&previous).unwrap(),
            ServerFrame::Push(v)
        );
    }

    #[test]
    fn weights_take_their_shortest_exact_form() {
        for (w, first, len) in [
            (0.0, 0x00, 1),
            (1.0, 0x01, 1),
            (100.0, 0x64, 1),
            (200.0, 0xcc, 2),
            (10_000.0, 0xcd, 3),
            (1e9, 0xce, 5),
            (2.5, 0xca, 5),
            (-0.0, 0xca, 5),
            (-3.0, 0xca, 5),
            (0.1, 0xcb, 9),
            (1e10, 0xca, 5),
            (5e9 + 0.5, 0xcb, 9),
            (f64::INFINITY, 0xca, 5),
        ] {
            let bytes = rmp_serde::to_vec_named(&super::Weight(w)).unwrap();
            assert_eq!((bytes[0], bytes.len()), (first, len), "{w}");
            let back: f64 = rmp_serde::from_slice(&bytes).unwrap();
            assert_eq!(back.to_bits(), w.to_bits(), "{w}");
        }
    }

    #[test]
    fn a_benchmark_answer_is_less_than_half_its_previous_size() {
        // 140 instances as `shoal-bench compare` registers them.
        let v = ServiceView {
            key: ServiceKey::named("bench-svc-37"),
            revision: 5_177,
            instances: (0..140u64)
                .map(|i| {
                    let g = 37 * 140 + i;
                    Instance {
                        ip: format!("10.{}.{}.{}", (g >> 16) & 0xff, (g >> 8) & 0xff, g & 0xff),
                        port: 8080,
                        cluster: "DEFAULT".into(),
                        weight: 1.0,
                        healthy: true,
                        enabled: true,
                        metadata: Default::default(),
                        lease: Lease::Session(SessionId(0)),
                        last_beat_ms: 1_795_000_000_000 + g,
                        stamp: 5_000 + g,
                    }
                })
                .collect(),
            protected: false,
        };
        let now = encode_frame(&ServerFrame::Push(v.clone()), DEFAULT_MAX_FRAME_BYTES).unwrap();
        let before = super::previous::push_body(&v);
        assert!(
            now.len() - 4 < before.len() / 2,
            "{} vs {}",
            now.len(),
            before.len()
        );
    }

    #[test]
    fn appended_fields_are_ignored_and_short_rows_refused() {
        /// An instance with one field appended.
        type RowV2 = (
            &'static str,
            u16,
            &'static str,
            f64,
            bool,
            bool,
            std::collections::BTreeMap<String, String>,
            Lease,
            u64,
            u64,
            &'static str,
        );
        #[derive(serde::Serialize)]
        struct ViewV2 {
            key: ServiceKey,
            revision: u64,
            instances: Vec<RowV2>,
            protected: bool,
            zone: &'static str,
        }
        #[derive(serde::Serialize)]
        enum Frame {
            Push(ViewV2),
        }
        let lease = Lease::Session(SessionId(5));
        let bytes = rmp_serde::to_vec_named(&Frame::Push(ViewV2 {
            key: ServiceKey::named("a"),
            revision: 1,
            instances: vec![(
                "10.0.0.1",
                80,
                "DEFAULT",
                1.0,
                true,
                true,
                Default::default(),
                lease,
                0,
                1,
                "new",
            )],
            protected: false,
            zone: "z",
        }))
        .unwrap();
        let ServerFrame::Push(v) = decode::<ServerFrame>(&bytes).unwrap() else {
            panic!("not a push");
        };
        assert_eq!(v.instances.len(), 1);
        assert_eq!(v.instances[0].ip, "10.0.0.1");
        assert_eq!(v.instances[0].stamp, 1);

        let short = rmp_serde::to_vec_named(&Frame::Push(ViewV2 {
            key: ServiceKey::named("a"),
            revision: 1,
            instances: Vec::new(),
            protected: false,
            zone: "z",
        }))
        .unwrap();
        assert!(decode::<ServerFrame>(&short).is_ok());
        #[derive(serde::Serialize)]
        struct Short {
            key: ServiceKey,
            revision: u64,
            instances: Vec<(&'static str, u16)>,
            protected: bool,
        }
        #[derive(serde::Serialize)]
        enum ShortFrame {
            Push(Short),
        }
        let bytes = rmp_serde::to_vec_named(&ShortFrame::Push(Short {
            key: ServiceKey::named("a"),
            revision: 1,
            instances: vec![("10.0.0.1", 80)],
            protected: false,
        }))
        .unwrap();
        let err = decode::<ServerFrame>(&bytes).unwrap_err();
        assert!(err.to_string().contains("malformed"), "{err}");
    }
}
