//! Which template id a request asks for: one fixed id, uniform over `1..=n`, or Zipf over
//! `1..=n` (id `k` drawn with weight `1/k^s`, so a few ids are hot and most are rare).

use rand::rngs::SmallRng;
use rand::RngExt;
use rand_distr::{Distribution, Zipf};

use crate::cli::IdDist;

/// How a worker picks the next id. Every draw comes from the caller's seeded generator, so a
/// run with the same `--seed` asks for the same ids.
#[derive(Debug, Clone)]
pub enum IdPicker {
    Fixed(i64),
    Uniform(u64),
    Zipf(Zipf<f64>),
}

impl IdPicker {
    /// `ids` is at least 1 and the exponent above 0 (both checked with the options), which is
    /// all `Zipf::new` asks; should that ever change, the error says so rather than panicking.
    pub fn new(ids: u64, dist: IdDist) -> Result<IdPicker, String> {
        Ok(match dist {
            IdDist::Uniform => IdPicker::Uniform(ids),
            IdDist::Zipf { exponent } => IdPicker::Zipf(
                Zipf::new(ids as f64, exponent)
                    .map_err(|e| format!("Zipf over 1..={ids} with exponent {exponent}: {e}"))?,
            ),
        })
    }

    pub fn pick(&self, rng: &mut SmallRng) -> i64 {
        match self {
            IdPicker::Fixed(id) => *id,
            IdPicker::Uniform(n) => rng.random_range(1..=*n) as i64,
            // The sampler returns whole numbers in [1, n] as floats.
            IdPicker::Zipf(zipf) => zipf.sample(rng) as i64,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use rand::SeedableRng;

    use super::*;

    #[test]
    fn zipf_favours_low_ids_and_stays_in_range() {
        let picker = IdPicker::new(1000, IdDist::Zipf { exponent: 1.0 }).expect("valid");
        let mut rng = SmallRng::seed_from_u64(7);
        let mut counts = vec![0u32; 1001];
        for _ in 0..100_000 {
            let id = picker.pick(&mut rng);
            assert!((1..=1000).contains(&id));
            counts[id as usize] += 1;
        }
        // With s = 1 over 1000 ids, id 1 has weight 1/H(1000) ≈ 13 %, id 2 half of that.
        assert!(counts[1] > 11_000 && counts[1] < 15_500, "{}", counts[1]);
        assert!(counts[1] > counts[2] && counts[2] > counts[10] && counts[10] > counts[900]);
    }

    #[test]
    fn the_same_seed_draws_the_same_ids() {
        let picker = IdPicker::new(500, IdDist::Zipf { exponent: 1.2 }).expect("valid");
        let draw = |seed| {
            let mut rng = SmallRng::seed_from_u64(seed);
            (0..200).map(|_| picker.pick(&mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }

    #[test]
    fn uniform_covers_the_range() {
        let picker = IdPicker::new(50, IdDist::Uniform).expect("valid");
        let mut rng = SmallRng::seed_from_u64(1);
        let seen: HashSet<i64> = (0..5000).map(|_| picker.pick(&mut rng)).collect();
        assert_eq!(seen.len(), 50);
        assert!(seen.iter().all(|id| (1..=50).contains(id)));
    }
}
