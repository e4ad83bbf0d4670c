//! The host's memory: what the system reports available, and a refusal of sizes that cannot
//! fit in it (a clear line instead of the allocator's abort).

use std::path::{Path, PathBuf};

use crate::error::Result;

/// Bytes this process may still allocate: the system's `MemAvailable` (/proc/meminfo), or less
/// where a cgroup memory limit (containers, SLURM jobs) leaves less; None where neither can be
/// read.
pub fn available() -> Option<usize> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        let line = m.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib.saturating_mul(1024))
    });
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|c| cgroup_headroom(Path::new("/sys/fs/cgroup"), &c));
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Limits at or above this are "no limit" (cgroup v1 writes 2^63 rounded down to a page).
const NO_LIMIT: u64 = 1 << 60;

/// The least headroom under the memory limits of the cgroups in `self_cgroup` (the text of
/// /proc/self/cgroup) and their ancestors, in the hierarchies mounted at `root`: limit − (usage −
/// inactive file cache), since the kernel reclaims that cache before it fails an allocation.
/// v2 (`0::/path`, at `root` or `root/unified`) reads memory.max / memory.current /
/// `inactive_file`; v1 (`N:memory:/path`, at `root/memory`) memory.limit_in_bytes /
/// memory.usage_in_bytes / `total_inactive_file`. A path missing under the mount (a container
/// that sees its own cgroup at the mount's root) is walked up to what exists. None: no limit.
fn cgroup_headroom(root: &Path, self_cgroup: &str) -> Option<usize> {
    let mut best: Option<u64> = None;
    for line in self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        let hierarchies: Vec<(PathBuf, [&str; 3])> = if controllers.is_empty() {
            let files = ["memory.max", "memory.current", "inactive_file"];
            vec![(root.to_path_buf(), files), (root.join("unified"), files)]
        } else if controllers.split(',').any(|c| c == "memory") {
            let files = [
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
                "total_inactive_file",
            ];
            vec![(root.join("memory"), files)]
        } else {
            continue;
        };
        for (mount, files) in hierarchies {
            let mut dir = mount.join(rel);
            loop {
                if let Some(h) = headroom_of(&dir, files) {
                    best = Some(best.map_or(h, |b| b.min(h)));
                }
                if dir == mount || !dir.pop() {
                    break;
                }
            }
        }
    }
    best.map(|b| usize::try_from(b).unwrap_or(usize::MAX))
}

/// One cgroup folder's headroom under its limit; None where it has no limit or no such files.
fn headroom_of(dir: &Path, [limit, usage, inactive]: [&str; 3]) -> Option<u64> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    let limit: u64 = read(limit)?.trim().parse().ok()?; // "max" (v2) fails here: no limit
    if limit >= NO_LIMIT {
        return None;
    }
    let usage: u64 = read(usage)?.trim().parse().ok()?;
    let cache: u64 = read("memory.stat")
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix(inactive)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0);
    Some(limit.saturating_sub(usage.saturating_sub(cache)))
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

    fn write(dir: &Path, files: &[(&str, &str)]) {
        std::fs::create_dir_all(dir).unwrap();
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
    }

    #[test]
    fn cgroup_limits_bound_the_headroom_at_every_level() {
        let root = std::env::temp_dir().join(format!("ts-cgroup-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        // v1: a job limited to 8 GiB using 3 GiB, 1 GiB of it inactive cache, inside a parent
        // limited to 4 GiB using 3.5 GiB; the controllers' own root unlimited.
        let (gib, mib) = (1u64 << 30, 1u64 << 20);
        let v1 = root.join("memory");
        write(&v1, &[("memory.limit_in_bytes", "9223372036854771712\n")]);
        write(
            &v1.join("slurm"),
            &[
                ("memory.limit_in_bytes", &format!("{}\n", 4 * gib)),
                (
                    "memory.usage_in_bytes",
                    &format!("{}\n", 3 * gib + 512 * mib),
                ),
            ],
        );
        write(
            &v1.join("slurm/job_7"),
            &[
                ("memory.limit_in_bytes", &format!("{}\n", 8 * gib)),
                ("memory.usage_in_bytes", &format!("{}\n", 3 * gib)),
                (
                    "memory.stat",
                    &format!("cache 5\ninactive_file 9\ntotal_inactive_file {gib}\n"),
                ),
            ],
        );
        let cg = "4:cpu:/\n3:memory:/slurm/job_7\n";
        // The parent's 0.5 GiB is tighter than the job's 8 − (3 − 1) = 6 GiB.
        assert_eq!(cgroup_headroom(&root, cg), Some((512 * mib) as usize));
        std::fs::remove_file(v1.join("slurm/memory.limit_in_bytes")).unwrap();
        assert_eq!(cgroup_headroom(&root, cg), Some((6 * gib) as usize));
        // v2 with "max" at the root, a container seeing /docker/x that is mounted at the root
        // (the path is missing below the mount: walked up to what exists).
        write(
            &root,
            &[
                ("memory.max", &format!("{}\n", 2 * gib)),
                ("memory.current", &format!("{}\n", gib)),
                ("memory.stat", "anon 1\ninactive_file 0\n"),
            ],
        );
        assert_eq!(cgroup_headroom(&root, "0::/docker/x\n"), Some(gib as usize));
        std::fs::write(root.join("memory.max"), "max\n").unwrap();
        assert_eq!(cgroup_headroom(&root, "0::/docker/x\n"), None);
        // Unreadable or absent: no limit known.
        assert_eq!(cgroup_headroom(&root.join("none"), cg), None);
        assert_eq!(cgroup_headroom(&root, "garbage"), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
