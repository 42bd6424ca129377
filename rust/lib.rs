//! kumo_listener: an ESMTP listener configured the way KumoMTA configures
//! its listeners, with policy written in Python.
//!
//! Pure logic (no I/O, no Python): [`parser`], [`framing`], [`bdat`], [`reply`],
//! [`cidr`], [`params`], [`sasl`], [`proxy`], [`xclient`]; [`message`] too,
//! except that it reads the clock, the local time zone and the process id
//! for message ids and `Received:` headers. The server: [`server`],
//! [`session`] over a [`stream`], [`tls`] identities, [`sink`], the policy
//! [`events`] that travel through the [`bridge`] to the Python thread with
//! the crate's [`log`] records, and the [`driver`] of the runtime. `py` is
//! the binding, built with the `python` feature (maturin turns it on), so
//! that unit tests, benches and fuzz targets need no libpython.

pub mod bdat;
pub mod body;
pub mod bridge;
pub mod cidr;
pub mod clients;
pub mod driver;
pub mod events;
pub mod framing;
pub mod log;
pub mod message;
pub mod meta;
pub mod metrics;
pub mod params;
pub mod parser;
pub mod proxy;
#[cfg(feature = "python")]
mod py;
pub mod reply;
pub mod sasl;
pub mod server;
pub mod session;
pub mod sink;
pub mod stream;
pub mod tls;
pub mod xclient;

/// Sessions allocate and free many small buffers and strings per message;
/// glibc's malloc spent a tenth of the server's user time on them,
/// consolidating its fast bins at every allocation of a KiB or more.
/// Global for every build of the crate, so that unit tests and benches
/// measure the allocator the extension uses.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
