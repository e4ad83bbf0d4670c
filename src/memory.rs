//! The host's memory: what the system reports available, and a refusal of sizes that cannot
//! fit in it (a clear line instead of the allocator's abort).

use crate::error::Result;

/// Bytes the system reports available (`MemAvailable` in /proc/meminfo); None where that
/// cannot be read.
pub fn available() -> Option<usize> {
    let m = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = m.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// Refuses `bytes` (computed with saturating arithmetic by the caller) for `what` when they
/// exceed the memory available; passes where that cannot be read.
pub fn check_fits(bytes: usize, what: &str) -> Result<()> {
    match available() {
        Some(avail) if bytes > avail => crate::bail!(
            "{what}: expected to fit in the {:.1} GiB of memory available, found it needs {:.1} GiB",
            avail as f64 / (1u64 << 30) as f64,
            bytes as f64 / (1u64 << 30) as f64
        ),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_sizes_are_refused_and_small_ones_pass() {
        if available().is_none() {
            println!("skipping: no /proc/meminfo");
            return;
        }
        let e = check_fits(usize::MAX, "--latents 1e15")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--latents 1e15: expected to fit in the"),
            "{e}"
        );
        check_fits(1 << 20, "a small one").unwrap();
    }
}
