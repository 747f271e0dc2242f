//! Ownership properties over random keys and members.
//!
//! Every test draws from a seeded RNG and prints its seed; rerun a failure with
//! `SHOAL_TEST_SEED=<seed> cargo test -p shoal-ring --test properties`.

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use shoal_ring::{position, Member, Ring, RingError, DEFAULT_VNODES, MAX_VNODES_PER_MEMBER};

const KEYS: usize = 10_000;

fn rng(test: &str) -> StdRng {
    let seed = match std::env::var("SHOAL_TEST_SEED") {
        Ok(s) => s.parse().expect("SHOAL_TEST_SEED must be a u64"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    };
    println!("{test}: SHOAL_TEST_SEED={seed}");
    StdRng::seed_from_u64(seed)
}

fn word(rng: &mut StdRng, max_len: usize) -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789-_.:";
    let len = rng.random_range(1..=max_len);
    (0..len)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}

/// Random `ServiceKey::placement_bytes`-shaped keys.
fn random_keys(rng: &mut StdRng, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|_| {
            let mut out = Vec::new();
            for part in [word(rng, 8), word(rng, 16), word(rng, 40)] {
                out.extend_from_slice(&(part.len() as u32).to_le_bytes());
                out.extend_from_slice(part.as_bytes());
            }
            out
        })
        .collect()
}

fn random_members(rng: &mut StdRng, n: usize) -> Vec<Member> {
    let mut ids = BTreeSet::new();
    while ids.len() < n {
        ids.insert(format!("node-{}", word(rng, 12)));
    }
    ids.into_iter().map(Member::new).collect()
}

fn owners(ring: &Ring, keys: &[Vec<u8>]) -> Vec<String> {
    keys.iter()
        .map(|k| ring.owner(k).unwrap().to_owned())
        .collect()
}

#[test]
fn insertion_order_does_not_change_any_owner() {
    let mut rng = rng("insertion_order");
    let keys = random_keys(&mut rng, KEYS);
    let members = random_members(&mut rng, 7);
    let base = Ring::from_members(DEFAULT_VNODES, members.clone()).unwrap();
    let expected = owners(&base, &keys);
    for _ in 0..5 {
        let mut shuffled = members.clone();
        shuffled.shuffle(&mut rng);
        let at_once = Ring::from_members(DEFAULT_VNODES, shuffled.clone()).unwrap();
        let mut one_by_one = Ring::new(DEFAULT_VNODES).unwrap();
        for m in shuffled {
            one_by_one.add(m).unwrap();
        }
        // A member that came and went leaves no trace.
        one_by_one.add(Member::new("transient")).unwrap();
        one_by_one.remove("transient").unwrap();
        for ring in [&at_once, &one_by_one] {
            assert_eq!(ring, &base);
            assert_eq!(owners(ring, &keys), expected);
            assert_eq!(ring.ranges(), base.ranges());
            assert_eq!(ring.ownership_shares(), base.ownership_shares());
        }
    }
}

#[test]
fn removing_one_of_five_moves_exactly_its_keys() {
    let mut rng = rng("remove_one_of_five");
    let keys = random_keys(&mut rng, KEYS);
    let members = random_members(&mut rng, 5);
    let before = Ring::from_members(DEFAULT_VNODES, members.clone()).unwrap();
    let before_owners = owners(&before, &keys);
    for gone in &members {
        let mut after = before.clone();
        assert_eq!(after.remove(&gone.id), Some(gone.clone()));
        let owned: Vec<usize> = (0..keys.len())
            .filter(|&i| before_owners[i] == gone.id)
            .collect();
        let moved = before.diff(&after, &keys);
        assert_eq!(moved, owned, "removing {} moved other keys", gone.id);
        assert_eq!(Ring::moved(&before, &after, &keys), owned.len());
        let fraction = moved.len() as f64 / keys.len() as f64;
        println!(
            "removing {}: {:.1}% of keys moved",
            gone.id,
            fraction * 100.0
        );
        assert!((0.10..=0.30).contains(&fraction));
    }
    // For comparison, Distro's `members[hash % N]` going from 5 to 4 members moves about
    // 80% of the keys (only keys with hash % 20 in 0..4 keep their owner).
    let modulo = modulo_moved(&keys, 5, Some(2));
    println!("hash % N, removing 1 of 5: {:.1}% moved", modulo * 100.0);
    assert!(modulo > 0.7);
}

#[test]
fn adding_a_sixth_moves_about_a_sixth_and_only_to_it() {
    let mut rng = rng("add_sixth");
    let keys = random_keys(&mut rng, KEYS);
    let members = random_members(&mut rng, 6);
    let (new, five) = members.split_last().unwrap();
    let before = Ring::from_members(DEFAULT_VNODES, five.iter().cloned()).unwrap();
    let mut after = before.clone();
    assert_eq!(after.add(new.clone()).unwrap(), None);
    let moved = before.diff(&after, &keys);
    for &i in &moved {
        assert_eq!(after.owner(&keys[i]), Some(new.id.as_str()));
    }
    // Every key the new member owns moved to it.
    let now_owned = keys
        .iter()
        .filter(|k| after.owner(k) == Some(&new.id))
        .count();
    assert_eq!(now_owned, moved.len());
    let fraction = moved.len() as f64 / keys.len() as f64;
    println!("adding {}: {:.1}% of keys moved", new.id, fraction * 100.0);
    assert!(
        (0.10..=0.25).contains(&fraction),
        "moved {fraction}, expected about 1/6"
    );
    // For comparison, `hash % N` going from 5 to 6 members moves about 83% of the keys
    // (only hash % 30 in 0..5 keeps its owner).
    let modulo = modulo_moved(&keys, 5, None);
    println!("hash % N, adding a 6th to 5: {:.1}% moved", modulo * 100.0);
    assert!(modulo > 0.7);
}

/// The share of keys that change owner under `members[hash % members.len()]` when
/// member `removed` leaves a list of `n`, or (with `None`) a member joins at the end.
fn modulo_moved(keys: &[Vec<u8>], n: usize, removed: Option<usize>) -> f64 {
    let before: Vec<usize> = (0..n).collect();
    let after: Vec<usize> = match removed {
        Some(r) => before.iter().copied().filter(|&m| m != r).collect(),
        None => (0..=n).collect(),
    };
    let moved = keys
        .iter()
        .filter(|k| {
            let h = position(k);
            before[(h % before.len() as u64) as usize] != after[(h % after.len() as u64) as usize]
        })
        .count();
    moved as f64 / keys.len() as f64
}

#[test]
fn weights_give_proportional_shares() {
    let mut rng = rng("weights");
    let keys = random_keys(&mut rng, KEYS);
    let members: Vec<Member> = random_members(&mut rng, 4)
        .into_iter()
        .zip(1..)
        .map(|(m, w)| Member::with_weight(m.id, w))
        .collect();
    let ring = Ring::from_members(DEFAULT_VNODES, members.clone()).unwrap();
    assert_eq!(ring.vnode_count(), 10 * DEFAULT_VNODES as usize);
    let shares = ring.ownership_shares();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for k in &keys {
        *counts.entry(ring.owner(k).unwrap()).or_default() += 1;
    }
    for m in &members {
        let expected = f64::from(m.weight) / 10.0;
        let exact = shares[&m.id];
        let sampled = counts[m.id.as_str()] as f64 / keys.len() as f64;
        println!(
            "{} weight {}: exact share {:.3}, keys {:.3}, expected {expected:.3}",
            m.id, m.weight, exact, sampled
        );
        // A weight-1 member has 256 vnodes: its share's relative std dev is about
        // 1/sqrt(256) = 6%, plus about 3% of sampling noise for 10,000 keys.
        assert!((exact / expected - 1.0).abs() < 0.3, "{}: {exact}", m.id);
        assert!(
            (sampled / expected - 1.0).abs() < 0.3,
            "{}: {sampled}",
            m.id
        );
    }
}

#[test]
fn raising_a_weight_moves_keys_only_to_that_member() {
    let mut rng = rng("raise_weight");
    let keys = random_keys(&mut rng, KEYS);
    let members = random_members(&mut rng, 5);
    let before = Ring::from_members(DEFAULT_VNODES, members.clone()).unwrap();
    let heavier = Member::with_weight(members[0].id.clone(), 3);
    let mut after = before.clone();
    assert_eq!(
        after.add(heavier.clone()).unwrap(),
        Some(members[0].clone())
    );
    assert_eq!(after.member(&heavier.id), Some(&heavier));
    let moved = before.diff(&after, &keys);
    assert!(!moved.is_empty());
    for i in moved {
        assert_eq!(after.owner(&keys[i]), Some(heavier.id.as_str()));
    }
}

#[test]
fn ranges_agree_with_owner() {
    let mut rng = rng("ranges");
    let keys = random_keys(&mut rng, KEYS);
    let ring = Ring::from_members(DEFAULT_VNODES, random_members(&mut rng, 5)).unwrap();
    let ranges = ring.ranges();
    assert!(ranges.len() > 5 && ranges.len() <= ring.vnode_count());
    let total: u128 = ranges.iter().map(|r| r.width()).sum();
    assert_eq!(total, 1u128 << 64);
    for k in &keys {
        let pos = ring.position(k);
        let i = ring.range_index(k).unwrap();
        let r = ring.range_of(k).unwrap();
        assert_eq!(&ranges[i], r);
        assert!(r.contains(pos));
        assert_eq!(ranges.iter().filter(|r| r.contains(pos)).count(), 1);
        assert_eq!(ring.owner(k), Some(r.owner.as_str()));
        assert_eq!(ring.owner_at(pos), Some(r.owner.as_str()));
    }
    // The ends of the position space.
    for pos in [0, 1, u64::MAX - 1, u64::MAX] {
        let r = &ranges[ring.range_index_at(pos).unwrap()];
        assert!(r.contains(pos));
        assert_eq!(ring.owner_at(pos), Some(r.owner.as_str()));
    }
}

#[test]
fn owners_lists_distinct_members_starting_with_the_owner() {
    let mut rng = rng("owners");
    let keys = random_keys(&mut rng, 1000);
    let ring = Ring::from_members(64, random_members(&mut rng, 5)).unwrap();
    for k in &keys {
        let three = ring.owners(k, 3);
        assert_eq!(three.len(), 3);
        assert_eq!(Some(three[0]), ring.owner(k));
        assert_eq!(three.iter().collect::<BTreeSet<_>>().len(), 3);
        let all = ring.owners(k, 10);
        assert_eq!(all.len(), 5);
        assert_eq!(&all[..3], &three[..]);
    }
    assert!(ring.owners(&keys[0], 0).is_empty());
}

#[test]
fn single_member_owns_everything() {
    let ring = Ring::from_members(DEFAULT_VNODES, ["only"]).unwrap();
    assert_eq!(ring.owner(b"anything"), Some("only"));
    assert_eq!(ring.ranges().len(), 1);
    assert_eq!(ring.ranges()[0].start, 0);
    assert_eq!(ring.ranges()[0].end, u64::MAX);
    assert_eq!(ring.ownership_shares()["only"], 1.0);
    let one_vnode = Ring::from_members(1, ["only"]).unwrap();
    assert_eq!(one_vnode.ownership_shares()["only"], 1.0);
    assert_eq!(one_vnode.ranges()[0].width(), 1u128 << 64);
}

#[test]
fn empty_and_weightless_rings_own_nothing() {
    let empty = Ring::default();
    assert!(empty.is_empty());
    assert_eq!(empty.vnodes_per_weight(), DEFAULT_VNODES);
    assert_eq!(empty.owner(b"k"), None);
    assert_eq!(empty.owner_at(7), None);
    assert!(empty.ranges().is_empty());
    assert_eq!(empty.range_of(b"k"), None);
    assert!(empty.owners(b"k", 2).is_empty());
    assert!(empty.ownership_shares().is_empty());

    let mut ring = Ring::from_members(16, [Member::with_weight("idle", 0)]).unwrap();
    assert_eq!(ring.len(), 1);
    assert_eq!(ring.owner(b"k"), None);
    assert_eq!(ring.ownership_shares()["idle"], 0.0);
    ring.add("busy").unwrap();
    assert_eq!(ring.owner(b"k"), Some("busy"));
    assert_eq!(ring.ownership_shares()["idle"], 0.0);
    assert_eq!(ring.ownership_shares()["busy"], 1.0);
}

#[test]
fn invalid_input_is_rejected_and_changes_nothing() {
    assert_eq!(Ring::new(0).unwrap_err(), RingError::ZeroVnodes);
    assert_eq!(
        Ring::from_members(8, ["a", "b", "a"]).unwrap_err(),
        RingError::DuplicateMember("a".into())
    );
    assert_eq!(Ring::from_members(8, [""]).unwrap_err(), RingError::EmptyId);
    assert!(matches!(
        Ring::from_members(8, ["x".repeat(5000)]).unwrap_err(),
        RingError::IdTooLong(5000)
    ));

    let mut ring = Ring::from_members(8, ["a", "b"]).unwrap();
    let before = ring.clone();
    let err = ring
        .add(Member::with_weight("c", MAX_VNODES_PER_MEMBER / 8 + 1))
        .unwrap_err();
    assert!(matches!(err, RingError::TooManyVnodes { .. }), "{err}");
    assert!(ring.add(Member::with_weight("d", u32::MAX)).is_err());
    assert!(ring.add("").is_err());
    assert_eq!(ring, before);
    assert_eq!(ring.remove("missing"), None);
    assert_eq!(ring, before);
    assert!(ring
        .add(Member::with_weight("c", MAX_VNODES_PER_MEMBER / 8))
        .is_ok());
}

#[test]
fn members_are_sorted_by_id() {
    let ring = Ring::from_members(8, ["c", "a", "b"]).unwrap();
    let ids: Vec<&str> = ring.members().iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c"]);
    assert!(ring.contains("b"));
    assert!(!ring.contains("d"));
    assert_eq!(ring.len(), 3);
    assert_eq!(ring.vnode_count(), 24);
}
