//! Token selection from logits: greedy argmax, seeded temperature / top-k / top-p sampling with a
//! hand-written PRNG (xoshiro256** seeded through splitmix64), and stop-string detection on the
//! decoded text.
//!
//! NaN logits are treated as -inf everywhere so that a broken row can never win a draw; the
//! sampler never panics on its input.

/// How to pick the next token. `temperature <= 0` (or `top_k == 1`) means greedy argmax.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Logits are divided by this before the softmax; 0 = greedy.
    pub temperature: f32,
    /// Keep only the `top_k` highest logits; 0 = no limit.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability mass reaches `top_p`;
    /// values >= 1 (or <= 0) disable the nucleus cut.
    pub top_p: f32,
    /// PRNG seed: the same seed and logits give the same tokens.
    pub seed: u64,
}

impl Default for SamplingParams {
    /// Greedy decoding, the setting every experiment in the spec uses.
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Refuses values the flags cannot mean: a temperature that is negative or not finite, a
    /// nucleus mass outside (0, 1].
    pub fn validate(&self) -> crate::error::Result<()> {
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            crate::bail!("--temperature: expected a finite number >= 0 (0 is greedy), found {t}");
        }
        let p = self.top_p;
        if !(p > 0.0 && p <= 1.0) {
            crate::bail!(
                "--top-p: expected a probability mass in (0, 1] (1 disables it), found {p}"
            );
        }
        Ok(())
    }

    /// True when `sample` reduces to argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature.is_nan() || self.temperature <= 0.0 || self.top_k == 1
    }
}

pub use crate::cpu_ops::argmax;

/// xoshiro256**: 256 bits of state, fast, and good enough statistically for token sampling.
#[derive(Debug, Clone)]
struct Xoshiro256 {
    s: [u64; 4],
}

impl Xoshiro256 {
    /// Expand a 64-bit seed into the 256-bit state with splitmix64, which guarantees a
    /// non-zero state for every seed (an all-zero xoshiro state would emit zeros forever).
    fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Xoshiro256 {
            s: [next(), next(), next(), next()],
        }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) from the top 53 bits (the f64 mantissa width).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// A seeded sampler. The scratch buffer grows to the vocabulary size on the first call and is
/// reused afterwards, so sampling allocates nothing per token.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Xoshiro256,
    /// (probability or scaled logit, token id) for the surviving candidates; [V] at most.
    scratch: Vec<(f32, u32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Sampler {
            params,
            rng: Xoshiro256::new(params.seed),
            scratch: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Pick a token id from one row of logits [V]. An empty row gives 0.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = self.params;
        if p.is_greedy() || logits.len() <= 1 {
            return argmax(logits) as u32;
        }
        let inv_t = 1.0 / p.temperature;
        self.scratch.clear();
        self.scratch
            .extend(logits.iter().enumerate().map(|(i, &l)| {
                let l = if l.is_nan() { f32::NEG_INFINITY } else { l };
                (l * inv_t, i as u32)
            }));
        // Descending by value, ties to the lower id, so the candidate order is deterministic.
        let desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));

        let nucleus = p.top_p > 0.0 && p.top_p < 1.0;
        if p.top_k > 0 && p.top_k < self.scratch.len() {
            self.scratch.select_nth_unstable_by(p.top_k - 1, desc);
            self.scratch.truncate(p.top_k);
        }
        if nucleus {
            self.scratch.sort_unstable_by(desc);
        }

        // Softmax over the survivors, shifted by their maximum for stability.
        let max = self
            .scratch
            .iter()
            .fold(f32::NEG_INFINITY, |m, &(v, _)| m.max(v));
        if max == f32::NEG_INFINITY {
            // Every logit is -inf or NaN: nothing to weigh, fall back to greedy.
            return argmax(logits) as u32;
        }
        let mut total = 0.0f64;
        for c in self.scratch.iter_mut() {
            c.0 = (c.0 - max).exp();
            total += c.0 as f64;
        }

        // Nucleus: the shortest prefix of the sorted list whose mass reaches top_p (always >= 1).
        let mut keep = self.scratch.len();
        let mut mass = total;
        if nucleus {
            let target = p.top_p as f64 * total;
            let mut cum = 0.0f64;
            for (i, c) in self.scratch.iter().enumerate() {
                cum += c.0 as f64;
                if cum >= target {
                    keep = i + 1;
                    mass = cum;
                    break;
                }
            }
        }

        let u = self.rng.next_f64() * mass;
        let mut cum = 0.0f64;
        for c in &self.scratch[..keep] {
            cum += c.0 as f64;
            if u < cum {
                return c.1;
            }
        }
        // Rounding can leave u just above the last running sum: take the last positive weight.
        self.scratch[..keep]
            .iter()
            .rev()
            .find(|c| c.0 > 0.0)
            .map_or(argmax(logits) as u32, |c| c.1)
    }
}

/// Detects stop strings in generated text. Empty stop strings are ignored (they would match
/// everywhere).
#[derive(Debug, Clone, Default)]
pub struct StopChecker {
    stops: Vec<String>,
}

impl StopChecker {
    pub fn new<S: AsRef<str>>(stops: &[S]) -> Self {
        StopChecker {
            stops: stops
                .iter()
                .map(|s| s.as_ref().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// Byte offset of the earliest occurrence of any stop string in `text`.
    pub fn find(&self, text: &str) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
    }

    /// `text` cut just before the earliest stop string, or None when no stop string occurs.
    pub fn truncate<'a>(&self, text: &'a str) -> Option<&'a str> {
        self.find(text).map(|i| &text[..i])
    }

    /// How many trailing bytes of `text` a streaming printer must hold back because they could
    /// be the start of a stop string completed by later tokens. Always on a char boundary.
    pub fn holdback(&self, text: &str) -> usize {
        let mut hold = 0;
        for s in &self.stops {
            // Longest proper prefix of `s` that is a suffix of `text`.
            let max = (s.len() - 1).min(text.len());
            for n in (1..=max).rev() {
                if n > hold && s.is_char_boundary(n) && text.ends_with(&s[..n]) {
                    hold = n;
                    break;
                }
            }
        }
        hold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed,
        }
    }

    #[test]
    fn argmax_takes_first_maximum_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, -5.0, -1.0]), 2);
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
    }

    #[test]
    fn greedy_picks_argmax() {
        let logits = [0.1, 2.5, -1.0, 2.5, 0.0];
        let mut s = Sampler::new(params(0.0, 0, 1.0, 7));
        for _ in 0..10 {
            assert_eq!(s.sample(&logits), 1);
        }
    }

    #[test]
    fn top_k_one_equals_greedy_at_any_temperature() {
        let mut rng = Xoshiro256::new(3);
        for t in [0.1f32, 1.0, 5.0, 100.0] {
            let mut s = Sampler::new(params(t, 1, 1.0, 11));
            for _ in 0..20 {
                let logits: Vec<f32> = (0..50).map(|_| rng.next_f64() as f32 * 4.0).collect();
                assert_eq!(s.sample(&logits), argmax(&logits) as u32);
            }
        }
    }

    #[test]
    fn same_seed_same_sequence_and_different_seed_differs() {
        let logits: Vec<f32> = (0..32).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(1.0, 0, 0.95, seed));
            (0..200).map(|_| s.sample(&logits)).collect::<Vec<u32>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn top_p_keeps_only_the_dominant_token() {
        // p(token 2) = e^10 / (e^10 + 3) > 0.9998, so with top_p = 0.9 it alone forms the nucleus.
        let logits = [0.0, 0.0, 10.0, 0.0];
        let mut s = Sampler::new(params(1.0, 0, 0.9, 5));
        for _ in 0..2000 {
            assert_eq!(s.sample(&logits), 2);
        }
    }

    /// Draw `n` samples and check every frequency against `expected` within 5 standard errors,
    /// sqrt(p(1-p)/n) each: a false failure has probability < 6e-7 per token.
    fn check_frequencies(p: SamplingParams, logits: &[f32], expected: &[f64]) {
        let n = 20_000;
        let mut s = Sampler::new(p);
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..n {
            counts[s.sample(logits) as usize] += 1;
        }
        for (i, (&c, &e)) in counts.iter().zip(expected).enumerate() {
            let freq = c as f64 / n as f64;
            let se = (e * (1.0 - e) / n as f64).sqrt();
            let tol = 5.0 * se + 1e-12;
            assert!(
                (freq - e).abs() <= tol,
                "token {i}: frequency {freq} vs expected {e} (tol {tol}); counts {counts:?}"
            );
        }
    }

    fn softmax(x: &[f32], t: f32) -> Vec<f64> {
        let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let e: Vec<f64> = x
            .iter()
            .map(|&v| ((v as f64 - m) / t as f64).exp())
            .collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    }

    #[test]
    fn frequencies_match_softmax_over_temperature() {
        let logits = [1.0f32, 0.5, 0.0, -1.0, 2.0, 1.5];
        for t in [0.7f32, 1.0, 1.8] {
            check_frequencies(params(t, 0, 1.0, 1234), &logits, &softmax(&logits, t));
        }
    }

    #[test]
    fn frequencies_match_renormalised_top_k_and_top_p() {
        let logits = [1.0f32, 0.5, 0.0, -1.0, 2.0, 1.5];
        // top_k = 3 keeps ids 4, 5, 0 and renormalises over them.
        let mut e = softmax(&[2.0, 1.5, 1.0], 1.0);
        let expected = vec![e[2], 0.0, 0.0, 0.0, e[0], e[1]];
        check_frequencies(params(1.0, 3, 1.0, 99), &logits, &expected);
        // top_p = 0.6 at T = 1: sorted probs are 0.378, 0.229, ... so the nucleus is {4, 5}.
        let full = softmax(&logits, 1.0);
        assert!(full[4] < 0.6 && full[4] + full[5] >= 0.6);
        e = vec![full[4], full[5]];
        let z: f64 = e.iter().sum();
        let expected = vec![0.0, 0.0, 0.0, 0.0, e[0] / z, e[1] / z];
        check_frequencies(params(1.0, 0, 0.6, 7), &logits, &expected);
    }

    #[test]
    fn nan_logits_are_never_sampled() {
        let logits = [f32::NAN, 0.0, f32::NAN, 0.0];
        let mut s = Sampler::new(params(1.0, 0, 1.0, 3));
        for _ in 0..500 {
            let t = s.sample(&logits);
            assert!(t == 1 || t == 3, "sampled NaN token {t}");
        }
    }

    #[test]
    fn stop_checker_truncates_at_earliest_stop() {
        let c = StopChecker::new(&["</answer>", "\n\nQuestion:", ""]);
        assert_eq!(c.truncate("42 so far"), None);
        assert_eq!(c.truncate("x=42</answer> tail"), Some("x=42"));
        assert_eq!(
            c.truncate("a\n\nQuestion: b</answer>"),
            Some("a"),
            "earliest of two stops"
        );
        assert_eq!(c.find("ends with </answer>"), Some(10));
        assert!(StopChecker::new(&[""]).is_empty());
    }

    #[test]
    fn stop_checker_holds_back_partial_stop() {
        let c = StopChecker::new(&["</answer>", "ÉND"]);
        assert_eq!(c.holdback("text </ans"), 5);
        assert_eq!(c.holdback("text"), 0);
        assert_eq!(c.holdback("text <"), 1);
        // "É" is two bytes: holding back a prefix must not split it.
        assert_eq!(c.holdback("xÉ"), 2);
        assert_eq!(c.holdback("x</answer"), 8);
    }
}
