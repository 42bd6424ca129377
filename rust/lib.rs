//! kumo_listener: an ESMTP listener configured the way KumoMTA configures
//! its listeners, with policy written in Python.
//!
//! Pure logic (no I/O, no Python): [`parser`], [`framing`], [`reply`],
//! [`cidr`], [`params`], [`message`], [`sasl`], [`proxy`], [`xclient`]. The server: [`server`],
//! [`session`] over a [`stream`], [`tls`] identities, [`sink`], [`bridge`]
//! to the Python thread, and the [`driver`] of the runtime. [`py`] is the binding.

pub mod bridge;
pub mod cidr;
pub mod driver;
pub mod events;
pub mod framing;
pub mod log;
pub mod message;
pub mod meta;
pub mod params;
pub mod parser;
pub mod proxy;
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
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
