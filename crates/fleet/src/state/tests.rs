use super::*;
use micromine_proto::work::{header_with_nonce, sha256d};

const NOW: i64 = 1_700_000_000_000;

fn miner(name: &str, site: &str, difficulty: f64, paused: bool) -> MicroMiner {
    let text = format!(
        "apiVersion: micromine.dev/v1alpha1\nkind: MicroMiner\nmetadata: {{name: {name}}}\nspec:\n  selector: {{matchLabels: {{site: {site}}}}}\n  workSource: {{builtin: {{networkDifficulty: {difficulty}}}}}\n  sharesPerMinute: 60\n  assignmentSeconds: 10\n  paused: {paused}\n"
    );
    micromine_resources::microminer::parse_str("test.yaml", &text)
        .expect("valid")
        .remove(0)
}

fn set(miners: &[MicroMiner]) -> MinerSet {
    miners.iter().map(|m| (m.key(), m.clone())).collect()
}

fn hello(site: &str, resume: Vec<pb::ResumedAssignment>) -> pb::Hello {
    pb::Hello {
        capacity: Some(pb::Capacity {
            nominal_hashrate: 1e6,
            mining_threads: 1,
            ..Default::default()
        }),
        labels: [("site".to_string(), site.to_string())].into(),
        version: "test".into(),
        resume: Some(pb::Resume {
            assignments: resume,
        }),
    }
}

fn assignments(fx: &Effects, device: &str) -> Vec<pb::Assignment> {
    fx.messages
        .iter()
        .filter(|(d, _)| d == device)
        .filter_map(|(_, m)| match &m.kind {
            Some(Kind::Assignment(a)) => Some(a.clone()),
            _ => None,
        })
        .collect()
}

fn cancels(fx: &Effects, device: &str) -> Vec<u64> {
    fx.messages
        .iter()
        .filter(|(d, _)| d == device)
        .filter_map(|(_, m)| match &m.kind {
            Some(Kind::Cancel(c)) => Some(c.assignment_ids.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn pool_job(id: &str, clean: bool) -> micromine_stratum::job::PoolJob {
    micromine_stratum::job::PoolJob {
        id: id.into(),
        prev_hash: [3; 32],
        coinb1: vec![1, 2],
        coinb2: vec![3],
        branch: Vec::new(),
        version: 0x2000_0000,
        bits: 0x1d00_ffff,
        time: 1_700_000_000,
        clean,
    }
}

#[test]
fn a_lease_outlasts_its_range_even_on_a_slow_device() {
    let spec = miner("a", "x", 1e12, false);
    let planned = i64::from(spec.spec.assignment_seconds) * 1000;
    // A fast device: its range is assignmentSeconds of work.
    assert_eq!(
        device_lease_ms(&spec, planned as u64 * 1000, 1e6),
        3 * planned
    );
    // A 2 kH/s device with the smallest range (65,536 nonces, 32.8 s of work).
    assert_eq!(device_lease_ms(&spec, MIN_RANGE, 2_000.0), 98_304);
    // No rate known: the plan; an absurdly slow one: a day at most.
    assert_eq!(device_lease_ms(&spec, MIN_RANGE, 0.0), 3 * planned);
    assert_eq!(
        device_lease_ms(&spec, NONCE_SPACE, 1e-9),
        MAX_LEASE_MS - LINK_SLACK_MS
    );
}

#[test]
fn large_fleets_report_less_often_within_bounds() {
    assert_eq!(report_interval_ms(0), 2_000);
    assert_eq!(report_interval_ms(1_500), 2_000);
    assert_eq!(report_interval_ms(10_000), 10_000);
    assert_eq!(report_interval_ms(1_000_000), 15_000);
    assert_eq!(report_interval_ms(usize::MAX), 15_000);
}

#[test]
fn pool_jobs_drive_the_work_and_clean_jobs_make_older_work_stale() {
    let text = "apiVersion: micromine.dev/v1alpha1\nkind: MicroMiner\nmetadata: {name: p}\nspec:\n  selector: {matchLabels: {site: x}}\n  workSource: {stratum: {url: 'stratum+tcp://pool:3333', user: a.b}}\n  sharesPerMinute: 60\n  assignmentSeconds: 10\n";
    let miner = micromine_resources::microminer::parse_str("p.yaml", text)
        .expect("valid")
        .remove(0);
    let key = miner.key();
    let mut s = FleetState::new(Restored::default());
    s.apply_miners(&set(&[miner]), NOW);
    let (_, fx) = s.connect("d", &hello("x", vec![]), NOW);
    assert!(
        assignments(&fx, "d").is_empty(),
        "no work before the pool has a job"
    );
    let connected = UpstreamEvent::Connected {
        session: 7,
        session_id: None,
        pool: "stratum+tcp://pool:3333".into(),
        pool_index: 0,
        extranonce1: vec![0xab],
        extranonce2_size: 4,
        version_mask: None,
    };
    assert!(assignments(&s.upstream_event(&key, connected, NOW), "d").is_empty());
    let fx = s.upstream_event(&key, UpstreamEvent::Difficulty(1e-6), NOW);
    assert!(assignments(&fx, "d").is_empty());
    let fx = s.upstream_event(&key, UpstreamEvent::Job(pool_job("j1", true)), NOW + 1);
    let first = assignments(&fx, "d");
    assert_eq!(first.len(), LEASES_PER_DEVICE);
    let share = |a: &pb::Assignment| pb::Share {
        assignment_id: a.id,
        nonce: a.nonce_start as u32,
        ..Default::default()
    };
    match &s.check_shares("d", &[share(&first[0])])[0] {
        ShareCheck::Verify {
            pool_target: Some(target),
            header,
            ..
        } => {
            assert_eq!(*target, Target::from_difficulty(1e-6).expect("target"));
            assert_eq!(header.upstream.as_ref().expect("pool work").job_id, "j1");
        }
        other => panic!("{other:?}"),
    }
    // A job that does not clean keeps the devices' work; one that cleans takes it back
    // and hands out the new job at once.
    let fx = s.upstream_event(&key, UpstreamEvent::Job(pool_job("j2", false)), NOW + 2);
    assert!(cancels(&fx, "d").is_empty());
    let fx = s.upstream_event(&key, UpstreamEvent::Job(pool_job("j3", true)), NOW + 3);
    let mut cancelled = cancels(&fx, "d");
    cancelled.sort_unstable();
    let mut held: Vec<u64> = first.iter().map(|a| a.id).collect();
    held.sort_unstable();
    assert_eq!(cancelled, held);
    let fresh = assignments(&fx, "d");
    assert_eq!(fresh.len(), LEASES_PER_DEVICE);
    // A share of the cancelled work, arriving late, is stale.
    match &s.check_shares("d", &[share(&first[1])])[0] {
        ShareCheck::Reject { reason, .. } => assert_eq!(*reason, RejectReason::Stale),
        other => panic!("{other:?}"),
    }
    // While the pool is away devices keep what they hold, and get nothing new.
    s.upstream_event(
        &key,
        UpstreamEvent::Disconnected {
            error: "gone".into(),
        },
        NOW + 4,
    );
    let fx = s.tick(NOW + 5);
    assert!(cancels(&fx, "d").is_empty() && assignments(&fx, "d").is_empty());
    assert!(matches!(
        &s.check_shares("d", &[share(&fresh[0])])[0],
        ShareCheck::Verify { .. }
    ));
    let (miners, _) = s.view(NOW + 5, &|_| Totals::default());
    let pool = miners[0].status.pool.clone().expect("pool status");
    assert_eq!(
        (pool.state.as_str(), pool.last_error.as_deref()),
        ("Disconnected", Some("gone"))
    );
    let condition = miners[0]
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "PoolConnected")
        .expect("condition");
    assert_eq!(
        (condition.status.as_str(), condition.reason.as_str()),
        ("False", "PoolUnreachable")
    );
}

#[test]
fn after_a_restart_a_device_keeps_the_leases_it_resumes() {
    let m = miner("a", "x", 1e12, false);
    let mut s = FleetState::new(Restored::default());
    let mut ops = s.apply_miners(&set(std::slice::from_ref(&m)), NOW).persist;
    let (_, fx) = s.connect("d", &hello("x", vec![]), NOW);
    let held = assignments(&fx, "d");
    assert_eq!(held.len(), LEASES_PER_DEVICE);
    ops.extend(fx.persist);
    let mut s = FleetState::new(restored_from(ops));
    let fx = s.apply_miners(&set(&[m]), NOW + 1_000);
    assert!(cancels(&fx, "d").is_empty());
    let (_, fx) = s.connect("d", &hello("x", resuming(&held)), NOW + 2_000);
    let kept = welcome_kept(&fx).expect("a welcome");
    assert_eq!(kept, held.iter().map(|a| a.id).collect::<Vec<_>>());
    assert!(cancels(&fx, "d").is_empty());
    assert!(assignments(&fx, "d").is_empty(), "it holds enough already");
}

#[test]
fn assignments_sent_before_their_writes_are_never_reused_after_a_crash() {
    let m = miner("a", "x", 1e12, false);
    let mut s = FleetState::new(Restored::default());
    let mut durable = s.apply_miners(&set(std::slice::from_ref(&m)), NOW).persist;
    let (_, fx) = s.connect("d", &hello("x", vec![]), NOW);
    // The first assignments open a header and reserve ids: they wait for the disk.
    assert!(fx.messages_wait_for_writes());
    durable.extend(fx.persist);
    // The next come from that header and those ids: they leave at once, and the
    // crash forgets their writes.
    let (_, fx) = s.connect("e", &hello("x", vec![]), NOW + 100);
    let forgotten = assignments(&fx, "e");
    assert_eq!(forgotten.len(), LEASES_PER_DEVICE);
    assert!(!fx.messages_wait_for_writes(), "{:?}", fx.persist);

    let mut s = FleetState::new(restored_from(durable));
    s.apply_miners(&set(&[m]), NOW + 1_000);
    let (_, fx) = s.connect("e", &hello("x", resuming(&forgotten)), NOW + 2_000);
    assert_eq!(
        welcome_kept(&fx),
        Some(vec![]),
        "the device is told to drop them"
    );
    let (_, more) = s.connect("f", &hello("x", vec![]), NOW + 3_000);
    let fresh: Vec<pb::Assignment> = [assignments(&fx, "e"), assignments(&more, "f")].concat();
    assert_eq!(fresh.len(), 2 * LEASES_PER_DEVICE);
    for new in &fresh {
        for old in &forgotten {
            assert!(new.id > old.id, "id {} handed out again", old.id);
            assert!(
                new.header_prefix != old.header_prefix
                    || new.nonce_end <= old.nonce_start
                    || old.nonce_end <= new.nonce_start,
                "nonces of assignment {} handed out again in {}",
                old.id,
                new.id
            );
        }
    }
}

/// A `Hello`'s resume list for `held`, each scanned a little.
fn resuming(held: &[pb::Assignment]) -> Vec<pb::ResumedAssignment> {
    held.iter()
        .map(|a| pb::ResumedAssignment {
            assignment_id: a.id,
            scanned_until: a.nonce_start + 10,
        })
        .collect()
}

/// The assignment ids a `Welcome` among `fx` says the device keeps.
fn welcome_kept(fx: &Effects) -> Option<Vec<u64>> {
    fx.messages.iter().find_map(|(_, m)| match &m.kind {
        Some(Kind::Welcome(w)) => Some(w.resumed_assignment_ids.clone()),
        _ => None,
    })
}

/// What the store gives the next process after `ops` were made durable.
fn restored_from(ops: Vec<PersistOp>) -> Restored {
    let mut restored = Restored::default();
    for op in ops {
        match op {
            PersistOp::Ids(ids) => restored.ids = ids,
            PersistOp::Tip(key, tip) => {
                restored.tips.insert(key, tip);
            }
            PersistOp::Header(header) => restored.headers.push(header),
            PersistOp::DeleteHeader(id) => restored.headers.retain(|h| h.id != id),
            PersistOp::Lease(lease) => restored.leases.push(lease),
            PersistOp::DeleteLease(id) => restored.leases.retain(|l| l.lease.id != id),
            PersistOp::EndedLease(ended) => restored.ended_leases.push(ended),
            PersistOp::ForgetEndedLease(id) => {
                restored.ended_leases.retain(|e| e.record.lease.id != id)
            }
            PersistOp::Device(device) => {
                restored.devices.retain(|d| d.name != device.name);
                restored.devices.push(device);
            }
            PersistOp::PoolSession(key, record) => match record {
                Some(record) => {
                    restored.pool_sessions.insert(key, *record);
                }
                None => {
                    restored.pool_sessions.remove(&key);
                }
            },
            _ => {}
        }
    }
    restored
}

#[test]
fn after_a_restart_pool_work_stays_if_the_pool_resumes_the_session_and_goes_if_not() {
    let text = "apiVersion: micromine.dev/v1alpha1\nkind: MicroMiner\nmetadata: {name: p}\nspec:\n  selector: {matchLabels: {site: x}}\n  workSource: {stratum: {url: 'stratum+tcp://pool:3333', user: a.b}}\n  sharesPerMinute: 60\n  assignmentSeconds: 10\n";
    let miner = micromine_resources::microminer::parse_str("p.yaml", text)
        .expect("valid")
        .remove(0);
    let key = miner.key();
    let connected = |session: u64| UpstreamEvent::Connected {
        session,
        session_id: Some("sub".into()),
        pool: "stratum+tcp://pool:3333".into(),
        pool_index: 0,
        extranonce1: vec![1],
        extranonce2_size: 4,
        version_mask: None,
    };
    let mut s = FleetState::new(Restored::default());
    let mut ops = s
        .apply_miners(&set(std::slice::from_ref(&miner)), NOW)
        .persist;
    ops.extend(s.connect("d", &hello("x", vec![]), NOW).1.persist);
    ops.extend(s.upstream_event(&key, connected(7), NOW).persist);
    let fx = s.upstream_event(&key, UpstreamEvent::Job(pool_job("j", true)), NOW);
    let held = assignments(&fx, "d");
    assert_eq!(held.len(), LEASES_PER_DEVICE);
    ops.extend(fx.persist);
    let resume: Vec<pb::ResumedAssignment> = held
        .iter()
        .map(|a| pb::ResumedAssignment {
            assignment_id: a.id,
            scanned_until: a.nonce_start,
        })
        .collect();
    for (session, voided) in [(7, false), (8, true)] {
        let mut s = FleetState::new(restored_from(ops.clone()));
        s.apply_miners(&set(std::slice::from_ref(&miner)), NOW + 1_000);
        assert_eq!(
            s.resume_hint(&key).map(|h| (h.session, h.session_id)),
            Some((7, "sub".into()))
        );
        let (_, fx) = s.connect("d", &hello("x", resume.clone()), NOW + 2_000);
        assert!(
            assignments(&fx, "d").is_empty(),
            "no new work before the pool is back"
        );
        let fx = s.upstream_event(&key, connected(session), NOW + 3_000);
        let mut cancelled = cancels(&fx, "d");
        cancelled.sort_unstable();
        if voided {
            assert_eq!(
                cancelled,
                held.iter().map(|a| a.id).collect::<Vec<_>>(),
                "a new session voids the old work"
            );
        } else {
            assert!(cancelled.is_empty(), "the resumed session keeps it");
            let share = pb::Share {
                assignment_id: held[0].id,
                nonce: held[0].nonce_start as u32,
                ..Default::default()
            };
            assert!(matches!(
                &s.check_shares("d", &[share])[0],
                ShareCheck::Verify {
                    pool_target: Some(_),
                    ..
                }
            ));
        }
    }
}

#[test]
fn a_connecting_device_is_welcomed_and_given_two_persisted_leases() {
    let mut s = FleetState::new(Restored::default());
    s.apply_miners(&set(&[miner("a", "x", 1.0, false)]), NOW);
    let (_, fx) = s.connect("d1", &hello("x", vec![]), NOW);
    assert!(
        matches!(fx.messages[0].1.kind, Some(Kind::Welcome(_))),
        "Welcome comes first"
    );
    let given = assignments(&fx, "d1");
    assert_eq!(given.len(), LEASES_PER_DEVICE);
    // 1 MH/s for 10 s.
    assert_eq!(given[0].nonce_end - given[0].nonce_start, 10_000_000);
    let persisted = fx
        .persist
        .iter()
        .filter(|op| matches!(op, PersistOp::Lease(_)))
        .count();
    assert_eq!(persisted, 2);
    assert!(
        fx.persist
            .iter()
            .any(|op| matches!(op, PersistOp::Header(_)))
    );

    // Finishing one brings a new one; nothing is cancelled.
    let fx = s.progress(
        "d1",
        &pb::Progress {
            assignment_id: given[0].id,
            scanned_until: given[0].nonce_end,
            hashes: 0,
            finished: true,
        },
        NOW + 1000,
    );
    assert_eq!(assignments(&fx, "d1").len(), 1);
    assert!(cancels(&fx, "d1").is_empty());
}

#[test]
fn devices_without_a_matching_miner_or_with_a_paused_one_get_nothing() {
    let mut s = FleetState::new(Restored::default());
    s.apply_miners(&set(&[miner("a", "x", 1.0, false)]), NOW);
    let (_, fx) = s.connect("stranger", &hello("elsewhere", vec![]), NOW);
    assert!(assignments(&fx, "stranger").is_empty());
    let (_, fx) = s.connect("d1", &hello("x", vec![]), NOW);
    let held: Vec<u64> = assignments(&fx, "d1").iter().map(|a| a.id).collect();
    let fx = s.apply_miners(&set(&[miner("a", "x", 1.0, true)]), NOW + 1);
    assert_eq!(
        cancels(&fx, "d1"),
        held,
        "pausing cancels what devices hold"
    );
    assert!(
        s.tick(NOW + 2).messages.is_empty(),
        "and hands out nothing while paused"
    );
    let fx = s.apply_miners(&set(&[miner("a", "x", 1.0, false)]), NOW + 3);
    assert_eq!(assignments(&fx, "d1").len(), 2, "unpausing resumes");
    // Deleting the MicroMiner cancels too.
    let fx = s.apply_miners(&MinerSet::new(), NOW + 4);
    assert_eq!(cancels(&fx, "d1").len(), 2);
}

/// A MicroMiner on site x with economics: 1 MH/s devices at 5 W (unless measured),
/// a network of difficulty 1 and a block worth `block_value` at 0.12 per kWh.
fn paying_miner(block_value: f64) -> MicroMiner {
    let text = format!(
        "apiVersion: micromine.dev/v1alpha1\nkind: MicroMiner\nmetadata: {{name: a}}\nspec:\n  selector: {{matchLabels: {{site: x}}}}\n  workSource: {{builtin: {{networkDifficulty: 1e12}}}}\n  economics:\n    energyPricePerKWh: 0.12\n    coinPrice: {block_value}\n    blockReward: 1\n    networkDifficulty: 1\n    deviceWattsByClass: {{gateway: 8}}\n"
    );
    micromine_resources::microminer::parse_str("test.yaml", &text)
        .expect("valid")
        .remove(0)
}

fn condition(s: &mut FleetState, now: i64, type_: &str) -> (String, String) {
    let (miners, _) = s.view(now, &|_| Totals::default());
    let c = miners[0]
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("a {type_} condition"))
        .clone();
    (c.status, c.reason)
}

#[test]
fn an_unprofitable_miner_with_pause_when_unprofitable_takes_its_work_back() {
    let paying = |value: f64| {
        let mut m = paying_miner(value);
        if let Some(e) = m.spec.economics.as_mut() {
            e.pause_when_unprofitable = true;
        }
        m
    };
    let mut s = FleetState::new(Restored::default());
    s.apply_miners(&set(&[paying(1.0)]), NOW);
    let (_, fx) = s.connect("d1", &hello("x", vec![]), NOW);
    let held: Vec<u64> = assignments(&fx, "d1").iter().map(|a| a.id).collect();
    assert!(s.tick(NOW).messages.is_empty());

    s.apply_miners(&set(&[paying(0.0001)]), NOW + 1000);
    let fx = s.tick(NOW + 1000);
    assert_eq!(cancels(&fx, "d1"), held, "its work is taken back");
    assert!(
        assignments(&s.tick(NOW + 2000), "d1").is_empty(),
        "and none handed out"
    );
    assert_eq!(
        condition(&mut s, NOW + 2000, "Paused"),
        ("True".into(), "Unprofitable".into())
    );
    assert_eq!(condition(&mut s, NOW + 2000, "Ready").1, "Unprofitable");
    assert_eq!(condition(&mut s, NOW + 2000, "Profitable").0, "False");

    s.apply_miners(&set(&[paying(1.0)]), NOW + 3000);
    assert_eq!(
        assignments(&s.tick(NOW + 3000), "d1").len(),
        LEASES_PER_DEVICE,
        "it pays again: work resumes"
    );
    assert_eq!(
        condition(&mut s, NOW + 3000, "Paused"),
        ("False".into(), "Running".into())
    );
}

fn profitable_condition(s: &mut FleetState, now: i64) -> (String, String, String) {
    let (miners, _) = s.view(now, &|_| Totals::default());
    let c = miners[0]
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Profitable")
        .expect("a Profitable condition")
        .clone();
    (c.status, c.reason, c.message)
}

#[test]
fn economics_account_energy_and_judge_profitability_with_a_margin() {
    // 1 MH/s on difficulty 1: 3600e6 / 2^32 = 0.8381903 blocks an hour.
    // 5 W at 0.12 per kWh cost 0.0006 an hour, so a block must be worth more than
    // 0.0006 / 0.8381903 = 0.000715828 for the device to pay.
    let mut s = FleetState::new(Restored::default());
    s.apply_miners(&set(&[paying_miner(1.0)]), NOW);
    let (_, fx) = s.connect("d1", &hello("x", vec![]), NOW);
    assert_eq!(assignments(&fx, "d1").len(), LEASES_PER_DEVICE);
    s.tick(NOW);
    let (status, reason, message) = profitable_condition(&mut s, NOW);
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "RevenueCoversEnergy")
    );
    assert!(message.contains("5.0 W"), "{message}");

    // Two seconds of 5 W while holding work: 10 J.
    s.tick(NOW + 1000);
    s.tick(NOW + 2000);
    let (miners, _) = s.view(NOW + 2000, &|_| Totals::default());
    let economics = miners[0]
        .status
        .economics
        .clone()
        .expect("economics status");
    assert_eq!(economics.power_watts, 5.0);
    assert!(
        (economics.energy_k_wh - 10.0 / 3.6e6).abs() < 1e-15,
        "{economics:?}"
    );
    assert!((economics.cost_per_hour - 0.0006).abs() < 1e-12);
    // A long stall is not counted as drawn power.
    s.tick(NOW + 3_600_000);
    let (miners, _) = s.view(NOW + 3_600_000, &|_| Totals::default());
    let stalled = miners[0]
        .status
        .economics
        .clone()
        .expect("economics status");
    assert!(
        stalled.energy_k_wh * 3.6e6 <= 10.0 + 5.0 * 10.0 + 1e-9,
        "{stalled:?}"
    );

    // The coin falls: energy costs more than the work is worth.
    let t = NOW + 3_601_000;
    s.apply_miners(&set(&[paying_miner(0.0007)]), t);
    s.tick(t);
    assert_eq!(profitable_condition(&mut s, t).1, "EnergyCostsMore");
    // Just above break-even is not enough to turn back on (margin 5 %)...
    s.apply_miners(&set(&[paying_miner(0.00073)]), t + 1000);
    s.tick(t + 1000);
    assert_eq!(profitable_condition(&mut s, t + 1000).0, "False");
    // ...clearly above is.
    s.apply_miners(&set(&[paying_miner(0.00076)]), t + 2000);
    s.tick(t + 2000);
    assert_eq!(profitable_condition(&mut s, t + 2000).0, "True");
}

#[test]
fn energy_totals_are_persisted_and_restored() {
    let mut s = FleetState::new(Restored::default());
    s.apply_miners(&set(&[paying_miner(1.0)]), NOW);
    s.connect("d1", &hello("x", vec![]), NOW);
    let saved = |fx: &Effects| {
        fx.persist.iter().find_map(|op| match op {
            PersistOp::Energy(joules) => Some(joules.clone()),
            _ => None,
        })
    };
    assert!(saved(&s.tick(NOW)).is_some(), "the first tick saves");
    let mut last = None;
    for step in 1..=70 {
        if let Some(joules) = saved(&s.tick(NOW + step * 1000)) {
            last = Some((step, joules));
        }
    }
    let (step, joules) = last.expect("saved again within a minute");
    assert_eq!(step, 60);
    assert_eq!(joules["default/a"], 5.0 * 60.0);
    let mut restored = FleetState::new(Restored {
        energy_joules: joules,
        ..Restored::default()
    });
    restored.apply_miners(&set(&[paying_miner(1.0)]), NOW);
    let (miners, _) = restored.view(NOW, &|_| Totals::default());
    let economics = miners[0].status.economics.clone().expect("economics");
    assert!((economics.energy_k_wh * 3.6e6 - 300.0).abs() < 1e-9);
}

#[test]
fn a_device_its_limits_stop_gets_no_new_work_until_it_can_hash() {
    let mut s = FleetState::new(Restored::default());
    s.apply_miners(&set(&[miner("a", "x", 1.0, false)]), NOW);
    let (_, fx) = s.connect("d1", &hello("x", vec![]), NOW);
    let held = assignments(&fx, "d1");
    let report = |state: &str| pb::CapacityReport {
        hashrate: 0.0,
        state: state.into(),
        ..Default::default()
    };
    s.report("d1", &report("paused:battery"), NOW + 1);
    // Its leases run out; nothing replaces them while it is paused.
    let later = NOW + 10 * 60_000;
    for id in held.iter().map(|a| a.id) {
        s.progress(
            "d1",
            &pb::Progress {
                assignment_id: id,
                scanned_until: 0,
                hashes: 0,
                finished: true,
            },
            later,
        );
    }
    assert!(assignments(&s.tick(later), "d1").is_empty());
    let (miners, devices) = s.view(later, &|_| Totals::default());
    assert_eq!(devices[0].state, "paused:battery");
    assert_eq!(miners[0].status.devices.throttled, 1);
    // A thermal throttle still hashes (at half speed): it keeps getting work.
    s.report("d1", &report("throttled:thermal"), later + 1);
    assert_eq!(
        assignments(&s.tick(later + 2), "d1").len(),
        LEASES_PER_DEVICE
    );
    s.report("d1", &report("outside-window"), later + 3);
    let (_, devices) = s.view(later + 3, &|_| Totals::default());
    assert_eq!(devices[0].state, "outside-window");
}

#[test]
fn a_stopping_device_hands_its_ranges_back_and_gets_none_in_their_place() {
    let mut s = FleetState::new(Restored::default());
    s.apply_miners(&set(&[miner("a", "x", 1.0, false)]), NOW);
    let (_, fx) = s.connect("d1", &hello("x", vec![]), NOW);
    let held = assignments(&fx, "d1");
    assert_eq!(held.len(), LEASES_PER_DEVICE);
    s.report(
        "d1",
        &pb::CapacityReport {
            state: "stopping".into(),
            ..Default::default()
        },
        NOW + 1,
    );
    for id in held.iter().map(|a| a.id) {
        let fx = s.progress(
            "d1",
            &pb::Progress {
                assignment_id: id,
                scanned_until: 0,
                hashes: 0,
                finished: true,
            },
            NOW + 2,
        );
        assert!(assignments(&fx, "d1").is_empty(), "no range in its place");
    }
    assert!(assignments(&s.tick(NOW + 3), "d1").is_empty());
    assert_eq!(
        s.scheduler.lease_count("d1"),
        0,
        "nothing left leased to it"
    );
}

#[test]
fn a_found_block_makes_older_work_stale() {
    let mut s = FleetState::new(Restored::default());
    // Difficulty so low that every hash meets the network target.
    s.apply_miners(&set(&[miner("a", "x", 1e-12, false)]), NOW);
    let (_, fx) = s.connect("d1", &hello("x", vec![]), NOW);
    let given = assignments(&fx, "d1");
    let first = &given[0];
    let share = pb::Share {
        assignment_id: first.id,
        nonce: first.nonce_start as u32,
        resubmitted: false,
    };
    let ShareCheck::Verify { header, .. } =
        s.check_shares("d1", std::slice::from_ref(&share)).remove(0)
    else {
        panic!("a live lease's share is verified")
    };
    let hash = sha256d(&header_with_nonce(&header.prefix, share.nonce));
    assert!(header.network_target().is_met_by(&hash));
    let fx = s.shares_recorded(
        "d1",
        &[RecordedShare {
            assignment_id: share.assignment_id,
            nonce: share.nonce,
            miner: "default/a".into(),
            difficulty: 1e-9,
            header: header.clone(),
            block_hash: Some(hash),
        }],
        NOW + 10,
    );
    let cancelled = cancels(&fx, "d1");
    assert_eq!(
        cancelled.len(),
        2,
        "every lease on the old tip is cancelled"
    );
    let fresh = assignments(&fx, "d1");
    assert_eq!(fresh.len(), 2);
    assert_ne!(fresh[0].header_prefix, first.header_prefix);
    // The new header builds on the block just found.
    assert_eq!(&fresh[0].header_prefix[4..36], &hash[..]);
    match s.check_shares("d1", &[share]).remove(0) {
        ShareCheck::Reject { reason, .. } => assert_eq!(reason, RejectReason::Stale),
        other => panic!("expected stale, got {other:?}"),
    }
}

#[test]
fn a_reconnecting_device_keeps_what_it_resumes_and_loses_the_rest() {
    let mut s = FleetState::new(Restored::default());
    s.apply_miners(&set(&[miner("a", "x", 1.0, false)]), NOW);
    let (first_session, fx) = s.connect("d1", &hello("x", vec![]), NOW);
    let given = assignments(&fx, "d1");
    s.disconnect("d1", first_session, NOW + 1);
    assert!(
        s.tick(NOW + 2).messages.is_empty(),
        "a disconnected device keeps its leases quietly"
    );
    let resume = vec![pb::ResumedAssignment {
        assignment_id: given[0].id,
        scanned_until: given[0].nonce_start + 5,
    }];
    let (_, fx) = s.connect("d1", &hello("x", resume), NOW + 3);
    let Some(Kind::Welcome(welcome)) = &fx.messages[0].1.kind else {
        panic!("welcome first")
    };
    assert_eq!(welcome.resumed_assignment_ids, vec![given[0].id]);
    let lease = |id: u64| s.leases().into_iter().find(|l| l.id == id);
    assert!(
        lease(given[1].id).is_none(),
        "the forgotten lease was reclaimed"
    );
    assert_eq!(
        lease(given[0].id).map(|l| l.scanned_until),
        Some(given[0].nonce_start + 5)
    );
    // It is topped up to two again, starting with the reclaimed range.
    let topped = assignments(&fx, "d1");
    assert_eq!(topped.len(), 1);
    assert_eq!(topped[0].nonce_start, given[1].nonce_start);
}

#[test]
fn an_unschedulable_device_gives_its_work_back_and_gets_none_until_uncordoned() {
    let mut s = FleetState::new(Restored::default());
    s.apply_miners(&set(&[miner("a", "north", 1.0, false)]), NOW);
    // Cordoned before it ever connected: the API server may say so first.
    s.set_unschedulable("d2", true, NOW);
    let (_, fx) = s.connect("d2", &hello("north", vec![]), NOW);
    assert!(assignments(&fx, "d2").is_empty());

    let (_, fx) = s.connect("d1", &hello("north", vec![]), NOW);
    let given: Vec<u64> = assignments(&fx, "d1").iter().map(|a| a.id).collect();
    assert_eq!(given.len(), LEASES_PER_DEVICE);

    let fx = s.set_unschedulable("d1", true, NOW + 1);
    let mut cancelled = cancels(&fx, "d1");
    cancelled.sort_unstable();
    assert_eq!(cancelled, given);
    assert!(s.leases().is_empty());
    assert!(
        s.tick(NOW + 2).messages.is_empty(),
        "nothing handed out on tick"
    );
    let (_, devices) = s.view(NOW + 2, &|_| Totals::default());
    let d1 = devices
        .iter()
        .find(|d| d.name == "d1")
        .expect("d1 in the view");
    assert_eq!(
        (d1.state.as_str(), d1.unschedulable),
        ("unschedulable", true)
    );
    assert!(
        s.set_unschedulable("d1", true, NOW + 3).is_empty(),
        "idempotent"
    );

    let fx = s.set_unschedulable("d1", false, NOW + 4);
    assert_eq!(assignments(&fx, "d1").len(), LEASES_PER_DEVICE);
}

#[test]
fn relabelling_moves_a_device_between_miners() {
    let mut s = FleetState::new(Restored::default());
    s.apply_miners(
        &set(&[
            miner("a", "north", 1.0, false),
            miner("b", "south", 1.0, false),
        ]),
        NOW,
    );
    let (_, fx) = s.connect("d1", &hello("north", vec![]), NOW);
    assert!(
        assignments(&fx, "d1")
            .iter()
            .all(|a| a.miner == "default/a")
    );
    let (_, fx) = s.connect("d1", &hello("south", vec![]), NOW + 1);
    assert!(
        assignments(&fx, "d1")
            .iter()
            .all(|a| a.miner == "default/b")
    );
    let shares_of_old: Vec<Lease> = s
        .leases()
        .into_iter()
        .filter(|l| l.device == "d1")
        .collect();
    assert_eq!(shares_of_old.len(), 2);
}

#[test]
fn leases_expire_and_their_remainder_goes_to_the_next_device() {
    let mut s = FleetState::new(Restored::default());
    s.apply_miners(&set(&[miner("a", "x", 1e12, false)]), NOW);
    let (session, fx) = s.connect("d1", &hello("x", vec![]), NOW);
    let given = assignments(&fx, "d1");
    s.progress(
        "d1",
        &pb::Progress {
            assignment_id: given[0].id,
            scanned_until: given[0].nonce_start + 1000,
            hashes: 1000,
            finished: false,
        },
        NOW + 1,
    );
    s.disconnect("d1", session, NOW + 2);
    let (_, fx) = s.connect("d2", &hello("x", vec![]), NOW + 3);
    // While d1's leases live, d2 gets fresh nonces only.
    for a in assignments(&fx, "d2") {
        assert!(a.nonce_start >= given[1].nonce_end);
    }
    let fx = s.tick(NOW + i64::from(given[0].lease_ms) + LINK_SLACK_MS + 10);
    let deletes = fx
        .persist
        .iter()
        .filter(|op| matches!(op, PersistOp::DeleteLease(_)))
        .count();
    assert_eq!(
        deletes, 4,
        "d1's two leases and d2's two (same lease time) expired"
    );
    // d2 is topped up from the reclaimed ranges first: d1's first range from where d1
    // had got to.
    let next = assignments(&fx, "d2");
    assert_eq!(next.len(), 2);
    assert_eq!(next[0].nonce_start, given[0].nonce_start + 1000);
    assert_eq!(next[0].header_prefix, given[0].header_prefix);
}

#[test]
fn a_recorded_share_moves_the_reclaimed_remainder_past_it() {
    let mut s = FleetState::new(Restored::default());
    s.apply_miners(&set(&[miner("a", "x", 1e12, false)]), NOW);
    let (session, fx) = s.connect("d1", &hello("x", vec![]), NOW);
    let given = assignments(&fx, "d1");
    let start = given[0].nonce_start;
    // Reported: 1,000 nonces. A share at 5,000 arrives before the next report.
    s.progress(
        "d1",
        &pb::Progress {
            assignment_id: given[0].id,
            scanned_until: start + 1000,
            hashes: 1000,
            finished: false,
        },
        NOW + 1,
    );
    let share = pb::Share {
        assignment_id: given[0].id,
        nonce: (start + 5000) as u32,
        resubmitted: false,
    };
    let ShareCheck::Verify { header, .. } =
        s.check_shares("d1", std::slice::from_ref(&share)).remove(0)
    else {
        panic!("a live lease's share is checked")
    };
    s.shares_recorded(
        "d1",
        &[RecordedShare {
            assignment_id: share.assignment_id,
            nonce: share.nonce,
            miner: "default/a".into(),
            difficulty: 1e-9,
            header,
            block_hash: None,
        }],
        NOW + 2,
    );
    // The device vanishes; whoever gets the remainder starts after the share.
    s.disconnect("d1", session, NOW + 3);
    s.connect("d2", &hello("x", vec![]), NOW + 4);
    let fx = s.tick(NOW + i64::from(given[0].lease_ms) + LINK_SLACK_MS + 10);
    let next = assignments(&fx, "d2");
    assert_eq!(next[0].header_prefix, given[0].header_prefix);
    assert_eq!(next[0].nonce_start, start + 5001);
}

#[test]
fn the_prune_floor_keeps_every_header_a_share_may_still_name() {
    let mut s = FleetState::new(Restored::default());
    assert_eq!(
        s.oldest_live_header(),
        1,
        "nothing issued: everything below the next id"
    );
    s.apply_miners(&set(&[miner("a", "x", 1e-12, false)]), NOW);
    let (_, fx) = s.connect("d1", &hello("x", vec![]), NOW);
    let first = assignments(&fx, "d1").remove(0);
    let ShareCheck::Verify { header, .. } = s
        .check_shares(
            "d1",
            &[pb::Share {
                assignment_id: first.id,
                nonce: first.nonce_start as u32,
                resubmitted: false,
            }],
        )
        .remove(0)
    else {
        panic!("verified")
    };
    assert_eq!(s.oldest_live_header(), header.id);
    // A block retires the header; it stays the floor only while an ended lease names it.
    let hash = sha256d(&header_with_nonce(&header.prefix, first.nonce_start as u32));
    s.shares_recorded(
        "d1",
        &[RecordedShare {
            assignment_id: first.id,
            nonce: first.nonce_start as u32,
            miner: "default/a".into(),
            difficulty: 1.0,
            header: header.clone(),
            block_hash: Some(hash),
        }],
        NOW,
    );
    assert!(
        s.oldest_live_header() > header.id,
        "retired with its leases cancelled, not ended"
    );
}

/// A view is a read: looking at the fleet changes no condition, and a condition's
/// transition time is when the fleet changed (the tick that saw the device mining), not
/// when someone happened to look.
#[test]
fn views_change_nothing_and_transitions_carry_the_time_of_the_change() {
    let ready = |s: &FleetState, now: i64| {
        let (miners, _) = s.view(now, &|_| Totals::default());
        miners[0]
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .cloned()
            .expect("a Ready condition")
    };
    let mut s = FleetState::new(Restored::default());
    s.apply_miners(&set(&[miner("a", "x", 1.0, false)]), NOW);
    assert_eq!(ready(&s, NOW).reason, "NoDevices");
    s.connect("d1", &hello("x", vec![]), NOW + 1_000);
    // Until the fleet's own clock comes round, the condition is as it was, however often
    // and whenever it is looked at.
    let before = ready(&s, NOW + 1_500);
    assert_eq!(
        (before.status.as_str(), before.reason.as_str()),
        ("False", "NoDevices")
    );
    assert_eq!(ready(&s, NOW + 1_900), before);
    s.tick(NOW + 2_000);
    let after = ready(&s, NOW + 9_000);
    assert_eq!(
        (after.status.as_str(), after.reason.as_str()),
        ("True", "Mining")
    );
    assert_eq!(
        after.last_transition_time,
        crate::conditions::time_from_unix_ms(NOW + 2_000).expect("time"),
        "the tick's time, not the view's"
    );
    assert_eq!(ready(&s, NOW + 60_000), after);
}

/// What `check_share` decided, in the terms the ledger and the device see: the header and
/// lease it is judged against, or the reason it is refused.
fn verdict(s: &FleetState, device: &str, a: &pb::Assignment) -> String {
    let share = pb::Share {
        assignment_id: a.id,
        nonce: a.nonce_start as u32,
        resubmitted: true,
    };
    match s.check_shares(device, &[share]).remove(0) {
        ShareCheck::Verify {
            header,
            range,
            target,
            difficulty,
            miner,
            pool_target,
            ..
        } => format!(
            "verify header {} {:?} range {range:?} target {target:?} difficulty {difficulty} miner {miner} pool {pool_target:?}",
            header.id, header.prefix
        ),
        ShareCheck::Reject {
            reason,
            miner,
            foreign,
            ..
        } => format!("reject {reason:?} miner {miner:?} foreign {foreign}"),
    }
}

/// A device claiming enough hash rate that each of its ranges is a whole header: when it
/// finishes one, the header is used up and dropped while the lease is still remembered.
fn whole_header_hello() -> pb::Hello {
    let mut h = hello("x", vec![]);
    if let Some(capacity) = h.capacity.as_mut() {
        capacity.nominal_hashrate = 1e10;
    }
    h
}

/// The debt of issue 21: a share counted durably, whose answer the crash lost, is
/// resubmitted to the restarted controller. Its lease had ended (here: finished, which also
/// used its header up); the restarted controller must judge it against that lease, as the
/// old one would have (the ledger then answers `AlreadyRecorded`, accepted), not `stale`.
#[test]
fn a_share_for_a_lease_that_ended_before_a_crash_is_judged_after_it_as_before() {
    let m = miner("a", "x", 1e12, false);
    let mut s = FleetState::new(Restored::default());
    let mut durable = s.apply_miners(&set(std::slice::from_ref(&m)), NOW).persist;
    let (_, fx) = s.connect("d", &whole_header_hello(), NOW);
    let held = assignments(&fx, "d");
    durable.extend(fx.persist);
    assert_eq!(held[0].nonce_end - held[0].nonce_start, NONCE_SPACE);
    let fx = s.progress(
        "d",
        &pb::Progress {
            assignment_id: held[0].id,
            scanned_until: held[0].nonce_end,
            hashes: NONCE_SPACE,
            finished: true,
        },
        NOW + 1_000,
    );
    durable.extend(fx.persist);
    // The tick that forgets the used-up header's prefix keeps it stored.
    let fx = s.tick(NOW + 1_500);
    assert!(
        !fx.persist
            .iter()
            .any(|op| matches!(op, PersistOp::DeleteHeader(_))),
        "the used-up header stays stored while its ended lease is remembered: {:?}",
        fx.persist
    );
    durable.extend(fx.persist);
    let before = verdict(&s, "d", &held[0]);
    assert!(before.starts_with("verify"), "{before}");
    let floor = s.oldest_live_header();

    let mut s = FleetState::new(restored_from(durable));
    s.apply_miners(&set(&[m]), NOW + 2_000);
    assert!(s.forget_ended_leases(NOW + 2_000).is_empty());
    assert_eq!(verdict(&s, "d", &held[0]), before);
    assert_eq!(
        s.oldest_live_header(),
        floor,
        "the ledger keeps the share records a resubmission is checked against"
    );
    // Another device's claim to it is still foreign, as before.
    assert!(verdict(&s, "e", &held[0]).contains("foreign true"));
}

/// Leases are remembered for [`ENDED_LEASE_MEMORY_MS`] after they end, counted from when
/// they ended, not from the restart: one whose window closed while the controller was
/// down is forgotten (with the header only it kept stored), one still inside is judged.
#[test]
fn after_a_restart_ended_leases_are_remembered_for_what_is_left_of_their_window() {
    let m = miner("a", "x", 1e12, false);
    let mut s = FleetState::new(Restored::default());
    let mut durable = s.apply_miners(&set(std::slice::from_ref(&m)), NOW).persist;
    let (_, fx) = s.connect("d", &whole_header_hello(), NOW);
    let held = assignments(&fx, "d");
    durable.extend(fx.persist);
    // The first ends now, finished; the second expires later.
    durable.extend(
        s.progress(
            "d",
            &pb::Progress {
                assignment_id: held[0].id,
                scanned_until: held[0].nonce_end,
                hashes: NONCE_SPACE,
                finished: true,
            },
            NOW + 1,
        )
        .persist,
    );
    let ShareCheck::Verify {
        header: first_header,
        ..
    } = s
        .check_shares(
            "d",
            &[pb::Share {
                assignment_id: held[0].id,
                nonce: 0,
                resubmitted: true,
            }],
        )
        .remove(0)
    else {
        panic!("the finished lease is remembered")
    };
    let first_header = first_header.id;
    let expired_at = held[1].expires_at_unix_ms + 1;
    durable.extend(s.tick(expired_at).persist);
    assert!(
        s.lease_count() > 0 && !s.leases().iter().any(|l| l.id == held[1].id),
        "the second expired and the device was topped up"
    );

    let later = NOW + 1 + ENDED_LEASE_MEMORY_MS;
    assert!(later < expired_at + ENDED_LEASE_MEMORY_MS);
    let mut restarted = FleetState::new(restored_from(durable.clone()));
    restarted.apply_miners(&set(&[m]), later);
    // As `Fleet::open` does, before any share is judged; then the ticks go on.
    let forgotten = restarted.forget_ended_leases(later).persist;
    let ticked = restarted.tick(later).persist;
    // Without the restart.
    s.tick(later);
    for a in &held {
        assert_eq!(verdict(&restarted, "d", a), verdict(&s, "d", a), "{}", a.id);
    }
    assert!(verdict(&restarted, "d", &held[0]).contains("Stale"));
    assert!(verdict(&restarted, "d", &held[1]).starts_with("verify"));
    assert!(
        forgotten
            .iter()
            .any(|op| matches!(op, PersistOp::ForgetEndedLease(id) if *id == held[0].id)),
        "{forgotten:?}"
    );
    let deleted: Vec<u64> = forgotten
        .iter()
        .filter_map(|op| match op {
            PersistOp::DeleteHeader(id) => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(deleted, vec![first_header], "{forgotten:?}");

    // The restarted controller remembers what the running one does; once its writes are
    // durable, so does the store for the next restart.
    let remembered = |ids: &mut dyn Iterator<Item = u64>| {
        let mut ids: Vec<u64> = ids.collect();
        ids.sort_unstable();
        ids
    };
    let running = remembered(&mut s.ended.keys().copied());
    assert!(running.contains(&held[1].id) && !running.contains(&held[0].id));
    assert_eq!(remembered(&mut restarted.ended.keys().copied()), running);
    assert_eq!(
        restarted.oldest_live_header(),
        s.oldest_live_header(),
        "the ledger's prune floor moves on as it would have"
    );
    durable.extend(forgotten);
    durable.extend(ticked);
    let again = restored_from(durable);
    assert_eq!(
        remembered(&mut again.ended_leases.iter().map(|e| e.record.lease.id)),
        running
    );
    assert!(!again.headers.iter().any(|h| h.id == deleted[0]));
}
