//! Prefix caches of the cached loop: base-engine cache slots beyond the problems' own that keep
//! a window-0 candidate's steered K/V, one (problem, category, coefficient) each.
//!
//! Window 0 steers every position with c·(b + V[category]), so the candidate's K/V at a position
//! depend only on the tokens up to it and on (category, c): a later steered step with the same
//! pair needs only the positions added since, where a rerun takes the whole sequence through the
//! blocks after the steering point. The cache is exact (the same rows, computed once); over a
//! problem the window-0 rows fall from (steered steps) × C × length to at most
//! (categories fired) × C × length. Least recently used first out when the slots run short.

use super::{Mode, Settings};
use crate::config::Config;

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

    /// Frees the caches of a finished problem.
    pub fn drop_problem(&mut self, problem: usize) {
        for e in &mut self.entries {
            if e.key.is_some_and(|k| k.0 == problem) {
                e.key = None;
            }
        }
    }
}

/// How many prefix caches to give a base engine of `slots` problem slots: none unless cached mode
/// runs window 0; else one per (slot, category, coefficient) — `s.prefix_caches` when set —, at
/// most as many as `budget` bytes hold at `slot_bytes` each (when not set).
pub fn count(
    s: &Settings,
    slots: usize,
    latents: usize,
    slot_bytes: usize,
    budget: usize,
) -> usize {
    if s.mode != Mode::Cached || !s.windows.contains(&0) {
        return 0;
    }
    let categories = if s.only_bias { 1 } else { latents };
    let wanted = slots * categories * s.coefficients.len();
    match s.prefix_caches {
        Some(n) => n.min(wanted),
        None => wanted.min(budget / slot_bytes.max(1)),
    }
}

/// Bytes one more slot of an engine costs at `max_len` positions: its K/V of `kv_bytes` per
/// value (4 on the CPU, 2 on the GPU) and its f32 kept residuals.
pub fn slot_bytes(c: &Config, max_len: usize, kv_bytes: usize) -> usize {
    let kv = c.num_key_value_heads * c.head_dim;
    (2 * c.num_hidden_layers * kv * kv_bytes + c.hidden_size * 4) * max_len
}

/// A quarter of the memory the system reports available (`MemAvailable`), else 1 GiB: what the
/// CPU loop's prefix caches may take when their count is not set.
pub fn cpu_budget() -> usize {
    let avail = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        let line = m.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    });
    avail.map_or(1 << 30, |b| b / 4)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn caches_only_for_window_0_in_cached_mode() {
        let mut s = Settings {
            windows: vec![0, -1],
            coefficients: vec![0.5, 1.0],
            ..Settings::default()
        };
        assert_eq!(count(&s, 3, 15, 100, 1 << 20), 90);
        assert_eq!(count(&s, 3, 15, 100, 4000), 40);
        s.only_bias = true;
        assert_eq!(count(&s, 3, 15, 100, 1 << 20), 6);
        s.prefix_caches = Some(2);
        assert_eq!(count(&s, 3, 15, 100, 0), 2);
        s.windows = vec![-1, -100];
        assert_eq!(count(&s, 3, 15, 100, 1 << 20), 0);
        s.windows = vec![0];
        s.mode = Mode::Persistent;
        assert_eq!(count(&s, 3, 15, 100, 1 << 20), 0);
    }
}
