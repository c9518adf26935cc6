//! Where the native copy is written: a file or a block device.

pub mod file;

pub use file::Target;
