//! Every timing and limit of the engine, in one place.

/// The engine's settings. Every timing is in milliseconds of the clock the caller passes
/// as `now_ms`. Defaults are documented in `docs/replication.md`.
///
/// It is also the `[replication]` table of a node's configuration file, hence serde;
/// `session_grace_ms` is not read from that table (the node sets it from its own
/// top-level `session_grace_ms`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// How long a change may wait in a peer's batch before the batch leaves.
    pub batch_window_ms: u64,
    /// A batch leaves at once when it holds this many operations and announcements.
    pub batch_max_ops: usize,
    /// How often each member is pinged.
    pub probe_interval_ms: u64,
    /// A member not heard from for this long is Suspect (still owns its services).
    pub suspect_after_ms: u64,
    /// A member not heard from for this long is Down (leaves the ring).
    pub down_after_ms: u64,
    /// How often an owner sends each peer the digests of the ranges it owns.
    pub anti_entropy_interval_ms: u64,
    /// How long the instances of a disconnected, orphaned or unknown session are kept
    /// before the owners delete them.
    #[serde(skip)]
    pub session_grace_ms: u64,
    /// How long a starting node waits to hear from a ready peer before it declares
    /// itself ready with what it has (cold start of a whole cluster).
    pub bootstrap_wait_ms: u64,
    /// How long a deletion's tombstone is kept (it stops a late, older write from
    /// bringing the record back).
    pub tombstone_ttl_ms: u64,
    /// Liveness deletions stop while more than this share of the other members is Down.
    pub self_preservation_fraction: f64,
    /// Vnodes per member on the ring. Every node of a cluster must use the same value.
    pub vnodes: u32,
    /// Services per snapshot chunk and per anti-entropy repair message.
    pub chunk_max_services: usize,
    /// Operations (instances, tombstones, settings) per snapshot chunk and repair
    /// message: a chunk ends once it holds this many (a single larger service still
    /// goes whole). Keeps peer messages far below `peer_max_frame_bytes`.
    pub chunk_max_ops: usize,
    /// Services an owner repairs with one peer per anti-entropy exchange, at most
    /// (those that changed here longest ago first: the recent ones are likely in a
    /// batch on its way). Under heavy writes many services differ at any moment;
    /// without a bound every round would resend a large part of the registry.
    pub repair_max_services: usize,
    /// How long a snapshot request may go unanswered before it is asked again
    /// (possibly of another peer).
    pub snapshot_timeout_ms: u64,
    /// For this long after its ring changed, it became ready or it resumed from a
    /// stall, a node's copy may miss writes made elsewhere (anti-entropy has not run
    /// yet): a Deregister of an instance it does not hold is still answered NotFound,
    /// but also leaves a tombstone with a fresh stamp, which deletes the older copies
    /// that other nodes may hold.
    pub settle_ms: u64,
    /// A forwarded write that arrives later than this after it was sent is refused
    /// unapplied (its sender has given up on it). Not read from the `[replication]`
    /// table: the node sets it from its `forward_timeout_ms`.
    #[serde(skip)]
    pub forward_ttl_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            batch_window_ms: 5,
            batch_max_ops: 512,
            probe_interval_ms: 500,
            suspect_after_ms: 1_500,
            down_after_ms: 2_500,
            anti_entropy_interval_ms: 5_000,
            session_grace_ms: 10_000,
            bootstrap_wait_ms: 2_000,
            tombstone_ttl_ms: 60_000,
            self_preservation_fraction: 0.5,
            vnodes: shoal_ring::DEFAULT_VNODES,
            chunk_max_services: 256,
            chunk_max_ops: 4_096,
            repair_max_services: 256,
            snapshot_timeout_ms: 3_000,
            settle_ms: 10_000,
            forward_ttl_ms: 2_000,
        }
    }
}

impl Config {
    /// How often the caller's timer must run [`crate::Replica::tick`] while no batch
    /// waits ([`crate::Replica::has_queued`]): a tenth of `probe_interval_ms`, at most
    /// 50 ms and at least `batch_window_ms`. The engine's other timers (probes,
    /// suspicion, anti-entropy, leases, snapshot retries) are then late by at most that.
    pub fn idle_tick_ms(&self) -> u64 {
        let window = self.batch_window_ms.max(1);
        (self.probe_interval_ms / 10).clamp(window, 50.max(window))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_idle_tick_is_a_tenth_of_the_probe_interval_within_its_bounds() {
        let mut c = Config::default();
        assert_eq!(c.idle_tick_ms(), 50);
        c.probe_interval_ms = 100;
        assert_eq!(c.idle_tick_ms(), 10);
        c.probe_interval_ms = 10;
        assert_eq!(c.idle_tick_ms(), 5, "never below the batch window");
        c.probe_interval_ms = 5_000;
        assert_eq!(c.idle_tick_ms(), 50, "never above 50 ms");
        c.batch_window_ms = 80;
        assert_eq!(c.idle_tick_ms(), 80, "never below the batch window");
    }
}
