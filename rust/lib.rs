//! kumo_listener: an ESMTP listener configured the way KumoMTA configures
//! its listeners, with policy written in Python.
//!
//! Layers, each importing only from those above it:
//! - [`protocol`]: the wire formats, pure logic (no I/O, no Python);
//! - [`cidr`], [`params`] (the listener parameters and their merge),
//!   [`meta`], [`client_limits`], [`metrics`], [`escape`] (client text in
//!   log lines and trace headers): pure logic too;
//! - [`body`] (bodies under a memory budget, spilled to files), [`message`]
//!   (which reads the clock, the time zone and the process id for ids and
//!   `Received:` headers), [`sink`], [`tls`] identities;
//! - the policy [`events`], which travel through the [`bridge`] to the
//!   Python thread with the crate's [`log`] records ([`policy_latency`]
//!   times them), and the [`driver`] of the runtime;
//! - the [`server`]: listeners and their [`session`]s over a [`stream`].
//!
//! `py` is the binding, built with the `python` feature (maturin turns it
//! on), so that unit tests, benches and fuzz targets need no libpython.

pub mod auth;
pub mod body;
pub mod bridge;
pub mod cidr;
pub mod client_limits;
pub mod driver;
pub mod escape;
pub mod events;
pub mod forward;
pub mod handler_threads;
pub mod log;
pub mod message;
pub mod meta;
pub mod metrics;
pub mod params;
pub mod policy_latency;
pub mod protocol;
#[cfg(feature = "python")]
mod py;
pub mod server;
pub mod session;
pub mod shared_limits;
pub mod sink;
pub mod stream;
pub mod tls;

/// Sessions allocate and free many small buffers and strings per message;
/// glibc's malloc spent a tenth of the server's user time on them,
/// consolidating its fast bins at every allocation of a KiB or more.
/// Global for every build of the crate, so that unit tests and benches
/// measure the allocator the extension uses.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
