//! Reading a file from a watched folder without trusting the folder: only a regular file
//! named there (never a symlink, FIFO or device), opened without following links or blocking,
//! its size checked on the open file before a byte is read. Plugin and pipeline folders both
//! read through here. It does not parse what it reads.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Why a folder file was not read.
#[derive(Debug, thiserror::Error)]
pub enum FolderReadError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not a regular file (a symlink, FIFO, device or folder is never read)")]
    NotRegular,
    #[error("{bytes} bytes, over the limit of {limit} bytes")]
    TooLarge { bytes: u64, limit: u64 },
}

impl FolderReadError {
    /// Whether the file is simply not there (a removal, not a bad file).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Io(e) if e.kind() == std::io::ErrorKind::NotFound)
    }
}

/// The bytes of the regular file at `path`, at most `limit` of them. `O_NOFOLLOW` refuses a
/// symlink at the last component (a link to `/dev/zero` or outside the folder), `O_NONBLOCK`
/// keeps a FIFO from blocking the open, and `fstat` on the open file decides: only a regular
/// file no larger than `limit` is read, and the read stops at `limit` + 1 bytes even if it
/// grows meanwhile.
pub fn read_regular(path: &Path, limit: u64) -> Result<Vec<u8>, FolderReadError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|error| match error.raw_os_error() {
            // ELOOP: the last component is a symlink.
            Some(libc::ELOOP) => FolderReadError::NotRegular,
            _ => FolderReadError::Io(error),
        })?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(FolderReadError::NotRegular);
    }
    if meta.len() > limit {
        return Err(FolderReadError::TooLarge {
            bytes: meta.len(),
            limit,
        });
    }
    read_capped(file, limit)
}

fn read_capped(file: File, limit: u64) -> Result<Vec<u8>, FolderReadError> {
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(FolderReadError::TooLarge {
            bytes: bytes.len() as u64,
            limit,
        });
    }
    Ok(bytes)
}

/// [`read_regular`] as UTF-8 text.
pub fn read_regular_text(path: &Path, limit: u64) -> Result<String, FolderReadError> {
    let bytes = read_regular(path, limit)?;
    String::from_utf8(bytes).map_err(|_| {
        FolderReadError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not UTF-8 text",
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("staircase-folder-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn only_regular_files_within_the_limit_are_read() {
        let dir = scratch("regular");
        let file = dir.join("a.toml");
        std::fs::write(&file, "name = 1").unwrap();
        assert_eq!(read_regular(&file, 64).unwrap(), b"name = 1");
        assert!(matches!(
            read_regular(&file, 4),
            Err(FolderReadError::TooLarge { bytes: 8, .. })
        ));
        let link = dir.join("zero.wasm");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert!(matches!(
            read_regular(&link, 64),
            Err(FolderReadError::NotRegular)
        ));
        let fifo = dir.join("fifo.wasm");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(
            read_regular(&fifo, 64),
            Err(FolderReadError::NotRegular)
        ));
        assert!(
            read_regular(&dir.join("missing"), 64)
                .unwrap_err()
                .is_not_found()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
