//! Prefix caches of the cached loop: base-engine cache slots beyond the problems' own that keep
//! a window-0 candidate's steered K/V, one (problem, category, coefficient) each.
//!
//! Window 0 steers every position with c·(b + V[category]), so the candidate's K/V at a position
//! depend only on the tokens up to it and on (category, c): a later steered step with the same
//! pair needs only the positions added since, where a rerun takes the whole sequence through the
//! blocks after the steering point. The cache is exact (the same rows, computed once); over a
//! problem the window-0 rows fall from (steered steps) × C × length to at most
//! (categories fired) × C × length. Least recently used first out when the slots run short.
//! The slots exist only in the blocks from the steering point on (`model::Slots::late`): the
//! blocks before it see no steering, and every call that writes a cache starts at the point.

use super::{Mode, Settings};
use crate::bail;
use crate::config::Config;
use crate::Result;

/// (problem, category — `usize::MAX` with --only-bias, where it does not matter —, the
/// coefficient's bits).
pub type Key = (usize, usize, u32);

struct Entry {
    slot: usize,
    key: Option<Key>,
    len: usize,  // positions 0..len hold this key's steered K/V
    used: usize, // the loop step of its last use
}

pub struct Prefixes {
    entries: Vec<Entry>,
}

impl Prefixes {
    /// `n` caches in the engine's slots `first..first + n`.
    pub fn new(first: usize, n: usize) -> Prefixes {
        let entries = (first..first + n)
            .map(|slot| Entry {
                slot,
                key: None,
                len: 0,
                used: 0,
            })
            .collect();
        Prefixes { entries }
    }

    /// For a window-0 candidate of `key` over positions 0..n at loop step `step`: the slot to
    /// write and the first position it lacks (0 for a slot newly taken: a free one, else the
    /// one least recently used before this step), recorded as holding 0..n from now on. None
    /// when no slot is free of this step's candidates (the run then stays read-only).
    pub fn take(&mut self, key: Key, step: usize, n: usize) -> Option<(usize, usize)> {
        let e = match self.entries.iter().position(|e| e.key == Some(key)) {
            Some(i) => &mut self.entries[i],
            None => {
                let e = self
                    .entries
                    .iter_mut()
                    .filter(|e| e.key.is_none() || e.used < step)
                    .min_by_key(|e| (e.key.is_some(), e.used))?;
                e.key = Some(key);
                e.len = 0;
                e
            }
        };
        // A sequence grows by one token per step, so n > len; the last position is rewritten
        // (with the same values) rather than a run left empty.
        let from = e.len.min(n - 1);
        (e.len, e.used) = (n, step);
        Some((e.slot, from))
    }

    /// `take` for each window-0 candidate (key, n) of loop step `step`, in order, after marking
    /// every key already held as used at this step: a new key then never evicts the cache of a
    /// candidate later in the same step.
    pub fn take_step(
        &mut self,
        wants: &[(Key, usize)],
        step: usize,
    ) -> Vec<Option<(usize, usize)>> {
        for e in &mut self.entries {
            if e.key.is_some_and(|k| wants.iter().any(|w| w.0 == k)) {
                e.used = step;
            }
        }
        wants
            .iter()
            .map(|&(key, n)| self.take(key, step, n))
            .collect()
    }

    /// Frees the caches of a finished problem.
    pub fn drop_problem(&mut self, problem: usize) {
        for e in &mut self.entries {
            if e.key.is_some_and(|k| k.0 == problem) {
                e.key = None;
            }
        }
    }
}

/// How many prefix caches to give a base engine of `slots` problem slots, at `slot_bytes` each
/// with `avail` bytes of memory left: none unless cached mode runs window 0; else one per (slot,
/// category, coefficient), at most as many as a quarter of `avail` holds — or `s.prefix_caches`
/// when set, refused when those do not fit `avail` at all.
pub fn count(
    s: &Settings,
    slots: usize,
    latents: usize,
    slot_bytes: usize,
    avail: usize,
) -> Result<usize> {
    if s.mode != Mode::Cached || !s.windows.contains(&0) {
        return Ok(0);
    }
    let categories = if s.only_bias { 1 } else { latents };
    let wanted = slots * categories * s.coefficients.len();
    let Some(n) = s.prefix_caches else {
        return Ok(wanted.min(avail / 4 / slot_bytes.max(1)));
    };
    let n = n.min(wanted);
    if n.saturating_mul(slot_bytes) > avail {
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        bail!(
            "--prefix-caches {n}: {n} caches of {:.1} MiB each need {:.2} GiB, {:.2} GiB are available; lower it, or leave it out to take as many as fit a quarter of that",
            slot_bytes as f64 / (1u64 << 20) as f64,
            gib(n.saturating_mul(slot_bytes)),
            gib(avail)
        );
    }
    Ok(n)
}

/// Bytes one slot costs at `max_len` positions in the blocks `from..` (0: a problem's slot; the
/// steering point: a prefix cache, whose runs start there — `model::Slots`): its K/V of
/// `kv_bytes` per value (4 on the CPU, 2 on the GPU; the engine keeps no residuals for a
/// prefix cache).
pub fn slot_bytes(c: &Config, from: usize, max_len: usize, kv_bytes: usize) -> usize {
    let kv = c.num_key_value_heads * c.head_dim;
    2 * c.num_hidden_layers.saturating_sub(from) * kv * kv_bytes * max_len
}

/// The memory the system reports available (`MemAvailable`), else 4 GiB: what the CPU loop's
/// prefix caches are sized against.
pub fn cpu_available() -> usize {
    crate::memory::available().unwrap_or(4 << 30)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a cache is counted at is what the engines allocate: the CPU cache (f32) and the
    /// CUDA engine's estimate (bf16; no rows of activations), problems' and prefix slots.
    #[test]
    fn slot_bytes_are_what_the_engines_allocate() {
        let c = crate::bench::named_shape("tiny").unwrap();
        let (n, s) = (c.num_hidden_layers, 20);
        let slots = crate::model::Slots {
            all: 2,
            late: 3,
            from: 5,
        };
        assert!(n > 5);
        let cache = crate::model::KvCache::new(&c, slots, s);
        let cpu: usize = cache.k.iter().chain(&cache.v).map(|b| b.len() * 4).sum();
        let want = |bytes| 2 * slot_bytes(&c, 0, s, bytes) + 3 * slot_bytes(&c, 5, s, bytes);
        assert_eq!(cpu, want(4));
        let gpu = crate::cuda::model::cache_and_activation_bytes(&c, slots, s, 0);
        assert_eq!(gpu, want(2));
    }

    #[test]
    fn a_key_keeps_its_slot_and_the_least_recently_used_goes_first() {
        let mut p = Prefixes::new(4, 2);
        assert_eq!(p.take((0, 1, 7), 1, 10), Some((4, 0)));
        assert_eq!(p.take((0, 2, 7), 1, 10), Some((5, 0)));
        // Both serve step 1: a third key that step finds no slot.
        assert_eq!(p.take((0, 3, 7), 1, 10), None);
        // Step 2: key (0, 1) goes on from position 10; a new key takes the other, older slot.
        assert_eq!(p.take((0, 1, 7), 2, 11), Some((4, 10)));
        assert_eq!(p.take((1, 1, 7), 2, 30), Some((5, 0)));
        // Step 3: (0, 2) was evicted, so it starts again, in the first of the two slots last
        // used at step 2.
        assert_eq!(p.take((0, 2, 7), 3, 12), Some((4, 0)));
        // A finished problem's slot is taken before any other.
        p.drop_problem(1);
        assert_eq!(p.take((2, 0, 7), 4, 5), Some((5, 0)));
        assert_eq!(p.take((2, 0, 7), 5, 6), Some((5, 5)));
    }

    #[test]
    fn a_step_keeps_the_caches_it_continues() {
        let mut p = Prefixes::new(0, 2);
        assert_eq!(
            p.take_step(&[((0, 1, 7), 5), ((1, 1, 7), 8)], 1),
            [Some((0, 0)), Some((1, 0))]
        );
        assert_eq!(p.take_step(&[((0, 1, 7), 6)], 2), [Some((0, 5))]);
        // Step 3: problem 0's new category comes first, but problem 1's cache (the least recently
        // used) is continued later in the step, so the new key takes problem 0's old one.
        assert_eq!(
            p.take_step(&[((0, 2, 7), 7), ((1, 1, 7), 10)], 3),
            [Some((0, 0)), Some((1, 8))]
        );
        // One at a time, the new key would have evicted it, and problem 1 would start again at 0.
        let mut q = Prefixes::new(0, 2);
        q.take_step(&[((0, 1, 7), 5), ((1, 1, 7), 8)], 1);
        q.take_step(&[((0, 1, 7), 6)], 2);
        assert_eq!(q.take((0, 2, 7), 3, 7), Some((1, 0)));
        assert_eq!(q.take((1, 1, 7), 3, 10), Some((0, 0)));
    }

    #[test]
    fn caches_only_for_window_0_in_cached_mode() {
        let mut s = Settings {
            windows: vec![0, -1],
            coefficients: vec![0.5, 1.0],
            ..Settings::default()
        };
        let n = |s: &Settings, avail| count(s, 3, 15, 100, avail).unwrap();
        assert_eq!(n(&s, 1 << 20), 90);
        assert_eq!(n(&s, 16000), 40);
        s.only_bias = true;
        assert_eq!(n(&s, 1 << 20), 6);
        // A count given is taken as long as it fits all the memory left (not a quarter).
        s.prefix_caches = Some(2);
        assert_eq!(n(&s, 200), 2);
        let err = count(&s, 3, 15, 100, 199).unwrap_err().to_string();
        assert!(err.contains("--prefix-caches 2: 2 caches"), "{err}");
        s.windows = vec![-1, -100];
        assert_eq!(n(&s, 1 << 20), 0);
        s.windows = vec![0];
        s.mode = Mode::Persistent;
        assert_eq!(n(&s, 1 << 20), 0);
    }
}
