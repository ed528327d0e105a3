//! A/B routing: picks a variant by weight, sticky per routing key.
//!
//! Weighted rendezvous hashing: every variant scores `-ln(u) / weight` with `u` a hash of
//! (key, variant) in (0, 1], and the lowest score wins. A key therefore always lands on the same
//! variant, variants win in proportion to their weights, and changing one weight only moves the
//! keys that must move.
//!
//! Keys and names are hashed with FNV-1a (`fnv`), then spread by splitmix64's finaliser: FNV
//! alone moves few high bits for keys that differ in their last byte (`user-1`, `user-2`),
//! and the score reads the high bits. Requests without a key draw from `fastrand`.

use std::hash::Hasher;

/// Variant names with their routing weights (0: reachable by name only).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Router {
    weights: Vec<(String, f64)>,
}

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
            fastrand::u64(..)
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

/// True with probability `fraction`.
pub fn sample(fraction: f64) -> bool {
    fraction >= 1. || fastrand::f64() < fraction
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hasher = fnv::FnvHasher::default();
    hasher.write(bytes);
    hasher.finish()
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

    #[test]
    fn keys_hash_as_fnv1a_64_so_they_keep_their_variant_across_releases() {
        // The FNV-1a 64 test vectors of its authors.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
        let router = Router::new(vec![("a".into(), 1.), ("b".into(), 1.)]);
        let picks: String = (0..16)
            .map(|i| &router.pick(&format!("user-{i}")).unwrap()[..1])
            .collect();
        // Worked out by hand from the module's formula (in Python, outside this code).
        assert_eq!(picks, "aaaabaabbaabaaaa");
    }

    #[test]
    fn a_fraction_samples_its_share() {
        let n = 20_000;
        let hits = (0..n).filter(|_| sample(0.25)).count();
        // 4 sigma of a binomial(20000, 0.25) is about 1.2 points.
        assert!((hits as f64 / n as f64 - 0.25).abs() < 0.012, "{hits}");
        assert!((0..1000).all(|_| sample(1.)) && !(0..1000).any(|_| sample(0.)));
    }
}
