//! A/B routing: picks a variant by weight, sticky per routing key.
//!
//! Weighted rendezvous hashing: every variant scores `-ln(u) / weight` with `u` a hash of
//! (key, variant) in (0, 1], and the lowest score wins. A key therefore always lands on the same
//! variant, variants win in proportion to their weights, and changing one weight only moves the
//! keys that must move.

use std::sync::atomic::{AtomicU64, Ordering};

/// Variant names with their routing weights (0: reachable by name only).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Router {
    weights: Vec<(String, f64)>,
}

static ANONYMOUS: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);

impl Router {
    pub fn new(weights: Vec<(String, f64)>) -> Self {
        Self { weights }
    }

    /// The routing weight of `variant` (0 when it has none).
    pub fn weight(&self, variant: &str) -> f64 {
        self.weights
            .iter()
            .find(|(name, _)| name == variant)
            .map_or(0., |(_, w)| *w)
    }

    /// The variant for `routing_key`; an empty key gets a fresh random one.
    pub fn pick(&self, routing_key: &str) -> Option<&str> {
        let key = if routing_key.is_empty() {
            random_u64()
        } else {
            fnv1a(routing_key.as_bytes())
        };
        self.weights
            .iter()
            .filter(|(_, w)| *w > 0.)
            .map(|(name, w)| {
                let h = mix(key ^ fnv1a(name.as_bytes()));
                // Top 53 bits to a float in (0, 1].
                let u = ((h >> 11) + 1) as f64 / (1u64 << 53) as f64;
                (name.as_str(), -u.ln() / w)
            })
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(name, _)| name)
    }
}

fn random_u64() -> u64 {
    mix(ANONYMOUS.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed))
}

/// True with probability `fraction`.
pub fn sample(fraction: f64) -> bool {
    fraction >= 1. || ((random_u64() >> 11) as f64 / (1u64 << 53) as f64) < fraction
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// splitmix64's finaliser: spreads every input bit over the output.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_by_weight_and_sticks_per_key() {
        let router = Router::new(vec![("a".into(), 3.), ("b".into(), 1.), ("c".into(), 0.)]);
        let n = 20_000;
        let a = (0..n)
            .filter(|i| router.pick(&format!("user-{i}")) == Some("a"))
            .count();
        // 75% expected; 4 sigma of a binomial(20000, 0.75) is about 1.2 points.
        assert!((a as f64 / n as f64 - 0.75).abs() < 0.012, "{a}");
        assert!((0..1000).all(|_| router.pick("user-7") == router.pick("user-7")));
        assert!((0..1000).all(|_| router.pick("") != Some("c")));
    }
}
