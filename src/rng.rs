//! A tiny seeded PRNG (splitmix64) for everything in the crate that must be reproducible from a
//! seed alone: random SAEs and steering sets, SAE training (init, shuffles), ablations.
//! Hand-written so that a seed means the same numbers on every machine and crate version.
//! Also FNV-1a, the stable hash of names and contents kept in files.

/// splitmix64: 64-bit state, one add and a mixing function per draw. Not cryptographic; its
/// outputs pass BigCrush, which is all that initialisation and shuffling need.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in [0, n) by the multiply-high method (bias below 2^-64 · n, negligible).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Standard normal by Box–Muller (one of the pair is discarded: simpler state, and speed
    /// does not matter where this is used).
    pub fn normal(&mut self) -> f64 {
        // 1 - u lies in (0, 1], so the log is finite.
        let u1 = 1.0 - self.next_f64();
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            let j = self.below(i + 1);
            xs.swap(i, j);
        }
    }

    /// A uniformly random direction in R^d scaled to `norm`, written into `out` [d].
    pub fn direction(&mut self, out: &mut [f32], norm: f32) {
        loop {
            let mut ss = 0.0f64;
            let g: Vec<f64> = (0..out.len()).map(|_| self.normal()).collect();
            for &v in &g {
                ss += v * v;
            }
            // A zero draw has probability 0 for d >= 1; redraw rather than divide by it.
            if ss > 0.0 {
                let s = norm as f64 / ss.sqrt();
                for (o, v) in out.iter_mut().zip(&g) {
                    *o = (v * s) as f32;
                }
                return;
            }
        }
    }
}

/// FNV-1a, 64-bit: a stable hash for names and fingerprints written to disk (std's hasher may
/// change between releases).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    fnv1a_extend(FNV1A_START, bytes)
}

/// The FNV-1a state before any byte.
pub const FNV1A_START: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a continued over more bytes: hashing data piece by piece, without one buffer of it all.
pub fn fnv1a_extend(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_is_the_published_function() {
        // Test vectors of FNV-1a 64.
        assert_eq!(fnv1a(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a_extend(fnv1a(b"ab"), b"cd"), fnv1a(b"abcd"));
    }

    #[test]
    fn same_seed_same_stream_and_different_seed_differs() {
        let a: Vec<u64> = (0..4)
            .map({
                let mut r = Rng::new(7);
                move |_| r.next_u64()
            })
            .collect();
        let b: Vec<u64> = (0..4)
            .map({
                let mut r = Rng::new(7);
                move |_| r.next_u64()
            })
            .collect();
        let c: Vec<u64> = (0..4)
            .map({
                let mut r = Rng::new(8);
                move |_| r.next_u64()
            })
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn normal_has_unit_variance_and_direction_has_norm() {
        let mut r = Rng::new(1);
        let n = 20_000;
        let xs: Vec<f64> = (0..n).map(|_| r.normal()).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
        // Standard errors: mean 1/sqrt(n) = 0.007, variance sqrt(2/n) = 0.01; allow 5 sigma.
        assert!(mean.abs() < 0.035, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "var {var}");
        let mut v = vec![0.0f32; 17];
        r.direction(&mut v, 3.0);
        let nrm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((nrm - 3.0).abs() < 1e-5, "norm {nrm}");
    }
}
