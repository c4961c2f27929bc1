//! Whatever a pool sends: reading a line never panics, and a job it accepts builds
//! headers for any extranonces.
#![no_main]

use libfuzzer_sys::fuzz_target;
use micromine_stratum::message::{Incoming, parse_line};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(Incoming::Notify(job)) = parse_line(&text) {
        let header = job.header(&data[..data.len().min(8)], &[1, 2, 3, 4], job.version);
        assert_eq!(header.bits, job.bits);
    }
});
