//! The wire form of a [`ServiceView`] in `View` answers and `Push` frames: the view is
//! a map like every struct, but each of its instances is an **array** of its fields in
//! a fixed order (`ip, port, cluster, weight, healthy, enabled, metadata, lease,
//! last_beat_ms, stamp`) instead of a map with their names. Answers hold many
//! instances, and the names were about half of their bytes and most of the decoding
//! work.
//!
//! Compatibility: a newer version may append fields to the array; a reader ignores the
//! elements after the ones it knows. A reader also accepts instances as maps (the form
//! older nodes send). Serde's derived decoding of a struct accepts the array form too,
//! so a reader that decodes `Instance` as a plain struct understands this one.

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeStruct, SerializeTuple};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use shoal_storage::{Instance, ServiceKey, ServiceView};

/// Fields of an instance in the array form, in order.
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
        t.serialize_element(&i.weight)?;
        t.serialize_element(&i.healthy)?;
        t.serialize_element(&i.enabled)?;
        t.serialize_element(&i.metadata)?;
        t.serialize_element(&i.lease)?;
        t.serialize_element(&i.last_beat_ms)?;
        t.serialize_element(&i.stamp)?;
        t.end()
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
        for frame in [
            ServerFrame::Push(view()),
            ServerFrame::Response {
                id: 3,
                result: Ok(Response::View(view())),
            },
        ] {
            let bytes = encode_frame(&frame, DEFAULT_MAX_FRAME_BYTES).unwrap();
            // No instance field names on the wire, the view's own names are.
            assert!(!bytes.windows(12).any(|w| w == b"last_beat_ms"));
            assert!(bytes.windows(9).any(|w| w == b"instances"));
            assert_eq!(decode::<ServerFrame>(&bytes[4..]).unwrap(), frame);
        }
    }

    #[test]
    fn both_forms_read_each_other() {
        let v = view();
        let compact = encode_frame(&ServerFrame::Push(v.clone()), DEFAULT_MAX_FRAME_BYTES).unwrap();
        let named = rmp_serde::to_vec_named(&PlainFrame::Push(v.clone())).unwrap();
        assert!(
            compact.len() - 4 < named.len() * 3 / 4,
            "{} vs {}",
            compact.len(),
            named.len()
        );
        // A reader that decodes instances as plain structs reads the array form...
        assert_eq!(
            decode::<PlainFrame>(&compact[4..]).unwrap(),
            PlainFrame::Push(v.clone())
        );
        // ...and this reader reads instances as maps.
        assert_eq!(decode::<ServerFrame>(&named).unwrap(), ServerFrame::Push(v));
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
