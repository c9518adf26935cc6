//! A scratch directory removed, with everything in it, when dropped.

use std::fs;
use std::path::PathBuf;

pub struct ScratchDir(pub PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
