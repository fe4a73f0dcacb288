//! A scratch directory for generated configs and captured logs.
//!
//! Removed on drop, except while the thread is panicking (a failing test): then it is kept and
//! its path printed, so the config and keel's log can be read after the run. Set
//! `KEEL_TEST_KEEP=1` to keep every directory.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

/// A directory under the system temp dir, unique to this process and call.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `$TMPDIR/PREFIX-PID-NANOS-N`.
    pub fn new(prefix: &str) -> Result<TempDir> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `contents` to `name` inside the directory and returns its path.
    pub fn write(&self, name: &str, contents: &str) -> Result<PathBuf> {
        let p = self.path.join(name);
        std::fs::write(&p, contents).with_context(|| format!("writing {}", p.display()))?;
        Ok(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("KEEL_TEST_KEEP").is_some() {
            eprintln!("keeping {} for inspection", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirs_are_distinct_and_removed_on_drop() {
        let a = TempDir::new("keel-selftest").expect("tempdir");
        let b = TempDir::new("keel-selftest").expect("tempdir");
        assert_ne!(a.path(), b.path());
        let f = a.write("x.toml", "x = 1").expect("write");
        assert_eq!(std::fs::read_to_string(f).expect("read"), "x = 1");
        let p = a.path().to_owned();
        drop(a);
        assert!(!p.exists());
    }
}
