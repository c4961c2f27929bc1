//! The contract between the micromine controller and its agents.
//!
//! Two halves that must never disagree between the two sides, so they live in one crate:
//!
//! - [`pb`]: the gRPC API `micromine.v1` (`Enrollment`, `Fleet`), generated at build time
//!   from `micromine/v1/*.proto` by `protox` and `tonic-prost-build`.
//! - [`work`]: the proof-of-work math both sides compute: the 80-byte block header, sha256d,
//!   the SHA-256 midstate, 256-bit targets and fractional difficulty.
//!
//! # Layout
//! - `micromine/v1/fleet.proto`: the wire contract.
//! - `src/work/`: `u256` (the integer), `target` (targets, difficulty, compact bits),
//!   `header` (header layout, sha256d, midstate), `merkle`.
//! - `src/token.rs`: the bootstrap token format both sides parse; `src/names.rs`: the
//!   device-name rule both sides check; `src/window.rs`: mining windows, which the
//!   controller checks and the agent evaluates.

pub mod names;
pub mod token;
pub mod window;
pub mod work;

/// Generated protobuf messages and gRPC stubs for package `micromine.v1`.
#[allow(missing_docs, clippy::all, unused_qualifications)]
pub mod pb {
    tonic::include_proto!("micromine.v1");
}

/// Bounds on the spans an agent sends in-band (`SpanBatch`): the agent trims its spans to
/// them and the controller drops what exceeds them, so both sides read them from here.
pub mod span_limits {
    /// Spans in one `SpanBatch`.
    pub const SPANS_PER_BATCH: usize = 64;
    /// Characters in a span's or an event's name.
    pub const NAME_CHARS: usize = 64;
    /// Attributes on a span or an event.
    pub const ATTRIBUTES: usize = 32;
    /// Events on a span.
    pub const EVENTS: usize = 32;
    /// Characters in an attribute key.
    pub const KEY_CHARS: usize = 64;
    /// Characters in a text attribute value or a status message.
    pub const TEXT_CHARS: usize = 256;
}

/// ALPN protocol id a client offers, next to `h2`, to say it is enrolling and has no
/// certificate yet. The controller then completes the handshake without asking for one;
/// every other connection must present a fleet certificate during the handshake.
pub const ENROLL_ALPN: &[u8] = b"micromine-enroll";

/// Upper bound for one gRPC message in either direction. A share batch of thousands of
/// shares is a few tens of kilobytes; anything near this size is hostile or broken.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
