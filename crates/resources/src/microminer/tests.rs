use super::*;

const GOOD: &str = r#"
apiVersion: micromine.dev/v1alpha1
kind: MicroMiner
metadata:
  name: plant-3
spec:
  selector:
    matchLabels: {site: plant-3}
  workSource:
    builtin: {networkDifficulty: 0.05}
  sharesPerMinute: 20
  limits: {dutyCycle: 0.5}
"#;

fn error_of(text: &str) -> ManifestError {
    parse_str("m.yaml", text).expect_err("invalid manifest")
}

#[test]
fn reads_a_manifest_with_defaults() {
    let miners = parse_str("m.yaml", GOOD).expect("valid");
    assert_eq!(miners.len(), 1);
    let m = &miners[0];
    assert_eq!(m.key(), "default/plant-3");
    assert_eq!(m.spec.shares_per_minute, 20.0);
    assert_eq!(m.spec.assignment_seconds, 30);
    assert_eq!(m.spec.limits.duty_cycle, 0.5);
    assert_eq!(
        m.spec
            .work_source
            .builtin
            .as_ref()
            .map(|b| b.network_difficulty),
        Some(0.05)
    );
    assert!(!m.spec.paused);
}

#[test]
fn reads_several_documents_and_skips_empty_ones() {
    let two = format!("{GOOD}\n---\n---\n{}", GOOD.replace("plant-3", "plant-4"));
    let miners = parse_str("m.yaml", &two).expect("valid");
    let keys: Vec<String> = miners.iter().map(|m| m.key()).collect();
    assert_eq!(keys, ["default/plant-3", "default/plant-4"]);
}

#[test]
fn unknown_fields_are_named() {
    let err = error_of(&GOOD.replace("sharesPerMinute", "sharesPerMinit"));
    let ManifestError::Invalid {
        field,
        problem,
        document,
        name,
        ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(field, "spec.sharesPerMinit");
    assert!(
        problem.contains("unknown field `sharesPerMinit`"),
        "{problem}"
    );
    assert_eq!(*document, 1);
    assert_eq!(name.as_deref(), Some("default/plant-3"));
    let nested = error_of(&GOOD.replace("dutyCycle", "dutyCycles"));
    assert!(
        nested
            .to_string()
            .contains("spec.limits.dutyCycles: unknown field `dutyCycles`"),
        "{nested}"
    );
}

#[test]
fn wrong_types_are_named() {
    let err = error_of(&GOOD.replace("sharesPerMinute: 20", "sharesPerMinute: lots"));
    assert!(
        err.to_string()
            .starts_with("m.yaml: document 1 (default/plant-3): spec.sharesPerMinute: "),
        "{err}"
    );
}

#[test]
fn zero_and_negative_rates_are_refused() {
    for (from, to, field) in [
        (
            "sharesPerMinute: 20",
            "sharesPerMinute: 0",
            "spec.sharesPerMinute",
        ),
        (
            "sharesPerMinute: 20",
            "sharesPerMinute: -3",
            "spec.sharesPerMinute",
        ),
        (
            "networkDifficulty: 0.05",
            "networkDifficulty: -1",
            "spec.workSource.builtin.networkDifficulty",
        ),
        ("dutyCycle: 0.5", "dutyCycle: 1.5", "spec.limits.dutyCycle"),
        ("dutyCycle: 0.5", "dutyCycle: 0", "spec.limits.dutyCycle"),
        (
            "sharesPerMinute: 20",
            "sharesPerMinute: 20\n  assignmentSeconds: 0",
            "spec.assignmentSeconds",
        ),
    ] {
        let err = error_of(&GOOD.replace(from, to));
        let ManifestError::Invalid { field: got, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(got, field, "{to}: {err}");
    }
    let negative_u32 = error_of(&GOOD.replace("sharesPerMinute: 20", "assignmentSeconds: -5"));
    assert!(
        negative_u32.to_string().contains("spec.assignmentSeconds"),
        "{negative_u32}"
    );
}

#[test]
fn device_limits_are_read_and_bad_ones_named() {
    let with = GOOD.replace(
            "limits: {dutyCycle: 0.5}",
            "limits:\n    dutyCycle: 0.5\n    maxTemperatureC: 70\n    minBatteryPercent: 30\n    maxHostCpuPercent: 60\n    pauseOnBattery: true\n    windows:\n      - {days: [Mon-Fri], from: \"22:00\", to: \"06:00\", timeZone: Europe/Istanbul}",
        );
    let miners = parse_str("m.yaml", &with).expect("valid");
    let limits = &miners[0].spec.limits;
    assert_eq!(limits.max_temperature_c, Some(70.0));
    assert!(limits.pause_on_battery);
    let wire = limits.to_wire();
    assert_eq!(wire.min_battery_percent, Some(30.0));
    assert_eq!(wire.windows[0].time_zone, "Europe/Istanbul");
    for (from, to, field) in [
        (
            "maxTemperatureC: 70",
            "maxTemperatureC: 200",
            "spec.limits.maxTemperatureC",
        ),
        (
            "minBatteryPercent: 30",
            "minBatteryPercent: 130",
            "spec.limits.minBatteryPercent",
        ),
        (
            "maxHostCpuPercent: 60",
            "maxHostCpuPercent: 0",
            "spec.limits.maxHostCpuPercent",
        ),
        ("[Mon-Fri]", "[Weekdays]", "spec.limits.windows[0].days"),
        ("\"22:00\"", "\"10pm\"", "spec.limits.windows[0].from"),
        (
            "Europe/Istanbul",
            "Europe/Atlantis",
            "spec.limits.windows[0].timeZone",
        ),
    ] {
        let err = error_of(&with.replace(from, to));
        let ManifestError::Invalid { field: got, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(got, field, "{to}: {err}");
    }
}

#[test]
fn economics_are_read_and_bad_figures_named() {
    let with = GOOD.replace(
            "limits: {dutyCycle: 0.5}",
            "limits: {dutyCycle: 0.5}\n  economics:\n    energyPricePerKWh: 0.12\n    coinPrice: 60000\n    blockReward: 3.125\n    deviceWattsByClass: {gateway: 8}",
        );
    let miners = parse_str("m.yaml", &with).expect("valid");
    let economics = miners[0].spec.economics.clone().expect("economics");
    assert_eq!(economics.energy_price_per_k_wh, 0.12);
    assert_eq!(economics.default_device_watts, 5.0, "the default");
    assert_eq!(economics.network_difficulty, None, "the work source's");
    assert_eq!(economics.device_watts_by_class["gateway"], 8.0);
    for (from, to, field) in [
        (
            "energyPricePerKWh: 0.12",
            "energyPricePerKWh: -0.12",
            "spec.economics.energyPricePerKWh",
        ),
        (
            "coinPrice: 60000",
            "coinPrice: -1",
            "spec.economics.coinPrice",
        ),
        (
            "blockReward: 3.125",
            "blockReward: -3",
            "spec.economics.blockReward",
        ),
        (
            "{gateway: 8}",
            "{gateway: -8}",
            "spec.economics.deviceWattsByClass.gateway",
        ),
        (
            "blockReward: 3.125",
            "blockReward: 3.125\n    networkDifficulty: 0",
            "spec.economics.networkDifficulty",
        ),
        (
            "blockReward: 3.125",
            "blockReward: 3.125\n    pricePerKWh: 1",
            "spec.economics.pricePerKWh",
        ),
    ] {
        let err = error_of(&with.replace(from, to));
        let ManifestError::Invalid { field: got, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(got, field, "{to}: {err}");
    }
    let missing = error_of(&with.replace("    coinPrice: 60000\n", ""));
    assert!(missing.to_string().contains("coinPrice"), "{missing}");
}

#[test]
fn pool_work_sources_are_read_and_bad_ones_named() {
    let pool = GOOD.replace(
            "    builtin: {networkDifficulty: 0.05}",
            "    stratum:\n      url: stratum+ssl://pool.example.com:4443\n      user: acct.worker\n      passwordFile: pool.pass\n      failover:\n        - {url: \"stratum+tcp://[2001:db8::1]:3333\", user: acct.backup}\n",
        );
    let miner = parse_str("m.yaml", &pool).expect("valid").remove(0);
    let stratum = miner.spec.work_source.stratum.expect("stratum");
    assert_eq!(stratum.failback_seconds, 60);
    let pools = stratum.pools();
    assert_eq!(pools.len(), 2);
    assert_eq!(pools[0].password_file.as_deref(), Some("pool.pass"));
    assert_eq!(pools[1].user, "acct.backup");
    for (from, to, field, text) in [
        (
            "stratum+ssl://pool.example.com:4443",
            "http://pool:80",
            "spec.workSource.stratum.url",
            "must start with stratum+tcp://",
        ),
        (
            "stratum+ssl://pool.example.com:4443",
            "stratum+tcp://pool:99999",
            "spec.workSource.stratum.url",
            "1 to 65535",
        ),
        (
            "user: acct.worker",
            "user: ''",
            "spec.workSource.stratum.user",
            "is required",
        ),
        (
            "passwordFile: pool.pass",
            "passwordFile: pool.pass\n      passwordSecretRef: {name: s, key: k}",
            "spec.workSource.stratum.passwordFile",
            "cannot be set together",
        ),
        (
            "user: acct.backup}",
            "user: acct.backup, passwordSecretRef: {name: Bad_Name, key: k}}",
            "spec.workSource.stratum.failover[0].passwordSecretRef.name",
            "not a valid Secret name",
        ),
        (
            "\"stratum+tcp://[2001:db8::1]:3333\"",
            "\"stratum+tcp://[nope]:3333\"",
            "spec.workSource.stratum.failover[0].url",
            "no valid host",
        ),
        (
            "passwordFile: pool.pass",
            "passwordFile: pool.pass\n      failbackSeconds: 0",
            "spec.workSource.stratum.failbackSeconds",
            "between 1 and 3600",
        ),
    ] {
        let err = error_of(&pool.replace(from, to));
        let text_of = err.to_string();
        assert!(
            text_of.contains(&format!("{field}: ")) && text_of.contains(text),
            "{field}: {text_of}"
        );
    }
    let both = pool.replace(
        "  workSource:\n",
        "  workSource:\n    builtin: {networkDifficulty: 1}\n",
    );
    assert!(
        error_of(&both)
            .to_string()
            .contains("spec.workSource: exactly one work source must be set (builtin or stratum)")
    );
}

#[test]
fn structure_errors_are_named() {
    assert!(matches!(error_of("a: [1, 2"), ManifestError::Syntax { .. }));
    let err = error_of(&GOOD.replace("micromine.dev/v1alpha1", "micromine.dev/v9"));
    assert!(
        err.to_string().contains("apiVersion: `micromine.dev/v9`"),
        "{err}"
    );
    let err = error_of(&GOOD.replace("kind: MicroMiner", "kind: Deployment"));
    assert!(err.to_string().contains("kind: `Deployment`"), "{err}");
    let err = error_of(&GOOD.replace("    builtin: {networkDifficulty: 0.05}", "    {}"));
    assert!(
        err.to_string().contains("spec.workSource: exactly one"),
        "{err}"
    );
    let err = error_of("- just\n- a list\n");
    assert!(err.to_string().contains("must be a mapping"), "{err}");
    let err = error_of(&GOOD.replace("name: plant-3", "name: Plant_3"));
    assert!(err.to_string().contains("metadata.name"), "{err}");
    let err = error_of(&GOOD.replace(
        "matchLabels: {site: plant-3}",
        "matchExpressions: [{key: site, operator: Equals, values: [a]}]",
    ));
    assert!(
        err.to_string()
            .contains("spec.selector.matchExpressions[0].operator"),
        "{err}"
    );
}
