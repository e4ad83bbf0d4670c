//! Files that outlive a run. Small state files (configurations, settings, checkpoints) are
//! written whole, so that a kill never leaves half of one: a later run would otherwise refuse
//! the folder for a file it cannot read. Large files (checkpoints) get a cheap fingerprint.

use std::path::Path;

use crate::error::{Error, Result};

/// Writes `bytes` to a temporary file beside `path`, then renames it over `path` (a rename
/// within one folder replaces the file whole). The temporary name holds the process id, so
/// that eval shards starting together never write into each other's.
pub fn write_atomic(path: &Path, bytes: impl AsRef<[u8]>) -> Result<()> {
    write_atomic_with(path, |tmp| std::fs::write(tmp, bytes))
}

/// `write_atomic` for a writer that streams into the file it is given (no copy of the whole
/// output in memory).
pub fn write_atomic_with<E: Into<std::io::Error>>(
    path: &Path,
    write: impl FnOnce(&Path) -> std::result::Result<(), E>,
) -> Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp.{}", std::process::id()));
    let tmp = path.with_file_name(name);
    if let Err(e) = write(&tmp) {
        // A full disk: the previous file stays whole, and no partial temporary is left.
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e.into()));
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Refuses an output path that is a folder, or whose folder does not exist, before a long run
/// that would only fail when writing it at the end.
pub fn check_folder_of(path: &Path, flag: &str) -> Result<()> {
    if path.is_dir() {
        crate::bail!(
            "{flag} {}: expected a file to write, found a folder",
            path.display()
        );
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        crate::bail!(
            "{flag} {}: expected an existing folder {} to write it in, found none",
            path.display(),
            dir.display()
        );
    }
    Ok(())
}

/// A text file as the JSON and JSONL readers take it. A leading UTF-8 byte-order mark (some
/// editors and Windows tools write one) is dropped: JSON parsers refuse it as a stray
/// character. Bytes that are not UTF-8 are refused with the line they are on.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_text(path, bytes)
}

/// `read_text` up to the file's last newline: a torn last line (a writer killed in the middle
/// of it, perhaps inside a character, or one still writing) is left out before decoding.
pub fn read_complete_lines(path: &Path) -> Result<String> {
    let mut bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    bytes.truncate(bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1));
    decode_text(path, bytes)
}

fn decode_text(path: &Path, mut bytes: Vec<u8>) -> Result<String> {
    if bytes.starts_with(b"\xEF\xBB\xBF") {
        bytes.drain(..3);
    }
    String::from_utf8(bytes).map_err(|e| {
        let (bytes, at) = (e.as_bytes(), e.utf8_error().valid_up_to());
        let line = 1 + bytes[..at].iter().filter(|&&b| b == b'\n').count();
        let col = 1 + at
            - bytes[..at]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |p| p + 1);
        Error::Input(format!(
            "{}:{line}: expected UTF-8 text, found the byte 0x{:02x} at byte {col} of the line",
            path.display(),
            bytes[at]
        ))
    })
}

/// Maps `path` read-only, `what` naming the file it should be ("a GGUF file"). A folder is
/// refused by name first: mapping one fails with ENODEV, "No such device", which says neither
/// what was expected nor what was found.
pub fn map_file(path: &Path, what: &str) -> Result<memmap2::Mmap> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    if file.metadata().is_ok_and(|m| m.is_dir()) {
        crate::bail!("{}: expected {what}, found a folder", path.display());
    }
    // SAFETY: the file is opened read-only and the caller keeps the map with what it read from
    // it; a file modified while mapped is outside what we support.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))
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

/// `fnv1a` of a file's length and of samples of its bytes: the whole file up to 4 MiB, else
/// 64 blocks of 64 KiB at evenly spaced offsets (the first at 0, the last ending at the end).
/// It reads 4 MiB of a checkpoint of any size, and a retrained or requantised checkpoint
/// differs in them; a change confined to bytes between the samples goes unnoticed.
pub fn sampled_hash(path: &Path) -> Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    const BLOCK: u64 = 64 << 10;
    const BLOCKS: u64 = 64;
    let io = |e| Error::io(path, e);
    let mut f = std::fs::File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let mut h = crate::rng::fnv1a_extend(crate::rng::FNV1A_START, &len.to_le_bytes());
    if len <= BLOCK * BLOCKS {
        let mut bytes = Vec::with_capacity(len as usize);
        f.read_to_end(&mut bytes).map_err(io)?;
        return Ok(crate::rng::fnv1a_extend(h, &bytes));
    }
    let mut buf = vec![0u8; BLOCK as usize];
    for i in 0..BLOCKS {
        let at = (len - BLOCK) * i / (BLOCKS - 1);
        f.seek(SeekFrom::Start(at)).map_err(io)?;
        f.read_exact(&mut buf).map_err(io)?;
        h = crate::rng::fnv1a_extend(h, &buf);
    }
    Ok(h)
}

/// The lock file of output `out` (`traces.jsonl` → `.traces.jsonl.lock` beside it, its folder
/// made if missing), held by the run that writes it: an exclusive lock taken on it while the
/// returned file is open, or one line refusing the run when another process holds it (two runs
/// appending to one output would each do all the work, or leave an unreadable file). The lock
/// file stays (removing it would race a run taking it).
pub fn lock_output(out: &Path, flag: &str) -> Result<std::fs::File> {
    let mut name = std::ffi::OsString::from(".");
    name.push(out.file_name().unwrap_or_default());
    name.push(".lock");
    let path = out.with_file_name(name);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => crate::bail!(
            "{flag} {}: expected no other run writing it, found one (it holds {}): wait for it, or use another {flag}",
            out.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) if e.kind() == std::io::ErrorKind::Unsupported => {
            eprintln!(
                "note: {}: not locked (the filesystem takes no locks): nothing stops a second run writing {}",
                path.display(),
                out.display()
            );
            Ok(file)
        }
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io(&path, e)),
    }
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

    #[test]
    fn text_drops_a_byte_order_mark_and_names_the_line_of_a_bad_byte() {
        let dir = std::env::temp_dir().join(format!("thinksteer-text-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.jsonl");
        std::fs::write(&p, b"\xEF\xBB\xBF{\"a\":1}\n").unwrap();
        assert_eq!(read_text(&p).unwrap(), "{\"a\":1}\n");
        std::fs::write(&p, b"{\"a\":1}\n{\"b\":\"x\xFFy\"}\n").unwrap();
        let e = read_text(&p).unwrap_err().to_string();
        assert!(
            e.ends_with(
                "a.jsonl:2: expected UTF-8 text, found the byte 0xff at byte 8 of the line"
            ),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_folder_is_not_mapped() {
        let e = map_file(&std::env::temp_dir(), "a GGUF file")
            .unwrap_err()
            .to_string();
        assert!(e.ends_with(": expected a GGUF file, found a folder"), "{e}");
    }

    #[test]
    fn sampled_hash_sees_a_change_in_a_sample_and_the_length() {
        let dir = std::env::temp_dir().join(format!("thinksteer-sampled-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("w.bin");
        let hash = |bytes: &[u8]| {
            std::fs::write(&p, bytes).unwrap();
            sampled_hash(&p).unwrap()
        };
        // Small: every byte counts.
        let mut small = vec![7u8; 1000];
        let h0 = hash(&small);
        small[999] = 8;
        assert_ne!(hash(&small), h0);
        // Large (5 MiB): the first and last bytes are sampled, and so is the length.
        let mut big = vec![1u8; 5 << 20];
        let h1 = hash(&big);
        assert_eq!(hash(&big), h1);
        big[0] = 2;
        let h2 = hash(&big);
        assert_ne!(h2, h1);
        let last = big.len() - 1;
        big[last] = 3;
        assert_ne!(hash(&big), h2);
        big.push(1);
        assert_ne!(hash(&big), h2);
        std::fs::remove_dir_all(&dir).ok();
    }
}
