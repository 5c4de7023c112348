//! Percentiles and the one-line-per-row table.

use std::time::Duration;

/// The `q`-quantile (0..=1) of `samples` (sorted in place), by nearest rank.
pub fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    let rank = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len());
    samples[rank - 1]
}

/// Formats nanoseconds for people: 12.3 µs.
pub fn human_ns(ns: u64) -> String {
    if ns >= 1_000_000 {
        format!("{:.2} ms", ns as f64 / 1e6)
    } else if ns >= 1_000 {
        format!("{:.1} µs", ns as f64 / 1e3)
    } else {
        format!("{ns} ns")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let mut s: Vec<Duration> = (1..=100).map(Duration::from_nanos).collect();
        assert_eq!(quantile(&mut s, 0.5), Duration::from_nanos(50));
        assert_eq!(quantile(&mut s, 0.99), Duration::from_nanos(99));
        assert_eq!(quantile(&mut [], 0.5), Duration::ZERO);
    }
}
