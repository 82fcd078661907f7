//! `--tables FILE`: a polled table file.

use super::{LoadError, Revocation, TableStore};
use portcullis_table::Table;
use sha2::{Digest, Sha256};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

/// The largest table file read: what the API-mode format can carry at most (every shard of a slot full).
/// A larger file is refused unread (rejected, the table in force stays) instead of being read into memory.
pub const MAX_TABLE_FILE_BYTES: usize = portcullis_table::naming::MAX_SHARDS * portcullis_table::shard::MAX_SHARD_BYTES;

/// Reads at most `limit + 1` bytes of `path` (so a file growing under us is seen as too large, never read whole).
async fn read_bounded(path: &Path, limit: usize) -> std::io::Result<Vec<u8>> {
    let file = tokio::fs::File::open(path).await?;
    let mut bytes = Vec::new();
    file.take(limit as u64 + 1).read_to_end(&mut bytes).await?;
    Ok(bytes)
}

async fn apply_text(store: &Arc<TableStore>, path: &Path, text: String) -> Result<bool, LoadError> {
    let store = store.clone();
    let what = path.display().to_string();
    tokio::task::spawn_blocking(move || {
        let parsed = Table::from_json(&text, &what).map_err(LoadError::from);
        // The text goes before the compiled table is built: at 100 000 clients it is tens of MiB that would
        // otherwise add to the swap's peak (the parsed table, the old and the new compiled table).
        drop(text);
        let applied = parsed.and_then(|t| store.apply_owned(t, &what, None));
        // The parsed table and (after a swap) the old compiled table are freed by now.
        crate::heap::release_free_memory();
        applied
    })
    .await
    .expect("table loading does not panic")
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
    ino: u64,
}

fn stamp(m: &std::fs::Metadata) -> FileStamp {
    use std::os::unix::fs::MetadataExt;
    FileStamp { len: m.len(), modified: m.modified().ok(), ino: m.ino() }
}

/// What a failure to read the table file means: the file is gone, or it can no longer be read. Both revoke the
/// table (the rule: the proxy denies when its table is deleted or no longer readable). Content that is not
/// UTF-8 is not a read failure but a bad table (rejected, the table in force stays), like a file that does not
/// parse.
fn revocation(e: &std::io::Error) -> Revocation {
    match e.kind() {
        ErrorKind::NotFound => Revocation::FileMissing,
        _ => Revocation::FileUnreadable,
    }
}

/// Watches a table file by polling: metadata (size, mtime, inode, following symlinks, so Kubernetes' `..data`
/// symlink swap and editors' rename-into-place are seen) and, when that changed, the content hash.
///
/// - A file that fails to parse or validate is rejected once per distinct content; the table in force stays.
/// - A file larger than [`MAX_TABLE_FILE_BYTES`] is rejected the same way without being read.
/// - A file that is deleted or can no longer be read (permissions, replaced by a directory, I/O error) revokes the
///   table: every request is refused (`table_revoked`) until a readable, valid file is back — the same content
///   again is applied again.
pub struct FileWatcher {
    store: Arc<TableStore>,
    path: PathBuf,
    last_stamp: Option<FileStamp>,
    last_hash: Option<[u8; 32]>,
    last_failed: bool,
    /// The file state last refused as too large.
    too_large: Option<FileStamp>,
}

impl FileWatcher {
    pub fn new(store: Arc<TableStore>, path: PathBuf) -> Self {
        Self { store, path, last_stamp: None, last_hash: None, last_failed: true, too_large: None }
    }

    /// One look at the file; applies it when its content changed.
    pub async fn check(&mut self) {
        let st = match tokio::fs::metadata(&self.path).await {
            Ok(m) if m.is_dir() => {
                let e = std::io::Error::new(ErrorKind::IsADirectory, "is a directory");
                return self.unreadable(&e);
            }
            Ok(m) => stamp(&m),
            Err(e) => return self.unreadable(&e),
        };
        if self.last_stamp.as_ref() == Some(&st) && !self.last_failed {
            return;
        }
        self.last_stamp = Some(st.clone());
        if st.len > MAX_TABLE_FILE_BYTES as u64 {
            return self.too_large(st);
        }
        let bytes = match read_bounded(&self.path, MAX_TABLE_FILE_BYTES).await {
            // Grown since the metadata was read: a new file state, judged (and counted) on the next look.
            Ok(b) if b.len() > MAX_TABLE_FILE_BYTES => {
                self.last_stamp = None;
                return;
            }
            Ok(b) => b,
            Err(e) => return self.unreadable(&e),
        };
        let hash: [u8; 32] = Sha256::digest(&bytes).into();
        if self.last_hash == Some(hash) {
            return;
        }
        self.last_hash = Some(hash);
        let text = match String::from_utf8(bytes) {
            Ok(t) => t,
            Err(e) => {
                let source = std::io::Error::new(ErrorKind::InvalidData, e);
                return self.bad_content(LoadError::Read { path: self.path.display().to_string(), source });
            }
        };
        match apply_text(&self.store, &self.path, text).await {
            Ok(_) => self.last_failed = false,
            Err(e) => self.bad_content(e),
        }
    }

    fn unreadable(&mut self, e: &std::io::Error) {
        // Forget what was read, so the same content coming back is applied again.
        self.last_stamp = None;
        self.last_hash = None;
        self.last_failed = true;
        self.store.revoke(revocation(e), &format!("{}: {e}", self.path.display()));
    }

    /// Refused unread; counted once per file state (size, mtime, inode), as bad content is once per content.
    fn too_large(&mut self, st: FileStamp) {
        // Forget the last content read, so the table in force coming back is taken up again.
        self.last_hash = None;
        if self.too_large.as_ref() == Some(&st) {
            return;
        }
        self.too_large = Some(st);
        let detail = format!("larger than {MAX_TABLE_FILE_BYTES} bytes, the most a table may be; not read");
        let source = std::io::Error::new(ErrorKind::FileTooLarge, detail);
        self.bad_content(LoadError::Read { path: self.path.display().to_string(), source });
    }

    fn bad_content(&mut self, e: LoadError) {
        self.last_failed = true;
        self.store.reject("file", &self.path.display().to_string(), &e);
    }

    /// Checks every `interval` until `stop` flips.
    pub async fn run(mut self, interval: Duration, mut stop: watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => self.check().await,
                _ = stop.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_unreadable_files_revoke() {
        let e = |k: ErrorKind| std::io::Error::new(k, "x");
        assert_eq!(revocation(&e(ErrorKind::NotFound)), Revocation::FileMissing);
        assert_eq!(revocation(&e(ErrorKind::PermissionDenied)), Revocation::FileUnreadable);
        assert_eq!(revocation(&e(ErrorKind::IsADirectory)), Revocation::FileUnreadable);
        assert_eq!(revocation(&e(ErrorKind::Other)), Revocation::FileUnreadable);
    }
}
