//! The library's error type. Every user-facing failure (a wrong file, shape, dtype, layer or
//! config) is an `Error::Input` whose message names what was expected and what was found; the
//! binary prints it on one line and exits with code 2.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input from the user: files, shapes, dtypes, flags, token ids.
    #[error("{0}")]
    Input(String),
    /// An I/O failure on a named file.
    #[error("{path}: {}", io_text(.err))]
    Io { path: String, err: std::io::Error },
    /// The CUDA driver, NVRTC or a kernel launch failed.
    #[error("cuda: {0}")]
    Cuda(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// An I/O error as what was expected and what was found, where its kind says so.
fn io_text(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => {
            format!("expected the file, or the folder it is written to, found none ({e})")
        }
        std::io::ErrorKind::PermissionDenied => format!("expected access, found it denied ({e})"),
        std::io::ErrorKind::IsADirectory => format!("expected a file, found a folder ({e})"),
        std::io::ErrorKind::NotADirectory => {
            format!("expected a folder on the path, found a file ({e})")
        }
        std::io::ErrorKind::AlreadyExists => {
            format!("expected a folder or nothing there, found a file ({e})")
        }
        std::io::ErrorKind::StorageFull => {
            format!("expected room to write, found the disk full ({e})")
        }
        _ => e.to_string(),
    }
}

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.display().to_string(),
            err: source,
        }
    }
}

/// `bail!("...")` returns `Err(Error::Input(format!(...)))`.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::error::Error::Input(format!($($arg)*)))
    };
}
