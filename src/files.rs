//! Writing small state files (configurations, settings, checkpoints) so that a kill never
//! leaves half of one: a later run would otherwise refuse the folder for a file it cannot read.

use std::path::Path;

use crate::error::{Error, Result};

/// Writes `bytes` to a temporary file beside `path`, then renames it over `path` (a rename
/// within one folder replaces the file whole). The temporary name holds the process id, so
/// that eval shards starting together never write into each other's.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp.{}", std::process::id()));
    let tmp = path.with_file_name(name);
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Cuts a file after its last complete line (a kill in the middle of appending a line leaves
/// a tail without '\n'); the lines before it are not rewritten.
pub fn cut_torn_line(path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if bytes.is_empty() || bytes.ends_with(b"\n") {
        return Ok(());
    }
    let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    f.set_len(keep as u64).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_lines_are_cut_and_whole_files_replaced() {
        let dir = std::env::temp_dir().join(format!("thinksteer-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.jsonl");
        std::fs::write(&p, "{\"a\":1}\n{\"b\":").unwrap();
        cut_torn_line(&p).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "{\"a\":1}\n");
        std::fs::write(&p, "{\"b\":").unwrap();
        cut_torn_line(&p).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "");
        let c = dir.join("config.json");
        write_atomic(&c, b"one").unwrap();
        write_atomic(&c, b"two").unwrap();
        assert_eq!(std::fs::read_to_string(&c).unwrap(), "two");
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(left.len(), 2, "a temporary file left: {left:?}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
