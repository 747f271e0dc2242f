//! A reader and writers of MessagePack bytes for the hand-written decoders and encoders
//! of the hottest messages (a client's answers, pushes and writes here, a node's
//! requests and peer messages in the node). Every read returns `None` on a marker it
//! does not take, a short body or a length that cannot be true, so that its caller gives
//! up and decodes the bytes with the generic serde decoding instead; no read panics.
//! Every writer writes the bytes serde's encoding writes for the same value; the only
//! panic is on a string, array or map longer than 4 GiB, which no frame can carry.

/// How deep [`Reader::skip`] follows nested arrays and maps before giving up (the
/// generic decoding's limit, 1024 levels, is far above).
const MAX_SKIP_DEPTH: usize = 32;

/// A cursor over MessagePack bytes. Every read returns `None` on a marker it does not
/// take or on the end of the bytes; nothing panics.
pub struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `b`.
    pub fn new(b: &'a [u8]) -> Self {
        Reader { b, pos: 0 }
    }

    /// True when every byte has been read.
    pub fn at_end(&self) -> bool {
        self.pos == self.b.len()
    }

    /// How many bytes have been read.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// The bytes from `from` (an earlier [`Reader::pos`]) to here.
    pub fn since(&self, from: usize) -> &'a [u8] {
        &self.b[from..self.pos]
    }

    /// How many bytes are left.
    pub fn left(&self) -> usize {
        self.b.len() - self.pos
    }

    /// The next byte, not consumed.
    pub fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }

    fn byte(&mut self) -> Option<u8> {
        let v = *self.b.get(self.pos)?;
        self.pos += 1;
        Some(v)
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.b.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    fn be<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn u8(&mut self) -> Option<usize> {
        self.byte().map(usize::from)
    }

    fn u16(&mut self) -> Option<usize> {
        self.be().map(|b| usize::from(u16::from_be_bytes(b)))
    }

    fn u32(&mut self) -> Option<usize> {
        self.be()
            .and_then(|b| usize::try_from(u32::from_be_bytes(b)).ok())
    }

    /// An unsigned integer (a negative one is not what the node writes).
    pub fn uint(&mut self) -> Option<u64> {
        Some(match self.byte()? {
            m @ 0x00..=0x7f => u64::from(m),
            0xcc => u64::from(self.byte()?),
            0xcd => u64::from(u16::from_be_bytes(self.be()?)),
            0xce => u64::from(u32::from_be_bytes(self.be()?)),
            0xcf => u64::from_be_bytes(self.be()?),
            _ => return None,
        })
    }

    /// A 128-bit integer: 16 bytes of bin, big-endian (how serde's MessagePack writes
    /// one, e.g. a session id), or an unsigned integer (the 0 that the compact rows of a
    /// view write for a Ttl lease's session).
    pub fn u128(&mut self) -> Option<u128> {
        if self
            .b
            .get(self.pos..)
            .is_some_and(|b| b.starts_with(&[0xc4, 16]))
        {
            self.pos += 2;
            return Some(u128::from_be_bytes(self.be()?));
        }
        self.uint().map(u128::from)
    }

    /// A boolean.
    pub fn bool(&mut self) -> Option<bool> {
        match self.byte()? {
            0xc2 => Some(false),
            0xc3 => Some(true),
            _ => None,
        }
    }

    /// A number read as an f64: a float, or an unsigned integer (what nodes write for
    /// whole weights), converted as serde converts it.
    pub fn number(&mut self) -> Option<f64> {
        match self.peek()? {
            0xcb => {
                self.pos += 1;
                Some(f64::from_be_bytes(self.be()?))
            }
            0xca => {
                self.pos += 1;
                Some(f64::from(f32::from_be_bytes(self.be()?)))
            }
            _ => self.uint().map(|v| v as f64),
        }
    }

    /// A string's bytes, not checked as UTF-8: to compare with names.
    pub fn key(&mut self) -> Option<&'a [u8]> {
        let len = match self.byte()? {
            m @ 0xa0..=0xbf => usize::from(m & 0x1f),
            0xd9 => self.u8()?,
            0xda => self.u16()?,
            0xdb => self.u32()?,
            _ => return None,
        };
        self.take(len)
    }

    /// A string, checked as UTF-8.
    pub fn str(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.key()?).ok()
    }

    /// A string, checked as UTF-8, copied into a `String`.
    pub fn string(&mut self) -> Option<String> {
        self.str().map(String::from)
    }

    /// The length of a map (its pairs follow).
    pub fn map_len(&mut self) -> Option<usize> {
        match self.byte()? {
            m @ 0x80..=0x8f => Some(usize::from(m & 0x0f)),
            0xde => self.u16(),
            0xdf => self.u32(),
            _ => None,
        }
    }

    /// An array, each value read by `read`. Each value takes at least a byte: a length
    /// beyond the bytes left is a lie, refused before anything is allocated.
    pub fn seq<T>(&mut self, mut read: impl FnMut(&mut Self) -> Option<T>) -> Option<Vec<T>> {
        let n = self.array_len()?;
        if n > self.left() {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(read(self)?);
        }
        Some(out)
    }

    /// The length of an array (its values follow).
    pub fn array_len(&mut self) -> Option<usize> {
        match self.byte()? {
            m @ 0x90..=0x9f => Some(usize::from(m & 0x0f)),
            0xdc => self.u16(),
            0xdd => self.u32(),
            _ => None,
        }
    }

    /// Skips one value of any type, nested ones included.
    pub fn skip(&mut self) -> Option<()> {
        self.skip_nested(0)
    }

    fn skip_nested(&mut self, depth: usize) -> Option<()> {
        let m = self.byte()?;
        // Bytes to pass over, then values inside to skip.
        let (bytes, values) = match m {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
            0x80..=0x8f => (0, 2 * usize::from(m & 0x0f)),
            0x90..=0x9f => (0, usize::from(m & 0x0f)),
            0xa0..=0xbf => (usize::from(m & 0x1f), 0),
            0xc4 | 0xd9 => (self.u8()?, 0),
            0xc5 | 0xda => (self.u16()?, 0),
            0xc6 | 0xdb => (self.u32()?, 0),
            0xc7 => (self.u8()? + 1, 0),
            0xc8 => (self.u16()? + 1, 0),
            0xc9 => (self.u32()?.checked_add(1)?, 0),
            0xca => (4, 0),
            0xcb => (8, 0),
            0xcc | 0xd0 => (1, 0),
            0xcd | 0xd1 => (2, 0),
            0xce | 0xd2 => (4, 0),
            0xcf | 0xd3 => (8, 0),
            0xd4 => (2, 0),
            0xd5 => (3, 0),
            0xd6 => (5, 0),
            0xd7 => (9, 0),
            0xd8 => (17, 0),
            0xdc => (0, self.u16()?),
            0xdd => (0, self.u32()?),
            0xde => (0, 2 * self.u16()?),
            0xdf => (0, self.u32()?.checked_mul(2)?),
            // 0xc1: never used.
            _ => return None,
        };
        self.take(bytes)?;
        if values > 0 {
            // Each value takes at least a byte: more than the bytes left is a lie.
            // Deep nesting is left to the generic decoding and its depth limit.
            if depth >= MAX_SKIP_DEPTH || values > self.left() {
                return None;
            }
            for _ in 0..values {
                self.skip_nested(depth + 1)?;
            }
        }
        Some(())
    }
}

// Shoal's types as a node or a client writes them with structs as arrays
// (`encode_frame_compact`, rmp-serde's default): each reader takes exactly that shape,
// with every field present, and gives the value the serde decoding gives for it.

use std::collections::BTreeMap;

use shoal_storage::{InstanceKey, InstanceSpec, ServiceKey, SessionId, TtlLease};

/// The service keys a reader has read, by their bytes: a link's messages are about the
/// same few services again and again, and a key read again is the same shared key (a
/// look-up), not three new strings and a reference count. Holds at most `cap` keys; when
/// full it starts over.
pub struct ServiceKeyCache {
    keys: foldhash::HashMap<Box<[u8]>, ServiceKey>,
    cap: usize,
}

impl ServiceKeyCache {
    /// An empty cache of at most `cap` keys.
    pub fn new(cap: usize) -> Self {
        ServiceKeyCache {
            keys: foldhash::HashMap::default(),
            cap,
        }
    }

    /// A [`ServiceKey`]: `[namespace, group, service]`.
    pub fn read(&mut self, c: &mut Reader<'_>) -> Option<ServiceKey> {
        let from = c.pos();
        let (namespace, group, service) = service_key_parts(c)?;
        let raw = c.since(from);
        if let Some(key) = self.keys.get(raw) {
            return Some(key.clone());
        }
        let key = ServiceKey::new(utf8(namespace)?, utf8(group)?, utf8(service)?);
        if self.keys.len() >= self.cap {
            self.keys.clear();
        }
        self.keys.insert(raw.into(), key.clone());
        Some(key)
    }

    /// How many keys it holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when it holds none.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// A [`ServiceKey`]: `[namespace, group, service]` (see [`ServiceKeyCache`] for a
/// reader that reads many).
pub fn service_key(c: &mut Reader<'_>) -> Option<ServiceKey> {
    let (namespace, group, service) = service_key_parts(c)?;
    Some(ServiceKey::new(
        utf8(namespace)?,
        utf8(group)?,
        utf8(service)?,
    ))
}

/// The parts of a service key, not checked as UTF-8.
fn service_key_parts<'a>(c: &mut Reader<'a>) -> Option<(&'a [u8], &'a [u8], &'a [u8])> {
    if c.array_len()? != 3 {
        return None;
    }
    Some((c.key()?, c.key()?, c.key()?))
}

fn utf8(b: &[u8]) -> Option<&str> {
    std::str::from_utf8(b).ok()
}

/// A [`SessionId`]: 16 bytes of bin, big-endian (how a 128-bit integer is written).
pub fn session_id(c: &mut Reader<'_>) -> Option<SessionId> {
    if c.peek()? != 0xc4 {
        return None;
    }
    c.u128().map(SessionId)
}

/// An [`InstanceKey`]: `[cluster, ip, port]`.
pub fn instance_key(c: &mut Reader<'_>) -> Option<InstanceKey> {
    if c.array_len()? != 3 {
        return None;
    }
    Some(InstanceKey {
        cluster: c.string()?,
        ip: c.string()?,
        port: u16::try_from(c.uint()?).ok()?,
    })
}

/// Metadata: a map of strings (a key given twice keeps its last value, as serde's).
pub fn metadata(c: &mut Reader<'_>) -> Option<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for _ in 0..c.map_len()? {
        let k = c.string()?;
        out.insert(k, c.string()?);
    }
    Some(out)
}

/// A [`TtlLease`]: `[unhealthy_after_ms, remove_after_ms]`.
pub fn ttl_lease(c: &mut Reader<'_>) -> Option<TtlLease> {
    if c.array_len()? != 2 {
        return None;
    }
    Some(TtlLease {
        unhealthy_after_ms: c.uint()?,
        remove_after_ms: c.uint()?,
    })
}

/// Nil, read as `None`; anything else is left for `read`.
pub fn option<'a, T>(
    c: &mut Reader<'a>,
    read: impl FnOnce(&mut Reader<'a>) -> Option<T>,
) -> Option<Option<T>> {
    if c.peek()? == 0xc0 {
        c.take(1)?;
        return Some(None);
    }
    read(c).map(Some)
}

/// An [`InstanceSpec`]: `[ip, port, cluster, weight, healthy, enabled, metadata, ttl]`.
pub fn instance_spec(c: &mut Reader<'_>) -> Option<InstanceSpec> {
    if c.array_len()? != 8 {
        return None;
    }
    Some(InstanceSpec {
        ip: c.string()?,
        port: u16::try_from(c.uint()?).ok()?,
        cluster: c.string()?,
        weight: c.number()?,
        healthy: c.bool()?,
        enabled: c.bool()?,
        metadata: metadata(c)?,
        ttl: option(c, ttl_lease)?,
    })
}

/// Unsigned integers at the edges of each MessagePack width, for the tests of the
/// hand-written readers and writers.
#[cfg(test)]
pub(crate) const EDGE_UINTS: [u64; 11] = [
    0,
    1,
    127,
    128,
    255,
    256,
    65_535,
    65_536,
    u32::MAX as u64,
    u32::MAX as u64 + 1,
    u64::MAX,
];

// Writing: the mirror of the readers above, for the hand-written encoders of the same
// messages. Each writer gives exactly the bytes rmp-serde's default (structs as arrays,
// numbers in their shortest form) gives for the same value; the tests compare them.

/// Nil (`None`).
pub fn put_nil(out: &mut Vec<u8>) {
    out.push(0xc0);
}

/// A boolean.
pub fn put_bool(out: &mut Vec<u8>, v: bool) {
    out.push(if v { 0xc3 } else { 0xc2 });
}

/// An unsigned integer in its shortest form.
pub fn put_uint(out: &mut Vec<u8>, v: u64) {
    if v < 0x80 {
        out.push(v as u8);
    } else if v <= u64::from(u8::MAX) {
        out.extend_from_slice(&[0xcc, v as u8]);
    } else if v <= u64::from(u16::MAX) {
        out.push(0xcd);
        out.extend_from_slice(&(v as u16).to_be_bytes());
    } else if v <= u64::from(u32::MAX) {
        out.push(0xce);
        out.extend_from_slice(&(v as u32).to_be_bytes());
    } else {
        out.push(0xcf);
        out.extend_from_slice(&v.to_be_bytes());
    }
}

/// A 64-bit float.
pub fn put_f64(out: &mut Vec<u8>, v: f64) {
    out.push(0xcb);
    out.extend_from_slice(&v.to_be_bytes());
}

/// A 128-bit integer as serde's MessagePack writes one: 16 bytes of bin, big-endian.
pub fn put_u128(out: &mut Vec<u8>, v: u128) {
    out.extend_from_slice(&[0xc4, 16]);
    out.extend_from_slice(&v.to_be_bytes());
}

/// A string.
pub fn put_str(out: &mut Vec<u8>, s: &str) {
    let n = s.len();
    if n < 32 {
        out.push(0xa0 | n as u8);
    } else if n <= usize::from(u8::MAX) {
        out.extend_from_slice(&[0xd9, n as u8]);
    } else if n <= usize::from(u16::MAX) {
        out.push(0xda);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0xdb);
        out.extend_from_slice(&len32(n).to_be_bytes());
    }
    out.extend_from_slice(s.as_bytes());
}

/// The length of an array (its values follow).
pub fn put_array_len(out: &mut Vec<u8>, n: usize) {
    put_len(out, n, 0x90, 0xdc);
}

/// The length of a map (its pairs follow).
pub fn put_map_len(out: &mut Vec<u8>, n: usize) {
    put_len(out, n, 0x80, 0xde);
}

/// An enum variant with data, as serde writes one: a map of one entry, from the
/// variant's name to what follows.
pub fn put_variant(out: &mut Vec<u8>, name: &str) {
    out.push(0x81);
    put_str(out, name);
}

fn put_len(out: &mut Vec<u8>, n: usize, fix: u8, m16: u8) {
    if n < 16 {
        out.push(fix | n as u8);
    } else if n <= usize::from(u16::MAX) {
        out.push(m16);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        // The 32-bit form's marker follows the 16-bit one's.
        out.push(m16 + 1);
        out.extend_from_slice(&len32(n).to_be_bytes());
    }
}

/// A length in the 32-bit form. Nothing Shoal writes comes near 4 GiB (frames are
/// refused long before); a longer one would be a bug.
fn len32(n: usize) -> u32 {
    u32::try_from(n).expect("a MessagePack length fits in 32 bits")
}

/// A [`ServiceKey`]: `[namespace, group, service]`.
pub fn put_service_key(out: &mut Vec<u8>, key: &ServiceKey) {
    put_array_len(out, 3);
    put_str(out, &key.namespace);
    put_str(out, &key.group);
    put_str(out, &key.service);
}

/// A [`SessionId`].
pub fn put_session_id(out: &mut Vec<u8>, id: SessionId) {
    put_u128(out, id.0);
}

/// An [`InstanceKey`]: `[cluster, ip, port]`.
pub fn put_instance_key(out: &mut Vec<u8>, key: &InstanceKey) {
    put_array_len(out, 3);
    put_str(out, &key.cluster);
    put_str(out, &key.ip);
    put_uint(out, u64::from(key.port));
}

/// Metadata: a map of strings.
pub fn put_metadata(out: &mut Vec<u8>, meta: &BTreeMap<String, String>) {
    put_map_len(out, meta.len());
    for (k, v) in meta {
        put_str(out, k);
        put_str(out, v);
    }
}

/// A [`TtlLease`]: `[unhealthy_after_ms, remove_after_ms]`.
pub fn put_ttl_lease(out: &mut Vec<u8>, ttl: &TtlLease) {
    put_array_len(out, 2);
    put_uint(out, ttl.unhealthy_after_ms);
    put_uint(out, ttl.remove_after_ms);
}

/// `None` as nil, `Some` as its value written by `put`.
pub fn put_option<T>(out: &mut Vec<u8>, v: Option<&T>, put: impl FnOnce(&mut Vec<u8>, &T)) {
    match v {
        Some(v) => put(out, v),
        None => put_nil(out),
    }
}

/// An [`InstanceSpec`]: `[ip, port, cluster, weight, healthy, enabled, metadata, ttl]`.
pub fn put_instance_spec(out: &mut Vec<u8>, spec: &InstanceSpec) {
    put_array_len(out, 8);
    put_str(out, &spec.ip);
    put_uint(out, u64::from(spec.port));
    put_str(out, &spec.cluster);
    put_f64(out, spec.weight);
    put_bool(out, spec.healthy);
    put_bool(out, spec.enabled);
    put_metadata(out, &spec.metadata);
    put_option(out, spec.ttl.as_ref(), put_ttl_lease);
}
