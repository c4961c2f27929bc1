//! A disk that fills up (issue 21, item 8): the controller's data directory on a small
//! tmpfs that the test fills to the last byte and frees again. While the disk is full the
//! controller acknowledges no share it could not make durable, `/readyz` says why, and
//! devices hold their shares; once space returns the store reopens itself and every held
//! share is counted, none twice, and no total ever goes down.
//!
//! Runs as root (it mounts the tmpfs itself and unmounts it at the end).

use std::time::Duration;

use micromine_e2e::raw::{RawSession, accepted, enroll, hello, mine, share};
use micromine_e2e::{
    ControllerProcess, Process, Tmpfs, create_token, get_status, number, start_agent, wait_until,
};
use micromine_proto::pb;
use serde_json::Value;

/// Builtin work without blocks (no header rolls under the test), shares as often as a
/// MicroMiner may ask for them so the ledger grows fast, and leases long enough that the
/// held device's work is still its own after the outage.
const MANIFEST: &str = "apiVersion: micromine.dev/v1alpha1\nkind: MicroMiner\nmetadata: {name: full}\nspec:\n  selector: {matchLabels: {site: e2e}}\n  workSource: {builtin: {networkDifficulty: 1.0e12}}\n  sharesPerMinute: 600\n  assignmentSeconds: 300\n";

/// A slow claimed hash rate gives the hand-driven device an easy share target.
const SLOW: f64 = 2_000.0;

/// Long enough for an agent's reconnect backoff (30 s at most) and the store's (8 s).
const RECOVERY: Duration = Duration::from_secs(120);

/// The fleet's accepted total, which must never go down, not even across the outage.
struct Totals {
    last: u64,
}

impl Totals {
    fn check(&mut self, controller: &ControllerProcess) -> Option<Value> {
        let status = controller.status()?;
        let accepted = number(&status, "/totals/accepted");
        assert!(
            accepted >= self.last,
            "the fleet's accepted total went down from {} to {accepted}",
            self.last
        );
        self.last = accepted;
        Some(status)
    }
}

fn readyz(controller: &ControllerProcess) -> Option<(u16, Value)> {
    let (code, body) = get_status(controller.http, "/readyz")?;
    Some((code, serde_json::from_str(&body).ok()?))
}

fn device_accepted(status: &Value, name: &str) -> Option<u64> {
    status["devices"]
        .as_array()?
        .iter()
        .find(|d| d["name"] == name)
        .map(|d| number(d, "/shares/accepted"))
}

/// The `accepted=N` of an agent's last words ("stopped"): every share it was told was
/// accepted.
fn acknowledged(agent: &Process) -> u64 {
    let line = agent.wait_for_log("stopped accepted=", Duration::from_secs(5));
    line.split_whitespace()
        .find_map(|field| field.strip_prefix("accepted="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no accepted count in {line:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_acknowledgements_until_space_returns_and_no_share_is_lost_or_counted_twice()
 {
    let dir = tempfile::tempdir().expect("tempdir");
    // Declared first so it is unmounted last, after every process using it is gone.
    let disk = Tmpfs::mount(&dir.path().join("disk"), "16m");
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests).expect("mkdir");
    std::fs::write(manifests.join("full.yaml"), MANIFEST).expect("write manifest");
    let data = disk.path().join("data");
    let controller = ControllerProcess::start(&manifests, &data);
    let mut totals = Totals { last: 0 };

    // Everything that writes to the data directory outside the store (tokens, enrollment)
    // happens before the disk fills.
    let token = create_token(&data, 2);
    let held = enroll(&controller, &data, "held").await;
    let mut agents: Vec<(String, Process)> = ["gw-1", "gw-2"]
        .into_iter()
        .map(|name| {
            let agent = start_agent(
                &controller,
                &token,
                name,
                &dir.path().join(name),
                "site=e2e",
            );
            (name.to_string(), agent)
        })
        .collect();
    wait_until("both agents to have shares accepted", RECOVERY, || {
        let status = totals.check(&controller)?;
        agents
            .iter()
            .all(|(name, _)| device_accepted(&status, name).is_some_and(|n| n > 0))
            .then_some(())
    });

    // A device driven by hand, so the test knows exactly which shares it holds.
    let mut device = RawSession::open(&controller.url(), &held, hello(SLOW)).await;
    let work = device.assignment().await;
    let nonces = mine(&work, 8);
    let before: Vec<pb::Share> = nonces[..4]
        .iter()
        .map(|&n| share(work.id, n, false))
        .collect();
    let results = device.submit(before).await;
    assert!(results.iter().all(accepted), "{results:?}");

    let filler = disk.fill();
    let (_, refusal) = wait_until("/readyz to fail on the full disk", RECOVERY, || {
        totals.check(&controller)?;
        readyz(&controller).filter(|(code, _)| *code == 503)
    });
    assert_eq!(refusal["ready"], false);
    assert_eq!(refusal["store"], "failed");
    assert_eq!(
        refusal["reason"], "store: no space left on device",
        "{refusal}"
    );
    let frozen = totals
        .check(&controller)
        .expect("status while the disk is full");

    // Nothing is acknowledged that is not durable: the hand-driven device's batch gets no
    // results, its session ends, and it keeps its shares.
    let held_back: Vec<pb::Share> = nonces[4..]
        .iter()
        .map(|&n| share(work.id, n, false))
        .collect();
    device
        .tx
        .send(pb::AgentMessage {
            kind: Some(pb::agent_message::Kind::Shares(pb::SubmitShares {
                shares: held_back,
            })),
        })
        .await
        .expect("send the batch");
    let ended = device.end().await;
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
    assert!(ended.message().contains("resubmit later"), "{ended:?}");
    // The agents are refused the same way and hold theirs (they resubmit after reconnecting).
    for (_, agent) in &agents {
        agent.wait_for_log("the share ledger is unavailable", RECOVERY);
    }
    // Still refusing (no reopen on a disk that is still full), and no total moved meanwhile.
    let (code, _) = readyz(&controller).expect("readyz answers");
    assert_eq!(
        code, 503,
        "the store reopened while the disk was still full"
    );
    let still = totals
        .check(&controller)
        .expect("status while the disk is full");
    assert_eq!(
        still["totals"], frozen["totals"],
        "a share was counted while the store could make nothing durable"
    );

    // Space returns: the store reopens itself, readiness follows.
    filler.free();
    let (_, ready) = wait_until("/readyz once space has returned", RECOVERY, || {
        totals.check(&controller)?;
        readyz(&controller).filter(|(code, _)| *code == 200)
    });
    assert_eq!(ready["ready"], true, "{ready}");
    assert_eq!(ready["store"], "open", "{ready}");

    // The held device comes back and resubmits everything it never heard about, flagged,
    // and the ones acknowledged before too: each is acknowledged, each counted once.
    let mut device = RawSession::open(&controller.url(), &held, hello(SLOW)).await;
    let resubmitted: Vec<pb::Share> = nonces.iter().map(|&n| share(work.id, n, true)).collect();
    let results = device.submit(resubmitted).await;
    assert_eq!(results.len(), nonces.len());
    assert!(results.iter().all(accepted), "{results:?}");
    let status = totals.check(&controller).expect("status");
    let shares = &status["devices"]
        .as_array()
        .and_then(|devices| devices.iter().find(|d| d["name"] == "held"))
        .expect("the held device in the status")["shares"];
    assert_eq!(number(shares, "/accepted"), nonces.len() as u64, "{shares}");
    assert_eq!(number(shares, "/rejected/duplicate"), 0, "{shares}");

    // The agents resume by themselves and their held shares are counted: stopped, each
    // agent's count of acknowledged shares is exactly what the ledger counted for it.
    wait_until(
        "both agents to have shares counted after the outage",
        RECOVERY,
        || {
            let status = totals.check(&controller)?;
            agents
                .iter()
                .all(|(name, _)| {
                    device_accepted(&status, name)
                        .is_some_and(|n| Some(n) > device_accepted(&frozen, name))
                })
                .then_some(())
        },
    );
    for (name, agent) in &mut agents {
        let exit = agent.signal("TERM", RECOVERY);
        assert!(exit.success(), "{name} stopped cleanly: {exit}");
    }
    let status = totals
        .check(&controller)
        .expect("status after the agents stopped");
    for (name, agent) in &agents {
        let counted = status["devices"]
            .as_array()
            .and_then(|devices| devices.iter().find(|d| d["name"] == name.as_str()))
            .map(|d| d["shares"].clone())
            .expect("the agent in the status");
        assert_eq!(
            number(&counted, "/accepted"),
            acknowledged(agent),
            "{name}: every acknowledged share counted, none twice: {counted}"
        );
        assert_eq!(
            number(&counted, "/rejected/duplicate"),
            0,
            "{name}: {counted}"
        );
    }
}
