//! Latency samples and their percentiles.

use serde::Serialize;
use std::time::Duration;

/// Latencies of one phase, in microseconds, from every task of every client.
#[derive(Debug, Default)]
pub struct Samples {
    micros: Vec<u64>,
}

impl Samples {
    /// Room for `n` samples.
    pub fn with_capacity(n: usize) -> Self {
        Samples {
            micros: Vec::with_capacity(n),
        }
    }

    /// Adds one latency.
    pub fn record(&mut self, latency: Duration) {
        self.micros
            .push(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
    }

    /// Adds the samples of another task.
    pub fn merge(&mut self, other: Samples) {
        self.micros.extend(other.micros);
    }

    /// How many samples there are.
    pub fn len(&self) -> usize {
        self.micros.len()
    }

    /// Sorts the samples and summarizes them.
    pub fn summarize(mut self) -> Latency {
        self.micros.sort_unstable();
        let v = &self.micros;
        let mean = if v.is_empty() {
            0.0
        } else {
            v.iter().map(|&m| m as f64).sum::<f64>() / v.len() as f64
        };
        Latency {
            count: v.len(),
            mean_ms: mean / 1000.0,
            min_ms: v.first().map_or(0.0, |&m| m as f64 / 1000.0),
            p25_ms: percentile(v, 25.0),
            p50_ms: percentile(v, 50.0),
            p75_ms: percentile(v, 75.0),
            p90_ms: percentile(v, 90.0),
            p95_ms: percentile(v, 95.0),
            p99_ms: percentile(v, 99.0),
            p999_ms: percentile(v, 99.9),
            max_ms: v.last().map_or(0.0, |&m| m as f64 / 1000.0),
        }
    }
}

/// Percentiles of a phase's latencies, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Number of samples.
    pub count: usize,
    /// Mean.
    pub mean_ms: f64,
    /// Fastest sample.
    pub min_ms: f64,
    /// 25th percentile.
    pub p25_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 75th percentile.
    pub p75_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Slowest sample.
    pub max_ms: f64,
}

impl Latency {
    /// `(percentile, ms)` points of the distribution, for a plot.
    pub fn curve(&self) -> Vec<(f64, f64)> {
        if self.count == 0 {
            return Vec::new();
        }
        vec![
            (0.0, self.min_ms),
            (25.0, self.p25_ms),
            (50.0, self.p50_ms),
            (75.0, self.p75_ms),
            (90.0, self.p90_ms),
            (95.0, self.p95_ms),
            (99.0, self.p99_ms),
            (99.9, self.p999_ms),
            (100.0, self.max_ms),
        ]
    }
}

/// The nearest-rank percentile `p` (0..=100) of sorted microseconds, in milliseconds.
fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    let index = rank.clamp(1, sorted.len()) - 1;
    sorted[index] as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn summary_of_merged_samples() {
        let mut a = Samples::default();
        a.record(Duration::from_millis(3));
        let mut b = Samples::with_capacity(2);
        b.record(Duration::from_millis(1));
        b.record(Duration::from_millis(2));
        a.merge(b);
        assert_eq!(a.len(), 3);
        let l = a.summarize();
        assert_eq!(l.count, 3);
        assert_eq!(l.p50_ms, 2.0);
        assert_eq!(l.max_ms, 3.0);
        assert!((l.mean_ms - 2.0).abs() < 1e-9);
    }
}
