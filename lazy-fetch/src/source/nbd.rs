//! An NBD export as a source (being written).
