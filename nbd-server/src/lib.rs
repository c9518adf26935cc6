//! The NBD protocol on tokio.
//!
//! # Layout
//!
//! The data path of a request, from the wire to a backend and back:
//!
//! - [`proto`]: constants, error numbers and the fixed-size headers and
//!   option payloads, as pure encode/decode functions shared by both sides.
//! - [`handshake`]: the server side of fixed-newstyle option haggling, ending
//!   in the transmission parameters of one export.
//! - [`request`]: checks of one transmission request against what was
//!   negotiated (flags, bounds, limits), producing a typed [`request::Command`].
//! - [`reply`]: encoding of simple and structured replies.
//! - [`connection`]: the transmission phase: requests read in order, served
//!   concurrently, replied to out of order through one writer.
//! - [`server`]: listeners (TCP, unix, systemd socket activation), the
//!   export table, and what clients may take ([`server::Limits`]).
//! - [`shutdown`]: the "stop now" broadcast shared by all of them.
//! - [`device`]: the [`device::BlockDevice`] trait every backend implements,
//!   and [`file`](mod@file), the file / block-device backend, both from the
//!   `block-device` crate (re-exported here at their old paths).
//! - [`client`]: an async client (used by `lazy-fetch` for NBD sources) with
//!   many requests in flight on one connection.
//! - [`uri`]: NBD URIs (`nbd://`, `nbd+unix://`, `nbds://` with their TLS
//!   parameters).
//! - [`tls`]: PSK and X.509 credentials and the upgrade of a stream after
//!   `NBD_OPT_STARTTLS`, for the server and the client.
//!
//! Nothing here knows about lazy fetching: the engine is one more
//! `BlockDevice`.

pub mod client;
pub mod connection;
/// The block-device interface, from its own crate (kept at this path).
pub use block_device as device;
/// The file backend, from the block-device crate.
pub use block_device::file;
pub mod handshake;
pub mod proto;
pub mod reply;
pub mod request;
pub mod server;
pub mod shutdown;
pub mod tls;
pub mod uri;

pub use device::{BlockDevice, Capabilities, Extent, Piece, ZeroFlags};
pub use file::FileDevice;
pub use server::{Export, Listener, Server, Shutdown};
