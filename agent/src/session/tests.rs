use super::*;

fn assignment() -> pb::Assignment {
    pb::Assignment {
        id: 1,
        header_prefix: vec![0; 76],
        nonce_start: 0,
        nonce_end: 1000,
        share_target: Target::from_difficulty(1.0)
            .expect("valid")
            .to_le_bytes()
            .to_vec(),
        share_difficulty: 1.0,
        lease_ms: 1000,
        expires_at_unix_ms: 0,
        miner: "default/a".into(),
        limits: None,
        trace_context: Default::default(),
    }
}

#[test]
fn the_last_limits_outlive_a_restart_and_a_bad_file_means_none() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert_eq!(load_limits(dir.path()).duty_cycle, 1.0, "nothing saved yet");
    let limits = pb::Limits {
        duty_cycle: 0.3,
        max_temperature_c: Some(60.0),
        windows: vec![pb::MiningWindow {
            days: vec!["Mon-Fri".into()],
            from: "22:00".into(),
            to: "06:00".into(),
            time_zone: "Europe/Istanbul".into(),
        }],
        ..Default::default()
    };
    save_limits(dir.path(), &limits).expect("save");
    assert_eq!(load_limits(dir.path()), limits);
    std::fs::write(dir.path().join(LIMITS_FILE), b"\xff\xff not protobuf").expect("write");
    assert_eq!(load_limits(dir.path()).duty_cycle, 1.0);
}

#[test]
fn measured_duty_is_busy_time_over_the_threads_time() {
    let s = Duration::from_secs;
    assert_eq!(measured_duty(s(2), s(4), 2), 0.25);
    assert_eq!(measured_duty(s(4), s(4), 1), 1.0);
    assert_eq!(measured_duty(s(0), s(4), 4), 0.0);
    // Timer granularity may put a burst a hair past the interval: never above 1.
    assert_eq!(measured_duty(s(5), s(4), 1), 1.0);
    assert_eq!(measured_duty(s(1), Duration::ZERO, 1), 0.0);
}

#[test]
fn malformed_assignments_are_refused() {
    assert!(work_order(&assignment()).is_ok());
    let mut a = assignment();
    a.header_prefix.pop();
    assert_eq!(work_order(&a).err(), Some("header_prefix must be 76 bytes"));
    let mut a = assignment();
    a.nonce_end = (1 << 32) + 1;
    assert!(work_order(&a).is_err());
    let mut a = assignment();
    a.nonce_start = 1000;
    assert!(work_order(&a).is_err());
    let mut a = assignment();
    a.share_target = vec![0; 32];
    assert!(work_order(&a).is_err());
    let mut a = assignment();
    a.lease_ms = 0;
    assert!(work_order(&a).is_err());
}
