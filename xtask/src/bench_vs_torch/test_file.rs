//! Temporary files for the tests that read benchmark JSON.

use std::path::{Path, PathBuf};

/// A file in a folder of its own under the system temp dir; the folder goes at drop.
pub struct TempFile(PathBuf);

impl TempFile {
    /// Writes `text` to a file called `name`. `name` must be unique among the tests.
    pub fn new(name: &str, text: &str) -> TempFile {
        let dir = std::env::temp_dir().join(format!("xtask-test-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write temp file");
        TempFile(path)
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
