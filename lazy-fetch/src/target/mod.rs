//! Where the native copy is written: a file or a block device.

pub mod file;
pub mod identity;

pub use file::Target;
