//! A local file or block device as a source (read-only).

use std::io;
use std::path::Path;

use block_device::{BlockDevice, FileDevice};

use super::{Class, Extent, Source};
use crate::state::SourceId;

pub struct FileSource {
    device: FileDevice,
    location: String,
}

impl FileSource {
    pub fn open(path: &Path) -> io::Result<FileSource> {
        let canonical = std::fs::canonicalize(path)
            .map_err(|e| io::Error::new(e.kind(), format!("source {}: {e}", path.display())))?;
        Ok(FileSource {
            device: FileDevice::open(&canonical, false)?,
            location: canonical.display().to_string(),
        })
    }
}

impl Source for FileSource {
    fn id(&self) -> SourceId {
        SourceId {
            kind: "file".into(),
            location: self.location.clone(),
            size: self.device.size(),
        }
    }

    async fn read(&self, offset: u64, len: usize, _class: Class) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(len);
        let mut at = offset;
        // FileDevice reads at most u32 at a time; chunks are far smaller.
        while out.len() < len {
            let n = u32::try_from(len - out.len()).map_or(1 << 30, |n| n.min(1 << 30));
            let pieces = self.device.read(at, n).await?;
            out.extend_from_slice(&block_device::flatten(pieces));
            at += u64::from(n);
        }
        Ok(out)
    }

    async fn block_status(&self, offset: u64, len: u64) -> io::Result<Option<Vec<Extent>>> {
        if !self.device.capabilities().extents {
            return Ok(None);
        }
        self.device.block_status(offset, len).await.map(Some)
    }
}
