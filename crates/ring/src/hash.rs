//! The stable hash that places vnodes and keys on the ring.
//!
//! `std::hash::Hash` and `DefaultHasher` are not promised stable across Rust versions or
//! platforms, so the ring never hashes a Rust value with them. It hashes explicit bytes
//! with [`StableHasher`], whose algorithm is fixed here and covered by golden tests:
//!
//! 1. FNV-1a 64 over the bytes (offset basis `0xcbf29ce484222325`, prime `0x100000001b3`);
//! 2. then the MurmurHash3 `fmix64` finalizer over the 64-bit state.
//!
//! FNV-1a alone mixes its last bytes poorly into the high bits, so names that differ only
//! in a trailing digit (`svc-1`, `svc-2`, ...) would land next to each other on the ring;
//! the finalizer (a bijection) spreads them. The hasher is streaming: several calls to
//! `write` give the same result as one call with the concatenated bytes.

use std::hash::{BuildHasher, Hasher};

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// MurmurHash3's 64-bit finalizer: a bijection on `u64` with full avalanche.
const fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// FNV-1a 64 with a MurmurHash3 `fmix64` finalizer: a fixed, platform-independent hash.
///
/// The ring feeds it only explicit bytes through [`Hasher::write`]. The integer methods
/// (`write_u32`, ...) are overridden to write little-endian bytes, so that even a value
/// hashed through them gives the same result on every platform (`usize` is written as 8
/// bytes); the ring itself never uses them.
#[derive(Clone, Copy, Debug)]
pub struct StableHasher {
    state: u64,
}

impl StableHasher {
    /// A hasher in its initial state.
    pub const fn new() -> Self {
        StableHasher {
            state: FNV_OFFSET_BASIS,
        }
    }
}

impl Default for StableHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl Hasher for StableHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut state = self.state;
        for &b in bytes {
            state ^= u64::from(b);
            state = state.wrapping_mul(FNV_PRIME);
        }
        self.state = state;
    }

    fn finish(&self) -> u64 {
        fmix64(self.state)
    }

    fn write_u8(&mut self, i: u8) {
        self.write(&[i]);
    }
    fn write_u16(&mut self, i: u16) {
        self.write(&i.to_le_bytes());
    }
    fn write_u32(&mut self, i: u32) {
        self.write(&i.to_le_bytes());
    }
    fn write_u64(&mut self, i: u64) {
        self.write(&i.to_le_bytes());
    }
    fn write_u128(&mut self, i: u128) {
        self.write(&i.to_le_bytes());
    }
    fn write_usize(&mut self, i: usize) {
        self.write(&(i as u64).to_le_bytes());
    }
    fn write_i8(&mut self, i: i8) {
        self.write_u8(i as u8);
    }
    fn write_i16(&mut self, i: i16) {
        self.write_u16(i as u16);
    }
    fn write_i32(&mut self, i: i32) {
        self.write_u32(i as u32);
    }
    fn write_i64(&mut self, i: i64) {
        self.write_u64(i as u64);
    }
    fn write_i128(&mut self, i: i128) {
        self.write_u128(i as u128);
    }
    fn write_isize(&mut self, i: isize) {
        self.write_usize(i as usize);
    }
}

/// The [`BuildHasher`] of [`StableHasher`]; it carries no keys or random state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StableBuildHasher;

impl BuildHasher for StableBuildHasher {
    type Hasher = StableHasher;

    fn build_hasher(&self) -> StableHasher {
        StableHasher::new()
    }
}

/// The stable hash of `bytes`: what [`position`] and [`vnode_position`] are built on.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h = StableHasher::new();
    h.write(bytes);
    h.finish()
}

/// The ring position of a key: [`stable_hash`] of exactly the key's bytes (no length
/// prefix is added; callers such as `ServiceKey::placement_bytes` make their bytes
/// unambiguous themselves).
pub fn position(key: &[u8]) -> u64 {
    stable_hash(key)
}

/// The bytes that place vnode `index` of member `id`:
/// `u32 LE byte length of id || id as UTF-8 || u32 LE index`.
pub fn vnode_bytes(id: &str, index: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + id.len());
    out.extend_from_slice(&id_len(id).to_le_bytes());
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(&index.to_le_bytes());
    out
}

/// The ring position of vnode `index` of member `id`: [`stable_hash`] of [`vnode_bytes`].
pub fn vnode_position(id: &str, index: u32) -> u64 {
    let mut h = StableHasher::new();
    write_vnode(&mut h, id, index);
    h.finish()
}

/// Writes the [`vnode_bytes`] of `(id, index)` into `state` without allocating.
pub(crate) fn write_vnode<H: Hasher>(state: &mut H, id: &str, index: u32) {
    state.write(&id_len(id).to_le_bytes());
    state.write(id.as_bytes());
    state.write(&index.to_le_bytes());
}

/// Member ids are validated to fit in a `u32` length before they reach the ring.
fn id_len(id: &str) -> u32 {
    u32::try_from(id.len()).expect("member id length is validated to fit in u32")
}

/// The hasher the ring hands to `hashring`: [`StableHasher`], then an AND with `mask`.
///
/// The mask is all ones in every ring built through the public API; unit tests narrow it
/// to force vnode collisions and exercise tie-breaking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PositionBuildHasher {
    pub(crate) mask: u64,
}

impl BuildHasher for PositionBuildHasher {
    type Hasher = MaskedHasher;

    fn build_hasher(&self) -> MaskedHasher {
        MaskedHasher {
            inner: StableHasher::new(),
            mask: self.mask,
        }
    }
}

/// See [`PositionBuildHasher`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct MaskedHasher {
    inner: StableHasher,
    mask: u64,
}

impl Hasher for MaskedHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.inner.write(bytes);
    }

    fn finish(&self) -> u64 {
        self.inner.finish() & self.mask
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_core_matches_published_vectors() {
        // FNV-1a 64 reference values (from the FNV test suite), checked before the
        // finalizer, so the building block is known to be the standard one.
        let fnv = |b: &[u8]| {
            let mut h = StableHasher::new();
            h.write(b);
            h.state
        };
        assert_eq!(fnv(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn streaming_equals_concatenation() {
        let mut h = StableHasher::new();
        h.write(b"foo");
        h.write(b"");
        h.write(b"bar");
        assert_eq!(h.finish(), stable_hash(b"foobar"));
        assert_eq!(
            vnode_position("node-1", 7),
            stable_hash(&vnode_bytes("node-1", 7))
        );
    }

    #[test]
    fn integers_are_little_endian() {
        let mut a = StableHasher::new();
        a.write_u32(0x0102_0304);
        a.write_usize(5);
        let mut b = StableHasher::new();
        b.write(&[4, 3, 2, 1]);
        b.write(&[5, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(a.finish(), b.finish());
    }

    #[test]
    fn vnode_bytes_layout() {
        assert_eq!(
            vnode_bytes("ab", 258),
            vec![2, 0, 0, 0, b'a', b'b', 2, 1, 0, 0]
        );
    }
}
