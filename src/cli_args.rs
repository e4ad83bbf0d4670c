//! Value parsers shared by the commands' flags.

/// A count that must be at least 1 (`--batch`, `--max-new-tokens`, `--epochs`, ...): 0 is
/// refused while the flags are read, in clap's one line that names the flag.
pub fn count(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("expected at least 1, found 0".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("expected a whole number of at least 1 ({e})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_start_at_one() {
        assert_eq!(count("1"), Ok(1));
        assert_eq!(count("2048"), Ok(2048));
        for bad in ["0", "-1", "x", ""] {
            assert!(count(bad).is_err(), "{bad:?}");
        }
    }
}
