//! Resident memory of the registry per instance held.
//!
//! Registers `sessions x per_session` instances (default 2 000 x 100 = 200 000) the
//! way a node does as the services' owner: session leases, default cluster, IPv4
//! addresses, no metadata, instance `g` in service `g mod services` (as the `register`
//! scenario of `shoal-bench compare` spreads them), with replication on and the
//! recorded operations drained as the node's replication engine drains them. Then a
//! second registry takes every service's record (each operation through
//! `apply_remote`), as a node that holds the services as a copy does (in a 3-node
//! cluster each node holds a third as owner and the rest as copies). Finally the
//! first registry ends every session, which leaves a tombstone per instance, and the
//! copy takes the recorded deletions (each through `apply_remote`).
//!
//! Reports, per instance: the bytes the registry holds allocated (a counting global
//! allocator: requested sizes, no allocator overhead) and the growth of the process's
//! resident set (from /proc/self/statm, which includes the allocator's overhead).
//!
//! ```text
//! cargo run --release -p shoal-storage --example memory [sessions] [per_session] [services]
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use shoal_storage::{
    InstanceSpec, Limits, Registry, ReplicationSettings, ServiceKey, SessionId, DEFAULT_GROUP,
    DEFAULT_NAMESPACE,
};

/// The system allocator, counting the bytes allocated and not yet freed.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            LIVE.fetch_add(new_size, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// Resident set size of this process, in bytes.
fn rss() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|f| f.parse().ok())
        .expect("resident field");
    pages * 4096
}

fn per(bytes_before: usize, bytes_after: usize, n: usize) -> f64 {
    (bytes_after as f64 - bytes_before as f64) / n as f64
}

fn arg(i: usize, default: usize) -> usize {
    std::env::args()
        .nth(i)
        .map(|a| a.parse().expect("a number"))
        .unwrap_or(default)
}

fn main() {
    let sessions = arg(1, 2_000);
    let per_session = arg(2, 100);
    let services = arg(3, 2_000);
    let n = sessions * per_session;
    let keys: Vec<ServiceKey> = (0..services)
        .map(|k| ServiceKey::new(DEFAULT_NAMESPACE, DEFAULT_GROUP, format!("svc-{k:05}")))
        .collect();
    let session_ids: Vec<SessionId> = (0..sessions)
        .map(|s| SessionId(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c834 ^ (s as u128 * 0x1_0001)))
        .collect();
    println!("{sessions} sessions x {per_session} instances over {services} services: {n}");

    let mut owner = Registry::new(Limits::default());
    owner.set_replication(ReplicationSettings {
        origin: 1,
        record_ops: true,
        ..ReplicationSettings::default()
    });
    let mut copy = Registry::new(Limits::default());
    copy.set_replication(ReplicationSettings {
        origin: 2,
        record_ops: true,
        ..ReplicationSettings::default()
    });

    let (live0, rss0) = (live(), rss());
    let mut now = 1_700_000_000_000u64;
    for (s, session) in session_ids.iter().enumerate() {
        for i in 0..per_session {
            let g = s * per_session + i;
            let ip = format!("10.{}.{}.{}", (g >> 16) & 0xff, (g >> 8) & 0xff, g & 0xff);
            let port = 8080 + u16::try_from(g >> 24).unwrap_or(0);
            owner
                .register(
                    &keys[g % services],
                    InstanceSpec::new(ip, port),
                    *session,
                    now,
                )
                .expect("register");
            if g % 64 == 63 {
                drop(owner.take_ops());
                now += 1;
            }
        }
    }
    drop(owner.take_ops());
    let (live1, rss1) = (live(), rss());
    assert_eq!(owner.instance_count(), n);
    println!(
        "owner (register):    {:7.1} B/instance allocated, {:7.1} B/instance RSS",
        per(live0, live1, n),
        per(rss0, rss1, n)
    );

    // The copy takes the services' records one at a time (as a snapshot or a repair
    // brings them; each operation goes through apply_remote).
    let (live2, rss2) = (live(), rss());
    for k in &keys {
        if let Some(record) = owner.record(k) {
            copy.apply_record(record, now).expect("apply");
        }
    }
    let (live3, rss3) = (live(), rss());
    assert_eq!(copy.instance_count(), n);
    println!(
        "copy (apply_record): {:7.1} B/instance allocated, {:7.1} B/instance RSS",
        per(live2, live3, n),
        per(rss2, rss3, n)
    );
    assert_eq!(copy.dump_replicated(), owner.dump_replicated());

    // Every session ends: the instances go, tombstones stay (until collected). The
    // copy takes each session's deletions as a peer does (each through apply_remote),
    // so both registries end up the same and no operation stays queued.
    let before = live();
    let (mut removed, mut ops) = (0, 0);
    for session in &session_ids {
        removed += owner.remove_session(*session).len();
        for op in owner.take_ops() {
            ops += 1;
            copy.apply_remote(op, now).expect("apply deletion");
        }
    }
    assert_eq!(owner.instance_count(), 0);
    assert_eq!(copy.instance_count(), 0);
    assert_eq!(copy.dump_replicated(), owner.dump_replicated());
    drop(copy.take_ops());
    println!(
        "owner and copy after every session ended: {removed} changes, {ops} deletions sent, {} tombstones each, {:+.1} B/instance allocated in each",
        owner.tombstone_count(),
        per(before, live(), 2 * n)
    );
}
