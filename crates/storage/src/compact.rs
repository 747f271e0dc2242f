//! The compact form in which the registry holds instances.
//!
//! A registry may hold millions of instances, so each costs as little as possible: the
//! key is a [`Key`] (the address as an [`IpAddr`], the port, and the cluster name as a
//! small id into a per-registry table of names, [`Names`]); the record is a [`Slot`]
//! with the version, the lapse and the session (an id into [`Sessions`]) inline; and
//! the session index holds `(service id, Key)` pairs. Nothing of an instance without
//! metadata and with a session lease is a separate heap allocation.
//!
//! The public types ([`InstanceKey`], [`Instance`]) are built from these at the
//! boundary: answers to queries, replication operations, errors.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use foldhash::{HashMap, HashSet, HashSetExt};

use crate::model::*;
use crate::replica::Stamp;

/// An instance's key within its service: the compact form of an [`InstanceKey`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Key {
    /// The cluster name's id in the registry's [`Names`].
    pub(crate) cluster: u32,
    pub(crate) ip: IpAddr,
    pub(crate) port: u16,
}

/// Hashed as one or two words, not field by field: every write and every replicated
/// operation hashes its key two or three times (the service's instances, the session
/// index), and the derived hash wrote the address's variant, its length and its bytes
/// one by one. Equal keys have equal fields, so they hash alike.
impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // Cluster ids are small (an index into the names in use): folded into the
        // port's word, they spread as well as the port does.
        let low = (u64::from(self.port) << 16) ^ u64::from(self.cluster);
        match self.ip {
            IpAddr::V4(v4) => state.write_u64((u64::from(v4.to_bits()) << 32) | low),
            IpAddr::V6(v6) => {
                state.write_u128(v6.to_bits());
                state.write_u64(low);
            }
        }
    }
}

/// An address parsed as `str::parse::<IpAddr>` parses it. Dotted IPv4 (nearly every
/// instance) is read here a byte at a time: every write and every replicated operation
/// parses its address, and the standard parser, which tries each form in turn, cost
/// about 500 instructions per address. Anything this does not take whole (IPv6, or
/// text that is not four decimal octets) goes to the standard parser, so what it
/// accepts and refuses is the standard parser's.
pub(crate) fn parse_ip(text: &str) -> Option<IpAddr> {
    match parse_ipv4(text.as_bytes()) {
        Some(v4) => Some(IpAddr::V4(v4)),
        None => text.parse().ok(),
    }
}

/// Four octets of one to three decimal digits, without a leading zero, at most 255,
/// separated by dots: a subset of what the standard parser accepts, with its result.
fn parse_ipv4(b: &[u8]) -> Option<std::net::Ipv4Addr> {
    if !(7..=15).contains(&b.len()) {
        return None;
    }
    let mut octets = [0u8; 4];
    let mut i = 0;
    for (n, octet) in octets.iter_mut().enumerate() {
        if n > 0 {
            if b.get(i) != Some(&b'.') {
                return None;
            }
            i += 1;
        }
        let start = i;
        let mut v: u32 = 0;
        while i < b.len() && i - start < 3 && b[i].is_ascii_digit() {
            v = v * 10 + u32::from(b[i] - b'0');
            i += 1;
        }
        let len = i - start;
        if len == 0 || (len > 1 && b[start] == b'0') || v > 255 {
            return None;
        }
        *octet = v as u8;
    }
    (i == b.len()).then_some(std::net::Ipv4Addr::from(octets))
}

/// The text of an address, as `IpAddr`'s `Display` writes it. IPv4 addresses (nearly
/// every instance) are written digit by digit: this is on the path of every instance of
/// every view built for a query answer or a push, where the standard formatter (which
/// supports padding and width) cost about 1 500 instructions per address.
pub(crate) fn ip_text(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let mut s = String::with_capacity(15);
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    s.push('.');
                }
                if octet >= 100 {
                    s.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    s.push(char::from(b'0' + octet / 10 % 10));
                }
                s.push(char::from(b'0' + octet % 10));
            }
            s
        }
        IpAddr::V6(v6) => v6.to_string(),
    }
}

/// The healthy flag of a [`Slot`].
const HEALTHY: u8 = 1;
/// The enabled flag.
const ENABLED: u8 = 2;
/// Expiry marked the (Ttl) instance unhealthy: it is lapsed.
const LAPSED: u8 = 4;
/// While lapsed: the health its client last declared.
const DECLARED: u8 = 8;

/// No session: the instance has a Ttl lease.
pub(crate) const NO_SESSION: u32 = u32::MAX;

/// What few instances have: metadata, a Ttl lease.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Extra {
    pub(crate) metadata: BTreeMap<String, String>,
    /// `Some` for a Ttl lease (then the slot's `session` is [`NO_SESSION`]).
    pub(crate) ttl: Option<TtlLease>,
}

/// One live instance, without its key.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Slot {
    /// The replication version.
    pub(crate) version: Stamp,
    /// The local revision that last wrote it ([`Instance::stamp`]).
    pub(crate) stamp: u64,
    pub(crate) last_beat_ms: u64,
    pub(crate) weight: f64,
    /// The metadata and the Ttl lease, boxed together and only when there is either
    /// (most instances have no metadata and a session lease): 8 bytes in the slot.
    pub(crate) extra: Option<Box<Extra>>,
    /// The session's id in the registry's [`Sessions`], for a session lease.
    pub(crate) session: u32,
    /// Healthy, enabled, lapsed and declared health: see [`Slot::flags_of`].
    pub(crate) flags: u8,
}

impl Slot {
    /// The boxed extras of an instance with this metadata and lease; `None` when
    /// there is neither.
    pub(crate) fn extra_of(
        metadata: BTreeMap<String, String>,
        ttl: Option<TtlLease>,
    ) -> Option<Box<Extra>> {
        (!metadata.is_empty() || ttl.is_some()).then(|| Box::new(Extra { metadata, ttl }))
    }

    /// The Ttl lease, for a Ttl instance.
    pub(crate) fn ttl(&self) -> Option<&TtlLease> {
        self.extra.as_ref()?.ttl.as_ref()
    }

    /// The metadata (empty for most instances).
    pub(crate) fn metadata(&self) -> BTreeMap<String, String> {
        self.extra
            .as_ref()
            .map(|e| e.metadata.clone())
            .unwrap_or_default()
    }

    /// The flags of an instance with these healths and lapse.
    pub(crate) fn flags_of(healthy: bool, enabled: bool, lapsed: Option<bool>) -> u8 {
        let mut flags = 0;
        if healthy {
            flags |= HEALTHY;
        }
        if enabled {
            flags |= ENABLED;
        }
        match lapsed {
            Some(true) => flags | LAPSED | DECLARED,
            Some(false) => flags | LAPSED,
            None => flags,
        }
    }

    pub(crate) fn healthy(&self) -> bool {
        self.flags & HEALTHY != 0
    }

    pub(crate) fn enabled(&self) -> bool {
        self.flags & ENABLED != 0
    }

    /// `Some(declared health)` while expiry has the instance marked unhealthy.
    pub(crate) fn lapsed(&self) -> Option<bool> {
        (self.flags & LAPSED != 0).then_some(self.flags & DECLARED != 0)
    }

    pub(crate) fn set_lapsed(&mut self, lapsed: Option<bool>) {
        self.flags = Self::flags_of(self.healthy(), self.enabled(), lapsed);
    }

    /// When expiry next has something to do with it (Ttl), `None` for a session lease.
    pub(crate) fn due_ms(&self) -> Option<u64> {
        let ttl = self.ttl()?;
        Some(
            self.last_beat_ms
                .saturating_add(if self.lapsed().is_some() {
                    ttl.remove_after_ms
                } else {
                    ttl.unhealthy_after_ms
                }),
        )
    }
}

/// Interned names (clusters): each distinct name is held once, with a count of the
/// keys that use it, and dropped when the last one goes.
#[derive(Debug, Default)]
pub(crate) struct Names {
    ids: HashMap<Arc<str>, u32>,
    /// By id: the name and its use count; `None` for a free id.
    names: Vec<Option<(Arc<str>, usize)>>,
    free: Vec<u32>,
}

impl Names {
    /// The id of `name`, if any key uses it.
    pub(crate) fn find(&self, name: &str) -> Option<u32> {
        self.ids.get(name).copied()
    }

    /// The id of `name`, counting one more use.
    pub(crate) fn acquire(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.ids.get(name) {
            if let Some((_, uses)) = &mut self.names[id as usize] {
                *uses += 1;
            }
            return id;
        }
        let name: Arc<str> = Arc::from(name);
        let id = match self.free.pop() {
            Some(id) => {
                self.names[id as usize] = Some((name.clone(), 1));
                id
            }
            None => {
                self.names.push(Some((name.clone(), 1)));
                u32::try_from(self.names.len() - 1).expect("fewer than 2^32 names")
            }
        };
        self.ids.insert(name, id);
        id
    }

    /// One more use of `id`, a name already held.
    pub(crate) fn retain(&mut self, id: u32) {
        match &mut self.names[id as usize] {
            Some((_, uses)) => *uses += 1,
            None => debug_assert!(false, "retained a free name id {id}"),
        }
    }

    /// One use of `id` fewer; the name goes with its last use.
    pub(crate) fn release(&mut self, id: u32) {
        let slot = &mut self.names[id as usize];
        let Some((name, uses)) = slot else {
            debug_assert!(false, "released a free name id {id}");
            return;
        };
        *uses -= 1;
        if *uses == 0 {
            self.ids.remove(&**name);
            *slot = None;
            self.free.push(id);
        }
    }

    /// The name of a used id.
    pub(crate) fn name(&self, id: u32) -> &str {
        self.names[id as usize]
            .as_ref()
            .map_or("", |(name, _)| name)
    }

    /// How many names are held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }

    /// The use count of every name held.
    #[cfg(test)]
    pub(crate) fn uses(&self) -> BTreeMap<String, usize> {
        self.names
            .iter()
            .flatten()
            .map(|(n, u)| (n.to_string(), *u))
            .collect()
    }
}

/// The sessions that hold instances here, each with the instances it holds as
/// `(service id, key)`.
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    ids: HashMap<SessionId, u32>,
    /// Changes (to a value never used before in this process) whenever a session
    /// joins or leaves `ids`.
    pub(crate) generation: u64,
    /// By id; a free id has no members.
    slots: Vec<SessionSlot>,
    free: Vec<u32>,
}

/// One session and its instances.
///
/// Its instances are a list that a registration appends to, not a hash set: inserting
/// into a set of thousands of entries (one per session, each instance in a random place
/// of it) missed the cache on every registration, on every node; with the list a node
/// took about 7 % less CPU per registration (docs/benchmarks.md, twenty-fifth series). An
/// instance that leaves is noted in `gone` and dropped from the list once `gone` holds
/// more than half of it (and more than 16), so the list holds at most twice what the
/// session has, plus 16.
#[derive(Debug)]
pub(crate) struct SessionSlot {
    pub(crate) id: SessionId,
    /// Every instance the session holds, each once, and those it gave back since the
    /// list was last compacted (those are also in `gone`).
    held: Vec<(u32, Key)>,
    /// The entries of `held` that the session no longer holds.
    gone: HashSet<(u32, Key)>,
}

impl SessionSlot {
    fn new(id: SessionId) -> Self {
        SessionSlot {
            id,
            held: Vec::new(),
            gone: HashSet::new(),
        }
    }

    /// The instances the session holds, as `(service id, key)`, in no particular order.
    pub(crate) fn members(&self) -> impl Iterator<Item = &(u32, Key)> + '_ {
        self.held
            .iter()
            .filter(move |m| self.gone.is_empty() || !self.gone.contains(*m))
    }

    /// How many instances the session holds.
    pub(crate) fn len(&self) -> usize {
        self.held.len() - self.gone.len()
    }

    /// Drops the entries given back from the list, and most of its spare room.
    fn compact(&mut self) {
        let gone = std::mem::take(&mut self.gone);
        self.held.retain(|m| !gone.contains(m));
        if self.held.capacity() > 64 && self.held.len() * 4 < self.held.capacity() {
            self.held.shrink_to(self.held.len() * 2);
        }
    }
}

impl Sessions {
    /// Adds an instance to `session`, which does not hold it now; returns the
    /// session's id.
    pub(crate) fn attach(&mut self, session: SessionId, service: u32, key: Key) -> u32 {
        let id = match self.ids.get(&session) {
            Some(&id) => id,
            None => {
                let slot = SessionSlot::new(session);
                let id = match self.free.pop() {
                    Some(id) => {
                        self.slots[id as usize] = slot;
                        id
                    }
                    None => {
                        self.slots.push(slot);
                        u32::try_from(self.slots.len() - 1).expect("fewer than 2^32 sessions")
                    }
                };
                self.ids.insert(session, id);
                self.generation = crate::next_generation();
                id
            }
        };
        let slot = &mut self.slots[id as usize];
        // Taken back after giving it back: it is in the list already.
        if slot.gone.is_empty() || !slot.gone.remove(&(service, key)) {
            slot.held.push((service, key));
        }
        id
    }

    /// Removes an instance, which it holds, from the session `id`; the session goes
    /// with its last one.
    pub(crate) fn detach(&mut self, id: u32, service: u32, key: Key) {
        let slot = &mut self.slots[id as usize];
        let fresh = slot.gone.insert((service, key));
        debug_assert!(fresh, "an instance the session had given back already");
        if slot.len() == 0 {
            self.ids.remove(&slot.id);
            self.generation = crate::next_generation();
            slot.held = Vec::new();
            slot.gone = HashSet::new();
            self.free.push(id);
        } else if slot.gone.len() > 16 && slot.gone.len() * 2 > slot.held.len() {
            slot.compact();
        }
    }

    /// The session with id `id`.
    pub(crate) fn session(&self, id: u32) -> SessionId {
        self.slots[id as usize].id
    }

    /// A session's slot, if it holds instances here.
    pub(crate) fn get(&self, session: SessionId) -> Option<&SessionSlot> {
        self.ids.get(&session).map(|&id| &self.slots[id as usize])
    }

    /// The sessions that hold instances.
    pub(crate) fn ids(&self) -> impl Iterator<Item = SessionId> + '_ {
        self.ids.keys().copied()
    }

    /// Every session that holds instances, with its members.
    #[cfg(test)]
    pub(crate) fn all(&self) -> HashMap<SessionId, HashSet<(u32, Key)>> {
        self.ids
            .iter()
            .map(|(s, &id)| {
                let slot = &self.slots[id as usize];
                let members: HashSet<(u32, Key)> = slot.members().copied().collect();
                assert_eq!(members.len(), slot.len(), "an instance listed twice");
                assert!(
                    slot.gone.iter().all(|g| slot.held.contains(g)),
                    "given back but never held"
                );
                (*s, members)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session's list against a plain set, over a seeded sequence of instances taken
    /// and given back (some taken back after giving them back, some given back in
    /// bulk, which compacts the list): the same members every step, each listed once,
    /// the list never over twice the members (past the first few), and the session
    /// gone with its last instance and its id reused.
    #[test]
    fn session_list_follows_takes_and_give_backs() {
        let seed = 0x5e55_1017_u64;
        let mut rng = seed;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let key = |n: u64| Key {
            cluster: 0,
            ip: IpAddr::V4(std::net::Ipv4Addr::from(n as u32)),
            port: 80,
        };
        let session = SessionId(7);
        let mut sessions = Sessions::default();
        let mut want: HashSet<(u32, Key)> = HashSet::new();
        let mut id = None;
        for step in 0..20_000u64 {
            let m = ((next() % 5) as u32, key(next() % 300));
            if want.contains(&m) {
                sessions.detach(id.expect("attached"), m.0, m.1);
                want.remove(&m);
            } else {
                id = Some(sessions.attach(session, m.0, m.1));
                want.insert(m);
            }
            match sessions.get(session) {
                Some(slot) => {
                    let have: HashSet<(u32, Key)> = slot.members().copied().collect();
                    assert_eq!(have, want, "seed {seed:#x}, step {step}");
                    assert_eq!(slot.len(), want.len(), "seed {seed:#x}, step {step}");
                    assert!(
                        slot.held.len() <= 2 * want.len() + 17,
                        "seed {seed:#x}, step {step}: {} listed for {}",
                        slot.held.len(),
                        want.len()
                    );
                }
                None => assert!(want.is_empty(), "seed {seed:#x}, step {step}"),
            }
        }
        // Give back everything: the session goes, and its id is the next one given.
        let before = sessions.generation;
        for m in want.drain() {
            sessions.detach(id.expect("attached"), m.0, m.1);
        }
        assert!(sessions.get(session).is_none());
        assert_ne!(sessions.generation, before);
        assert_eq!(sessions.ids().count(), 0);
        assert_eq!(
            sessions.attach(SessionId(8), 0, key(1)),
            id.expect("attached")
        );
    }

    /// The byte-at-a-time parse agrees with the standard parser on every text tried:
    /// each octet value up to 300 in each place, written plainly, with a leading zero, a
    /// sign or a trailing space; texts at the edges of the form; and texts drawn from
    /// digits, dots, colons and two letters by a seeded generator (fixed seed: the edges
    /// are exhaustive, the rest a spread).
    #[test]
    fn parse_ip_agrees_with_the_standard_parser() {
        let same = |t: &str| {
            assert_eq!(parse_ip(t), t.parse::<IpAddr>().ok(), "{t:?}");
        };
        for v in 0..=300u32 {
            for at in 0..4 {
                for form in [
                    format!("{v}"),
                    format!("0{v}"),
                    format!("+{v}"),
                    format!("{v} "),
                ] {
                    let mut o: Vec<String> = ["1", "20", "203", "9"].map(String::from).to_vec();
                    o[at] = form;
                    same(&o.join("."));
                }
            }
        }
        for t in [
            "",
            ".",
            "...",
            "1.2.3",
            "1.2.3.4.",
            ".1.2.3.4",
            "1..2.3",
            "1.2.3.4.5",
            "0.0.0.0",
            "255.255.255.255",
            "256.0.0.0",
            "1.2.3.1000",
            "1111.2.3.4",
            "1.2.3.4\0",
            "::",
            "::1",
            "::ffff:1.2.3.4",
            "1:2:3:4:5:6:7:8",
            "fe80::1%eth0",
            "1.2.3.-4",
            "１.2.3.4",
            "000.0.0.0",
            "00.0.0.0",
            "1.2.3.4 ",
            " 1.2.3.4",
            "1.2.3.0x4",
            "123.123.123.123",
        ] {
            same(t);
        }
        let alphabet = b"0123456789.:ab";
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 17) as usize;
            let t: String = (0..len)
                .map(|i| alphabet[((x >> (i * 3 % 60)) as usize + i) % alphabet.len()] as char)
                .collect();
            same(&t);
        }
    }

    /// Keys that are equal hash alike, and keys that differ in any one field (the
    /// cluster, the address of either family, the port) do not collide here.
    #[test]
    fn keys_hash_by_every_field() {
        use std::hash::BuildHasher;
        use std::net::{Ipv4Addr, Ipv6Addr};
        let h = foldhash::fast::FixedState::with_seed(7);
        let k = |cluster, ip, port| Key { cluster, ip, port };
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        let base = k(1, v4, 8080);
        assert_eq!(h.hash_one(base), h.hash_one(k(1, v4, 8080)));
        let mut seen = std::collections::HashSet::new();
        for key in [
            base,
            k(2, v4, 8080),
            k(1, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), 8080),
            k(1, v4, 8081),
            k(1, v6, 8080),
            k(2, v6, 8080),
            k(1, v6, 8081),
            k(
                1,
                IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0x0a00, 1)),
                8080,
            ),
        ] {
            assert!(seen.insert(h.hash_one(key)), "{key:?} collides");
        }
    }

    /// The digit-by-digit text of an IPv4 address is the standard one: every value of
    /// every octet, and addresses from a seeded generator (the seed is fixed: the
    /// check is exhaustive per octet, the rest is a spread).
    #[test]
    fn ip_text_is_the_standard_text() {
        use std::net::{Ipv4Addr, Ipv6Addr};
        for v in 0..=255u8 {
            for at in 0..4 {
                let mut o = [1u8, 20, 203, 9];
                o[at] = v;
                let ip = IpAddr::V4(Ipv4Addr::from(o));
                assert_eq!(super::ip_text(&ip), ip.to_string());
            }
        }
        let mut x: u32 = 0x9e37_79b9;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let ip = IpAddr::V4(Ipv4Addr::from(x));
            assert_eq!(super::ip_text(&ip), ip.to_string());
        }
        for ip in [
            "::1",
            "fe80::1",
            "2001:db8::8:800:200c:417a",
            "::ffff:10.0.0.1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(super::ip_text(&ip), ip.to_string());
        }
        assert_eq!(super::ip_text(&IpAddr::V6(Ipv6Addr::UNSPECIFIED)), "::");
    }

    #[test]
    fn sizes() {
        // What one instance costs in the service's table (key and slot).
        assert_eq!(std::mem::size_of::<Key>(), 24);
        assert_eq!(std::mem::size_of::<Slot>(), 56);
    }

    #[test]
    fn names_are_counted_and_reused() {
        let mut n = Names::default();
        let a = n.acquire("a");
        assert_eq!(n.acquire("a"), a);
        let b = n.acquire("b");
        assert_ne!(a, b);
        assert_eq!(n.name(b), "b");
        n.release(a);
        assert_eq!(n.find("a"), Some(a));
        n.release(a);
        assert_eq!(n.find("a"), None);
        assert_eq!(n.acquire("c"), a);
        assert_eq!(n.len(), 2);
    }
}
