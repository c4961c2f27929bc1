//! Writing credentials and state files safely, the same way on the device and on the
//! controller: private directories, and files that appear whole or not at all.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use rand::TryRng;
use rand::rngs::SysRng;

/// A file or directory that could not be read or written: what was being done, to which
/// path, and the operating system's reason. Every crate that touches the disk reports
/// such failures the same way, e.g. `writing /var/lib/micromine-agent/device.key: ...`.
#[derive(Debug, thiserror::Error)]
#[error("{action} {}: {source}", path.display())]
pub struct FileError {
    /// What was being done, e.g. "writing".
    pub action: &'static str,
    /// The file or directory.
    pub path: PathBuf,
    /// The underlying error.
    #[source]
    pub source: io::Error,
}

impl FileError {
    /// For `map_err`: `fs::read(&path).map_err(FileError::at("reading", &path))`.
    pub fn at<'a>(
        action: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(io::Error) -> FileError + 'a {
        move |source| FileError {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Replaces `path` with `contents` atomically (temporary file + rename), so a reader sees
/// the old or the new file, never a torn one. `mode` applies on Unix.
pub fn write_file_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let tmp = write_temp(path, contents, mode)?;
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_parent(path);
    Ok(())
}

/// Creates `dir` (and parents) readable by the owner only; an existing directory is left
/// as the operator made it.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

/// Writes `contents` to a fresh private temporary file next to `path` (created with `mode`
/// from the start, fsynced) and returns its name, for the caller to rename or link.
pub fn write_temp(path: &Path, contents: &[u8], mode: u32) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut suffix = [0u8; 8];
    SysRng
        .try_fill_bytes(&mut suffix)
        .map_err(|e| io::Error::other(e.to_string()))?;
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        hex::encode(suffix)
    ));
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let result = options.open(&tmp).and_then(|mut file| {
        file.write_all(contents)?;
        file.sync_all()
    });
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(tmp)
}

/// Makes a rename or link durable. Best effort: not every platform can fsync a directory,
/// and the file itself is already synced.
pub fn sync_parent(path: &Path) {
    if let Some(parent) = path.parent()
        && let Ok(dir) = fs::File::open(parent)
    {
        let _ = dir.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_error_says_what_was_done_to_which_path_and_why() {
        let path = Path::new("/nonexistent/micromine/device.key");
        let err = fs::read(path)
            .map_err(FileError::at("reading", path))
            .expect_err("the file does not exist");
        assert_eq!(err.action, "reading");
        assert_eq!(err.path, path);
        assert!(
            err.to_string()
                .starts_with("reading /nonexistent/micromine/device.key: "),
            "{err}"
        );
        assert!(std::error::Error::source(&err).is_some());
    }
}
