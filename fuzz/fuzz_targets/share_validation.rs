//! Whatever shares a device submits: checking and re-hashing never panic, only the
//! device's own live work is ever hashed, and nothing but a nonce inside its range whose
//! hash meets its target is accepted.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use micromine_controller::fleet::{Judged, judge};
use micromine_fleet::persist::Restored;
use micromine_fleet::state::{FleetState, ShareCheck};
use micromine_proto::pb;
use micromine_proto::work::{header_with_nonce, sha256d};
use micromine_resources::microminer;

const NOW: i64 = 1_700_000_000_000;

const MANIFEST: &str = "apiVersion: micromine.dev/v1alpha1\nkind: MicroMiner\nmetadata: {name: fuzz}\nspec:\n  selector: {}\n  workSource: {builtin: {networkDifficulty: 1.0e-6}}\n  sharesPerMinute: 60\n  assignmentSeconds: 10\n";

fn hello(hashrate: f64) -> pb::Hello {
    pb::Hello {
        capacity: Some(pb::Capacity {
            nominal_hashrate: hashrate,
            mining_threads: 1,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Two devices, each holding two leases.
static FLEET: LazyLock<(FleetState, Vec<u64>)> = LazyLock::new(|| {
    let mut state = FleetState::new(Restored::default());
    let miners = microminer::parse_str("fuzz.yaml", MANIFEST).expect("valid");
    state.apply_miners(&miners.into_iter().map(|m| (m.key(), m)).collect(), NOW);
    let mut ids = Vec::new();
    for device in ["me", "other"] {
        let (_, fx) = state.connect(device, &hello(1e3), NOW);
        for (_, message) in fx.messages {
            if let Some(pb::controller_message::Kind::Assignment(a)) = message.kind {
                ids.push(a.id);
            }
        }
    }
    (state, ids)
});

fuzz_target!(|data: &[u8]| {
    let (state, ids) = &*FLEET;
    let shares: Vec<pb::Share> = data
        .chunks(6)
        .filter(|c| c.len() == 6)
        .map(|c| {
            // The first byte picks a live id (or an arbitrary one), the rest is the nonce.
            let pick = c[0] as usize;
            let assignment_id = ids
                .get(pick % 8)
                .copied()
                .unwrap_or(u64::from(c[0]) << 40 | u64::from(c[1]));
            pb::Share {
                assignment_id,
                nonce: u32::from_le_bytes([c[2], c[3], c[4], c[5]]),
                resubmitted: c[1] & 1 == 1,
            }
        })
        .collect();
    let leases = state.leases();
    for check in state.check_shares("me", &shares) {
        let target = match &check {
            ShareCheck::Verify { share, target, .. } => {
                let lease = leases
                    .iter()
                    .find(|l| l.id == share.assignment_id)
                    .expect("verified against a live lease");
                assert_eq!(lease.device, "me", "hashed another device's work");
                Some(*target)
            }
            ShareCheck::Reject { .. } => None,
        };
        if let Judged::Accepted { share, header, .. } = judge("me", check, NOW) {
            let lease = leases
                .iter()
                .find(|l| l.id == share.assignment_id)
                .expect("live lease");
            assert!(
                lease.contains(share.nonce),
                "accepted a nonce outside the range"
            );
            let hash = sha256d(&header_with_nonce(&header.prefix, share.nonce));
            let target = target.expect("only verified shares are accepted");
            assert!(target.is_met_by(&hash), "accepted a hash above the target");
        }
    }
});
