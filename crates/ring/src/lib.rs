//! Which node owns a key: a virtual-node consistent hash ring.
//!
//! Every member (a node, named by a stable string id) is placed on a ring of `2^64`
//! positions at `vnodes_per_weight × weight` points, its virtual nodes (vnodes). A key is
//! placed at [`position`]`(key)`, and its owner is the member of the first vnode at or
//! after that position, wrapping around past `u64::MAX` to the smallest vnode. So a vnode
//! at position `p` whose predecessor is at `q` owns the keys in `(q, p]`.
//!
//! Properties this crate guarantees and tests:
//!
//! - **Stable placement.** Positions come from [`StableHasher`] (FNV-1a 64 plus the
//!   MurmurHash3 `fmix64` finalizer) over explicit little-endian bytes, never from a Rust
//!   `Hash` layout: vnode `i` of member `id` sits at
//!   [`stable_hash`]`(u32_le(id.len()) ‖ id ‖ u32_le(i))`, a key at `stable_hash(key)`.
//!   Golden vectors in `tests/golden.rs` pin the result.
//! - **Order independence.** The owner of every key is a function of the member set
//!   (ids, weights) and `vnodes_per_weight` only: when two vnodes land on the same
//!   position, the one whose member id is smaller (byte-wise) keeps it, whatever the
//!   order the members were added in.
//! - **Bounded remap.** Removing a member moves exactly the keys it owned; adding one
//!   moves keys only to it (about `1/(N+1)` of them). Raising a member's weight adds
//!   vnodes with new indexes and keeps the old ones, so it too moves keys only to that
//!   member.
//!
//! The lookup itself is done by the [`hashring`] crate, fed with vnodes that this crate
//! has already positioned and de-duplicated; the crate keeps its own sorted table of the
//! same points for [`Ring::ranges`], [`Ring::ownership_shares`] and [`Ring::owners`].
//!
//! A [`Ring`] is immutable behind an `Arc`: cloning is O(1), and [`Ring::add`] /
//! [`Ring::remove`] rebuild it (O(V log V) for V vnodes, about 2.5 ms in release for
//! 100 members at the default [`DEFAULT_VNODES`]). Prefer [`Ring::from_members`] to
//! build a ring from a whole member view at once.
//!
//! The crate is pure: no I/O, no clock, no tasks.
//!
//! ```
//! use shoal_ring::{Member, Ring, DEFAULT_VNODES};
//!
//! let mut ring = Ring::from_members(DEFAULT_VNODES, ["node-a", "node-b", "node-c"]).unwrap();
//! let key = b"placement bytes of a service key";
//! let owner = ring.owner(key).unwrap().to_owned();
//!
//! // A join moves keys only to the new member.
//! ring.add(Member::with_weight("node-d", 1)).unwrap();
//! let now = ring.owner(key).unwrap();
//! assert!(now == owner || now == "node-d");
//!
//! // The arc that holds the key, for per-range anti-entropy digests.
//! let range = ring.range_of(key).unwrap();
//! assert!(range.contains(ring.position(key)));
//! assert_eq!(range.owner, now);
//! ```
#![deny(missing_docs)]

mod hash;

use std::collections::BTreeMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use hashring::HashRing;
use serde::{Deserialize, Serialize};

pub use hash::{
    position, stable_hash, vnode_bytes, vnode_position, StableBuildHasher, StableHasher,
};
use hash::{write_vnode, PositionBuildHasher};

/// The default number of vnodes per unit of member weight.
///
/// Chosen from the balance table in `docs/ring.md`: at 256 the busiest of 3–20 equal
/// members owns on average 1.06–1.13× the mean share (at most 1.19× over 80 measured
/// clusters), against up to 1.36× at 128, while a ring of 100 members still builds in
/// about 2.5 ms and holds 25,600 vnodes (about 3 MB with its arcs).
///
/// Every node of a cluster must use the same value: it changes every owner. The golden
/// test pins it.
pub const DEFAULT_VNODES: u32 = 256;

/// The most vnodes one member may have (`vnodes_per_weight × weight`).
pub const MAX_VNODES_PER_MEMBER: u32 = 1 << 16;

/// The longest member id, in bytes.
pub const MAX_ID_LEN: usize = 1024;

/// A member of the ring: a node's stable id and its weight.
///
/// A member of weight `w` gets `w × vnodes_per_weight` vnodes, so it owns about `w / Σw`
/// of the keys. A member of weight 0 is listed but owns nothing.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Member {
    /// The node's stable id. Its UTF-8 bytes place its vnodes, so it must be the same
    /// string on every node, across restarts and versions.
    pub id: String,
    /// The member's relative weight; 1 for an ordinary node.
    pub weight: u32,
}

impl Member {
    /// A member of weight 1.
    pub fn new(id: impl Into<String>) -> Self {
        Member {
            id: id.into(),
            weight: 1,
        }
    }

    /// A member of the given weight.
    pub fn with_weight(id: impl Into<String>, weight: u32) -> Self {
        Member {
            id: id.into(),
            weight,
        }
    }
}

impl From<&str> for Member {
    fn from(id: &str) -> Self {
        Member::new(id)
    }
}

impl From<String> for Member {
    fn from(id: String) -> Self {
        Member::new(id)
    }
}

/// Why a ring could not be built. A failed call leaves the ring unchanged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// `vnodes_per_weight` was 0.
    #[error("vnodes per weight must be at least 1")]
    ZeroVnodes,
    /// A member id was empty.
    #[error("member id must not be empty")]
    EmptyId,
    /// A member id was longer than [`MAX_ID_LEN`] bytes.
    #[error("member id is {0} bytes long; the limit is {MAX_ID_LEN}")]
    IdTooLong(usize),
    /// The same member id was given twice to [`Ring::from_members`].
    #[error("member {0:?} is listed more than once")]
    DuplicateMember(String),
    /// `vnodes_per_weight × weight` exceeded [`MAX_VNODES_PER_MEMBER`].
    #[error("member {id:?} would have {vnodes} vnodes; the limit is {MAX_VNODES_PER_MEMBER}")]
    TooManyVnodes {
        /// The member's id.
        id: String,
        /// The vnodes it asked for.
        vnodes: u64,
    },
}

/// An arc of the ring with a single owner: the positions `start..=end`, wrapping past
/// `u64::MAX` to 0 when `start > end`.
///
/// [`Ring::ranges`] returns maximal arcs: two neighbouring arcs always have different
/// owners (unless the ring has one owner, whose single arc is `0..=u64::MAX`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Range {
    /// The first position of the arc (inclusive): one past the previous arc's end.
    pub start: u64,
    /// The last position of the arc (inclusive): the position of its last vnode.
    pub end: u64,
    /// The id of the member that owns every key in the arc.
    pub owner: String,
}

impl Range {
    /// Whether the arc wraps past `u64::MAX` (`start > end`).
    pub fn wraps(&self) -> bool {
        self.start > self.end
    }

    /// Whether `position` lies in the arc.
    pub fn contains(&self, position: u64) -> bool {
        if self.wraps() {
            position >= self.start || position <= self.end
        } else {
            (self.start..=self.end).contains(&position)
        }
    }

    /// How many positions the arc covers: 1 ..= 2^64.
    pub fn width(&self) -> u128 {
        u128::from(self.end.wrapping_sub(self.start)) + 1
    }

    /// The share of the ring the arc covers: `width / 2^64`.
    pub fn share(&self) -> f64 {
        self.width() as f64 / RING_SIZE as f64
    }
}

const RING_SIZE: u128 = 1 << 64;

/// A vnode as `hashring` stores it. Its `Hash` writes exactly the [`vnode_bytes`] of
/// `(id, index)` with `Hasher::write`, so hashring computes the same position as
/// [`vnode_position`].
#[derive(Clone, Debug)]
struct VNode {
    id: Arc<str>,
    index: u32,
}

impl Hash for VNode {
    fn hash<H: Hasher>(&self, state: &mut H) {
        write_vnode(state, &self.id, self.index);
    }
}

/// A key as `hashring` hashes it: exactly its bytes, with no length prefix (unlike
/// `Hash for [u8]`).
struct KeyBytes<'a>(&'a [u8]);

impl Hash for KeyBytes<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.0);
    }
}

/// A vnode that survived de-duplication, in the ring's own sorted table.
#[derive(Clone, Copy, Debug)]
struct Point {
    pos: u64,
    /// Index into `Inner::members`.
    member: u32,
}

struct Inner {
    vnodes_per_weight: u32,
    mask: u64,
    /// Sorted by id, unique ids.
    members: Vec<Member>,
    /// The lookup structure: one entry per point, positioned by the stable hash.
    hashring: HashRing<VNode, PositionBuildHasher>,
    /// Sorted by position, unique positions.
    points: Vec<Point>,
    /// Maximal single-owner arcs, sorted by `end`.
    ranges: Vec<Range>,
}

/// A consistent hash ring of members with virtual nodes. Cheap to clone.
///
/// Two rings built from the same members and `vnodes_per_weight` give the same owner
/// for every key, whatever the order the members were given in, on any platform.
#[derive(Clone)]
pub struct Ring {
    inner: Arc<Inner>,
}

impl Default for Ring {
    /// An empty ring with [`DEFAULT_VNODES`] vnodes per weight.
    fn default() -> Self {
        Ring::build(DEFAULT_VNODES, u64::MAX, Vec::new()).expect("an empty ring is valid")
    }
}

impl fmt::Debug for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("vnodes_per_weight", &self.inner.vnodes_per_weight)
            .field("members", &self.inner.members)
            .field("vnodes", &self.inner.points.len())
            .finish()
    }
}

impl PartialEq for Ring {
    /// Rings are equal when they have the same `vnodes_per_weight` and the same members
    /// with the same weights, and so place every key on the same owner.
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
            || (self.inner.vnodes_per_weight == other.inner.vnodes_per_weight
                && self.inner.mask == other.inner.mask
                && self.inner.members == other.inner.members)
    }
}

impl Eq for Ring {}

impl Ring {
    /// An empty ring whose members get `vnodes_per_weight × weight` vnodes each.
    ///
    /// Fails with [`RingError::ZeroVnodes`] when `vnodes_per_weight` is 0.
    pub fn new(vnodes_per_weight: u32) -> Result<Ring, RingError> {
        Ring::build(vnodes_per_weight, u64::MAX, Vec::new())
    }

    /// A ring of the given members, built in one pass.
    ///
    /// Fails when `vnodes_per_weight` is 0, an id is empty or too long, an id appears
    /// twice, or a member would get more than [`MAX_VNODES_PER_MEMBER`] vnodes.
    pub fn from_members<I>(vnodes_per_weight: u32, members: I) -> Result<Ring, RingError>
    where
        I: IntoIterator,
        I::Item: Into<Member>,
    {
        Ring::build(
            vnodes_per_weight,
            u64::MAX,
            members.into_iter().map(Into::into).collect(),
        )
    }

    /// Adds a member, or replaces the weight of the member with the same id, and returns
    /// the member it replaced. Rebuilds the ring; on error the ring is unchanged.
    pub fn add(&mut self, member: impl Into<Member>) -> Result<Option<Member>, RingError> {
        let member = member.into();
        let mut members = self.inner.members.clone();
        let replaced = match members.binary_search_by(|m| m.id.as_str().cmp(&member.id)) {
            Ok(i) => Some(std::mem::replace(&mut members[i], member)),
            Err(i) => {
                members.insert(i, member);
                None
            }
        };
        *self = Ring::build(self.inner.vnodes_per_weight, self.inner.mask, members)?;
        Ok(replaced)
    }

    /// Removes the member with this id and returns it, or `None` (and leaves the ring
    /// as it is) when there is no such member.
    pub fn remove(&mut self, id: &str) -> Option<Member> {
        let i = self.index_of(id)?;
        let mut members = self.inner.members.clone();
        let removed = members.remove(i);
        *self = Ring::build(self.inner.vnodes_per_weight, self.inner.mask, members)
            .expect("a subset of valid members is valid");
        Some(removed)
    }

    /// The id of the member that owns `key`, or `None` when no member has a vnode
    /// (no members, or all of weight 0).
    ///
    /// `key` is hashed as-is with [`position`]; pass `ServiceKey::placement_bytes`.
    pub fn owner(&self, key: &[u8]) -> Option<&str> {
        self.inner.hashring.get(&KeyBytes(key)).map(|v| &*v.id)
    }

    /// The id of the member that owns ring position `position`.
    pub fn owner_at(&self, position: u64) -> Option<&str> {
        let points = &self.inner.points;
        if points.is_empty() {
            return None;
        }
        let i = points.partition_point(|p| p.pos < position);
        let p = points.get(i).unwrap_or(&points[0]);
        Some(&self.inner.members[p.member as usize].id)
    }

    /// Up to `n` distinct members for `key`: its owner first, then the owners of the
    /// following vnodes clockwise, skipping members already listed. For a replication
    /// factor later on; `owners(key, 1)` is `[owner(key)]`.
    pub fn owners(&self, key: &[u8], n: usize) -> Vec<&str> {
        let inner = &*self.inner;
        let points = &inner.points;
        let mut out: Vec<&str> = Vec::new();
        if points.is_empty() || n == 0 {
            return out;
        }
        let mut seen = vec![false; inner.members.len()];
        let start = points.partition_point(|p| p.pos < self.key_position(key));
        for k in 0..points.len() {
            let p = points[(start + k) % points.len()];
            if !std::mem::replace(&mut seen[p.member as usize], true) {
                out.push(&inner.members[p.member as usize].id);
                if out.len() == n {
                    break;
                }
            }
        }
        out
    }

    /// The ring position of `key` in this ring: [`position`]`(key)`.
    pub fn position(&self, key: &[u8]) -> u64 {
        self.key_position(key)
    }

    /// The maximal single-owner arcs of the ring, sorted by `end`. When an arc wraps
    /// past `u64::MAX`, it is the first one. Empty when no member has a vnode.
    ///
    /// Every position lies in exactly one arc, and the arcs' owners are the owners
    /// [`Ring::owner`] gives, so anti-entropy can digest per arc.
    pub fn ranges(&self) -> &[Range] {
        &self.inner.ranges
    }

    /// The index in [`Ring::ranges`] of the arc that holds `key`.
    pub fn range_index(&self, key: &[u8]) -> Option<usize> {
        self.range_index_at(self.key_position(key))
    }

    /// The index in [`Ring::ranges`] of the arc that holds `position`.
    pub fn range_index_at(&self, position: u64) -> Option<usize> {
        let ranges = &self.inner.ranges;
        if ranges.is_empty() {
            return None;
        }
        let i = ranges.partition_point(|r| r.end < position);
        Some(if i == ranges.len() { 0 } else { i })
    }

    /// The arc that holds `key`; its `start` names it, its `owner` owns the key.
    pub fn range_of(&self, key: &[u8]) -> Option<&Range> {
        self.range_index(key).map(|i| &self.inner.ranges[i])
    }

    /// The share of the `2^64` positions each member owns, exactly (arc widths over
    /// `2^64`), for every member including those of weight 0. The shares sum to 1
    /// unless no member has a vnode.
    pub fn ownership_shares(&self) -> BTreeMap<String, f64> {
        let inner = &*self.inner;
        let mut widths = vec![0u128; inner.members.len()];
        let points = &inner.points;
        if let Some(last) = points.last() {
            let mut prev = last.pos;
            for p in points {
                // The arc (prev, p.pos]; a lone point owns all 2^64 positions.
                let w = if points.len() == 1 {
                    RING_SIZE
                } else {
                    u128::from(p.pos.wrapping_sub(prev))
                };
                widths[p.member as usize] += w;
                prev = p.pos;
            }
        }
        inner
            .members
            .iter()
            .zip(widths)
            .map(|(m, w)| (m.id.clone(), w as f64 / RING_SIZE as f64))
            .collect()
    }

    /// The indexes of the keys whose owner in `other` differs from their owner here.
    pub fn diff<K: AsRef<[u8]>>(&self, other: &Ring, keys: &[K]) -> Vec<usize> {
        keys.iter()
            .enumerate()
            .filter(|(_, k)| self.owner(k.as_ref()) != other.owner(k.as_ref()))
            .map(|(i, _)| i)
            .collect()
    }

    /// How many of `keys` change owner between `before` and `after`.
    pub fn moved<K: AsRef<[u8]>>(before: &Ring, after: &Ring, keys: &[K]) -> usize {
        keys.iter()
            .filter(|k| before.owner(k.as_ref()) != after.owner(k.as_ref()))
            .count()
    }

    /// The members, sorted by id.
    pub fn members(&self) -> &[Member] {
        &self.inner.members
    }

    /// The member with this id.
    pub fn member(&self, id: &str) -> Option<&Member> {
        self.index_of(id).map(|i| &self.inner.members[i])
    }

    /// Whether a member has this id.
    pub fn contains(&self, id: &str) -> bool {
        self.index_of(id).is_some()
    }

    /// The number of members.
    pub fn len(&self) -> usize {
        self.inner.members.len()
    }

    /// Whether the ring has no members.
    pub fn is_empty(&self) -> bool {
        self.inner.members.is_empty()
    }

    /// The vnodes each unit of weight gets.
    pub fn vnodes_per_weight(&self) -> u32 {
        self.inner.vnodes_per_weight
    }

    /// The number of vnodes on the ring, after collisions were resolved.
    pub fn vnode_count(&self) -> usize {
        self.inner.points.len()
    }

    fn index_of(&self, id: &str) -> Option<usize> {
        self.inner
            .members
            .binary_search_by(|m| m.id.as_str().cmp(id))
            .ok()
    }

    fn key_position(&self, key: &[u8]) -> u64 {
        position(key) & self.inner.mask
    }

    /// Builds a ring. `mask` is `u64::MAX` except in unit tests, which narrow the space
    /// of positions to force collisions.
    fn build(
        vnodes_per_weight: u32,
        mask: u64,
        mut members: Vec<Member>,
    ) -> Result<Ring, RingError> {
        if vnodes_per_weight == 0 {
            return Err(RingError::ZeroVnodes);
        }
        members.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        for (i, m) in members.iter().enumerate() {
            if m.id.is_empty() {
                return Err(RingError::EmptyId);
            }
            if m.id.len() > MAX_ID_LEN {
                return Err(RingError::IdTooLong(m.id.len()));
            }
            if i > 0 && members[i - 1].id == m.id {
                return Err(RingError::DuplicateMember(m.id.clone()));
            }
            let vnodes = u64::from(vnodes_per_weight) * u64::from(m.weight);
            if vnodes > u64::from(MAX_VNODES_PER_MEMBER) {
                return Err(RingError::TooManyVnodes {
                    id: m.id.clone(),
                    vnodes,
                });
            }
        }

        // Every vnode with its position; members are sorted by id, so sorting by
        // (position, member index) puts the smallest id first among equal positions.
        let total: usize = members
            .iter()
            .map(|m| (vnodes_per_weight * m.weight) as usize)
            .sum();
        let mut all: Vec<(u64, u32, u32)> = Vec::with_capacity(total);
        for (mi, m) in members.iter().enumerate() {
            for index in 0..vnodes_per_weight * m.weight {
                all.push((vnode_position(&m.id, index) & mask, mi as u32, index));
            }
        }
        all.sort_unstable();
        all.dedup_by_key(|v| v.0);

        let ids: Vec<Arc<str>> = members.iter().map(|m| Arc::from(m.id.as_str())).collect();
        let mut hashring = HashRing::with_hasher(PositionBuildHasher { mask });
        hashring.batch_add(
            all.iter()
                .map(|&(_, mi, index)| VNode {
                    id: Arc::clone(&ids[mi as usize]),
                    index,
                })
                .collect(),
        );
        let points: Vec<Point> = all
            .iter()
            .map(|&(pos, member, _)| Point { pos, member })
            .collect();
        let ranges = arcs(&points, &members);

        Ok(Ring {
            inner: Arc::new(Inner {
                vnodes_per_weight,
                mask,
                members,
                hashring,
                points,
                ranges,
            }),
        })
    }

    /// A ring built with positions narrowed by `mask`, to force collisions in tests.
    #[cfg(test)]
    fn with_mask(
        vnodes_per_weight: u32,
        mask: u64,
        members: Vec<Member>,
    ) -> Result<Ring, RingError> {
        Ring::build(vnodes_per_weight, mask, members)
    }
}

/// The maximal single-owner arcs of sorted, de-duplicated points, sorted by `end`.
fn arcs(points: &[Point], members: &[Member]) -> Vec<Range> {
    let n = points.len();
    if n == 0 {
        return Vec::new();
    }
    let owner = |i: usize| points[i % n].member;
    // Start at a point whose predecessor has another owner, so no run is cut in two.
    let Some(first) = (0..n).find(|&i| owner(i) != owner(i + n - 1)) else {
        return vec![Range {
            start: 0,
            end: u64::MAX,
            owner: members[points[0].member as usize].id.clone(),
        }];
    };
    let mut out = Vec::new();
    let mut run_start = first;
    for k in 1..=n {
        let i = first + k;
        if k == n || owner(i) != owner(run_start) {
            let prev = points[(run_start + n - 1) % n].pos;
            let last = points[(i - 1) % n].pos;
            out.push(Range {
                start: prev.wrapping_add(1),
                end: last,
                owner: members[owner(run_start) as usize].id.clone(),
            });
            run_start = i;
        }
    }
    out.sort_unstable_by_key(|r| r.end);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(ids: &[&str]) -> Vec<Member> {
        ids.iter().map(|&id| Member::new(id)).collect()
    }

    fn keys(n: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| format!("key-{i}").into_bytes()).collect()
    }

    /// With 4096 positions, 5 × 64 vnodes collide about a dozen times.
    const MASK: u64 = 0xfff;

    #[test]
    fn ring_is_send_and_sync() {
        fn check<T: Send + Sync + Clone>() {}
        check::<Ring>();
    }

    #[test]
    fn collisions_are_won_by_the_smallest_id_in_any_order() {
        let ids = ["n1", "n2", "n3", "n4", "n5"];
        let base = Ring::with_mask(64, MASK, members(&ids)).unwrap();
        assert!(
            base.vnode_count() < 5 * 64,
            "the narrowed ring must have collisions to test anything"
        );

        // Every colliding position goes to the smallest id that has a vnode there.
        let mut by_pos: BTreeMap<u64, Vec<&str>> = BTreeMap::new();
        for id in ids {
            for i in 0..64 {
                by_pos
                    .entry(vnode_position(id, i) & MASK)
                    .or_default()
                    .push(id);
            }
        }
        for (pos, claimants) in &by_pos {
            let winner = claimants.iter().min().unwrap();
            assert_eq!(base.owner_at(*pos), Some(*winner), "position {pos}");
        }

        // Any insertion order, one by one or at once, gives the same owner everywhere.
        let orders: [[usize; 5]; 4] = [
            [4, 3, 2, 1, 0],
            [2, 0, 4, 1, 3],
            [1, 3, 0, 4, 2],
            [3, 4, 0, 2, 1],
        ];
        for order in orders {
            let mut ring = Ring::with_mask(64, MASK, Vec::new()).unwrap();
            for &i in &order {
                ring.add(Member::new(ids[i])).unwrap();
            }
            let at_once = Ring::with_mask(
                64,
                MASK,
                order.iter().map(|&i| Member::new(ids[i])).collect(),
            )
            .unwrap();
            for pos in 0..=MASK {
                assert_eq!(ring.owner_at(pos), base.owner_at(pos));
                assert_eq!(at_once.owner_at(pos), base.owner_at(pos));
            }
            for k in keys(2000) {
                assert_eq!(ring.owner(&k), base.owner(&k));
            }
            assert_eq!(ring.ranges(), base.ranges());
        }
    }

    #[test]
    fn hashring_lookup_agrees_with_point_table_under_collisions() {
        let ring = Ring::with_mask(64, MASK, members(&["a", "b", "c", "d", "e"])).unwrap();
        for k in keys(5000) {
            let owner = ring.owner(&k);
            assert_eq!(owner, ring.owner_at(ring.position(&k)));
            assert_eq!(owner, ring.range_of(&k).map(|r| r.owner.as_str()));
        }
    }

    #[test]
    fn bounded_remap_holds_even_with_collisions() {
        let ids = ["a", "b", "c", "d", "e"];
        let before = Ring::with_mask(64, MASK, members(&ids)).unwrap();
        for gone in ids {
            let mut after = before.clone();
            after.remove(gone).unwrap();
            for pos in 0..=MASK {
                let (b, a) = (before.owner_at(pos), after.owner_at(pos));
                if b != Some(gone) {
                    assert_eq!(a, b, "removing {gone} moved position {pos}");
                }
            }
        }
        for new in ["0", "bb", "zz"] {
            let mut after = before.clone();
            after.add(Member::new(new)).unwrap();
            for pos in 0..=MASK {
                let (b, a) = (before.owner_at(pos), after.owner_at(pos));
                if a != b {
                    assert_eq!(a, Some(new), "adding {new} moved position {pos} elsewhere");
                }
            }
        }
    }

    #[test]
    fn arcs_cover_the_ring_once_and_alternate_owners() {
        for ids in [&["a"][..], &["a", "b"], &["a", "b", "c", "d", "e"]] {
            let ring = Ring::with_mask(16, u64::MAX, members(ids)).unwrap();
            let ranges = ring.ranges();
            let total: u128 = ranges.iter().map(Range::width).sum();
            assert_eq!(total, RING_SIZE);
            for (i, r) in ranges.iter().enumerate() {
                let next = &ranges[(i + 1) % ranges.len()];
                assert_eq!(r.end.wrapping_add(1), next.start);
                if ranges.len() > 1 {
                    assert_ne!(r.owner, next.owner);
                }
                assert!(i == 0 || !r.wraps(), "only the first arc may wrap");
            }
            let shares = ring.ownership_shares();
            let sum: f64 = shares.values().sum();
            assert!((sum - 1.0).abs() < 1e-9);
            for id in ids.iter() {
                let from_ranges: f64 = ranges
                    .iter()
                    .filter(|r| r.owner == *id)
                    .map(Range::share)
                    .sum();
                assert!((from_ranges - shares[*id]).abs() < 1e-12);
            }
        }
    }
}
