//! The work micromine hands its devices, as pure logic: no tokio, no network, no disk. The
//! fleet (in the controller) owns the state and the I/O; these modules decide what is fair,
//! current and worth doing.
//!
//! # Layout
//! - `worksource`: block headers: the builtin synthetic source (templates mined with real
//!   sha256d, rolled when a block is found), and the header shape a pool's work takes.
//! - `scheduler`: nonce ranges per header, never held by two devices (invariant 1), and
//!   ranges handed back from where their device had got to.
//! - `vardiff`: each device's share target, aimed at the MicroMiner's `sharesPerMinute`
//!   (invariant 4).
//! - `economics`: energy cost against expected revenue, per device class.

pub mod economics;
pub mod scheduler;
pub mod vardiff;
pub mod worksource;
