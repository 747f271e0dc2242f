//! Client-side load balancing: a weighted random choice among usable instances.

use rand::Rng;
use shoal_storage::Instance;

/// True if an instance may take traffic: healthy, enabled, and a positive weight.
pub fn is_usable(instance: &Instance) -> bool {
    instance.healthy && instance.enabled && instance.weight.is_finite() && instance.weight > 0.0
}

/// Picks one usable instance (see [`is_usable`]) at random, each with probability
/// proportional to its weight. `None` when no instance is usable.
///
/// The random source is a parameter so that a test can seed it:
///
/// ```
/// use rand::SeedableRng;
/// let mut rng = rand::rngs::StdRng::seed_from_u64(7);
/// assert!(shoal_client::choose_weighted(&[], &mut rng).is_none());
/// ```
pub fn choose_weighted<'a, R: Rng + ?Sized>(
    instances: &'a [Instance],
    rng: &mut R,
) -> Option<&'a Instance> {
    let total: f64 = instances
        .iter()
        .filter(|i| is_usable(i))
        .map(|i| i.weight)
        .sum();
    if !(total.is_finite() && total > 0.0) {
        return None;
    }
    let mut point = rng.random_range(0.0..total);
    let mut last = None;
    for instance in instances.iter().filter(|i| is_usable(i)) {
        if point < instance.weight {
            return Some(instance);
        }
        point -= instance.weight;
        last = Some(instance);
    }
    // Rounding in the subtractions can leave `point` a hair above the last weight.
    last
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use shoal_storage::{Lease, SessionId};
    use std::collections::BTreeMap;

    fn inst(port: u16, weight: f64, healthy: bool, enabled: bool) -> Instance {
        Instance {
            ip: "10.0.0.1".into(),
            port,
            cluster: "DEFAULT".into(),
            weight,
            healthy,
            enabled,
            metadata: BTreeMap::new(),
            lease: Lease::Session(SessionId(1)),
            last_beat_ms: 0,
            stamp: 0,
        }
    }

    #[test]
    fn never_picks_unhealthy_disabled_or_weightless() {
        let all = vec![
            inst(1, 1.0, false, true),
            inst(2, 1.0, true, false),
            inst(3, 0.0, true, true),
            inst(4, 1.0, true, true),
        ];
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..1000 {
            assert_eq!(choose_weighted(&all, &mut rng).map(|i| i.port), Some(4));
        }
    }

    #[test]
    fn none_when_nothing_is_usable() {
        let mut rng = StdRng::seed_from_u64(2);
        assert!(choose_weighted(&[], &mut rng).is_none());
        let all = vec![inst(1, 0.0, true, true), inst(2, 5.0, false, true)];
        assert!(choose_weighted(&all, &mut rng).is_none());
        let nan = vec![inst(1, f64::NAN, true, true)];
        assert!(choose_weighted(&nan, &mut rng).is_none());
    }

    #[test]
    fn picks_in_proportion_to_weight() {
        let seed = 0x5eed;
        let all = vec![
            inst(1, 1.0, true, true),
            inst(2, 3.0, true, true),
            inst(3, 6.0, true, true),
        ];
        let mut rng = StdRng::seed_from_u64(seed);
        let mut counts = [0u32; 3];
        let n = 100_000;
        for _ in 0..n {
            let port = choose_weighted(&all, &mut rng)
                .expect("usable instances")
                .port;
            counts[(port - 1) as usize] += 1;
        }
        for (i, want) in [0.1, 0.3, 0.6].iter().enumerate() {
            let got = counts[i] as f64 / n as f64;
            assert!(
                (got - want).abs() < 0.01,
                "seed {seed}: share of {i} is {got}, want {want}"
            );
        }
    }

    #[test]
    fn same_seed_same_choices() {
        let all = vec![inst(1, 1.0, true, true), inst(2, 2.0, true, true)];
        let pick = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..20)
                .map(|_| choose_weighted(&all, &mut rng).map(|i| i.port))
                .collect::<Vec<_>>()
        };
        assert_eq!(pick(9), pick(9));
    }
}
