//! Golden vectors: property 5 of the brief, "same owner everywhere". Nodes of different
//! versions of Shoal, on different platforms, must place every key on the same owner, so
//! these values are hard-coded. If this test fails, the hashing, the bytes fed to it, the
//! tie-breaking or `DEFAULT_VNODES` changed: that breaks mixed-version clusters and must
//! not ship without a migration plan.
//!
//! The values were cross-checked with an independent Python implementation of the same
//! algorithm (in `docs/ring.md`).

use shoal_ring::{
    position, stable_hash, vnode_bytes, vnode_position, Member, Ring, DEFAULT_VNODES,
};

/// `ServiceKey::placement_bytes`: each part as `u32 LE length || UTF-8 bytes`.
fn placement_bytes(namespace: &str, group: &str, service: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for part in [namespace, group, service] {
        out.extend_from_slice(&(part.len() as u32).to_le_bytes());
        out.extend_from_slice(part.as_bytes());
    }
    out
}

fn golden_ring() -> Ring {
    Ring::from_members(
        DEFAULT_VNODES,
        [
            Member::new("shoal-a"),
            Member::new("shoal-b"),
            Member::with_weight("shoal-c", 2),
            Member::new("10.0.0.7:7700"),
            Member::new("node-δ"),
        ],
    )
    .unwrap()
}

/// (namespace, group, service, position, owner) in the golden ring.
const KEYS: [(&str, &str, &str, u64, &str); 20] = [
    (
        "public",
        "DEFAULT_GROUP",
        "svc-0",
        0x8b1b8bb348996a6a,
        "node-δ",
    ),
    (
        "public",
        "DEFAULT_GROUP",
        "svc-1",
        0x0f0a416e32a0512d,
        "shoal-b",
    ),
    (
        "public",
        "DEFAULT_GROUP",
        "svc-2",
        0x6f5c79f1f30f1873,
        "shoal-b",
    ),
    (
        "public",
        "DEFAULT_GROUP",
        "svc-3",
        0xc6a425c7b24d239e,
        "shoal-c",
    ),
    (
        "public",
        "DEFAULT_GROUP",
        "svc-4",
        0x2705ef54c1968636,
        "shoal-a",
    ),
    (
        "public",
        "DEFAULT_GROUP",
        "svc-5",
        0x446babf3d3f99b76,
        "shoal-c",
    ),
    (
        "public",
        "DEFAULT_GROUP",
        "svc-6",
        0xde4d92b76198725f,
        "shoal-a",
    ),
    (
        "public",
        "DEFAULT_GROUP",
        "svc-7",
        0x8fbf164c78d3acc6,
        "10.0.0.7:7700",
    ),
    (
        "public",
        "DEFAULT_GROUP",
        "svc-8",
        0xcd3294e6b343a2ac,
        "node-δ",
    ),
    (
        "public",
        "DEFAULT_GROUP",
        "svc-9",
        0xca50bf38b1155966,
        "shoal-b",
    ),
    (
        "public",
        "DEFAULT_GROUP",
        "svc-10",
        0x5426378ac8800fb1,
        "shoal-c",
    ),
    (
        "public",
        "DEFAULT_GROUP",
        "svc-11",
        0xe3c39d61313db098,
        "shoal-c",
    ),
    (
        "public",
        "DEFAULT_GROUP",
        "svc-12",
        0x81a2e98afc87dab8,
        "node-δ",
    ),
    (
        "public",
        "DEFAULT_GROUP",
        "svc-13",
        0x329af8702d6486c3,
        "shoal-c",
    ),
    (
        "public",
        "DEFAULT_GROUP",
        "order-service",
        0x605dc7422e02009c,
        "node-δ",
    ),
    ("prod", "payments", "ledger", 0xe8babf49f873401e, "node-δ"),
    (
        "prod",
        "payments",
        "ledger-v2",
        0xf80cea0930331989,
        "shoal-b",
    ),
    (
        "dev",
        "DEFAULT_GROUP",
        "user-service",
        0xc70df70390672351,
        "node-δ",
    ),
    ("a", "bc", "d", 0x9e81e5d656d0378c, "shoal-a"),
    ("ab", "c", "d", 0x416272f1a3f7c21b, "10.0.0.7:7700"),
];

/// (member id, vnode index, position).
const VNODES: [(&str, u32, u64); 5] = [
    ("shoal-a", 0, 0xc8a7dc6e10b8e01d),
    ("shoal-a", 1, 0x8bb7292f7012fe72),
    ("shoal-c", 511, 0xcf5c239f591ee823),
    ("node-δ", 0, 0x065eb8058f0c6e9f),
    ("10.0.0.7:7700", 255, 0xa11b35006a08c44f),
];

#[test]
fn default_vnodes_is_pinned() {
    assert_eq!(
        DEFAULT_VNODES, 256,
        "changing DEFAULT_VNODES moves most keys between versions"
    );
}

#[test]
fn hash_of_empty_input() {
    // fmix64 of the FNV-1a 64 offset basis.
    assert_eq!(stable_hash(b""), 0xefd01f60ba992926);
    assert_eq!(position(b""), 0xefd01f60ba992926);
}

#[test]
fn vnode_positions() {
    for (id, index, pos) in VNODES {
        assert_eq!(vnode_position(id, index), pos, "vnode {index} of {id}");
        assert_eq!(stable_hash(&vnode_bytes(id, index)), pos);
    }
}

#[test]
fn key_positions_and_owners() {
    let ring = golden_ring();
    assert_eq!(ring.vnode_count(), 6 * 256, "no collisions expected here");
    for (namespace, group, service, pos, owner) in KEYS {
        let key = placement_bytes(namespace, group, service);
        assert_eq!(
            position(&key),
            pos,
            "position of {namespace}/{group}/{service}"
        );
        assert_eq!(ring.position(&key), pos);
        assert_eq!(
            ring.owner(&key),
            Some(owner),
            "owner of {namespace}/{group}/{service}"
        );
        assert_eq!(ring.owners(&key, 1), vec![owner]);
    }
}

#[test]
fn ownership_shares() {
    // Exact shares of the golden ring, to 1e-12.
    let expected = [
        ("10.0.0.7:7700", 0.16595166072563247),
        ("node-δ", 0.1864781422339692),
        ("shoal-a", 0.15164249468367882),
        ("shoal-b", 0.17708656879564452),
        ("shoal-c", 0.31884113356107496),
    ];
    let shares = golden_ring().ownership_shares();
    assert_eq!(shares.len(), expected.len());
    for (id, share) in expected {
        assert!((shares[id] - share).abs() < 1e-12, "{id}: {}", shares[id]);
    }
}
