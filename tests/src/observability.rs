//! The PromQL the chart ships: the Grafana dashboard's panel queries and the alerting
//! rules' expressions, pulled out so tests can check them (the chart test) or evaluate
//! each against a real Prometheus scraping a real controller.
//!
//! Dashboard queries hold Grafana variables Prometheus does not know;
//! [`substitute_grafana_variables`] turns them into what Grafana sends with every
//! variable set to "All".

use serde_json::Value;

/// Every `expr` of every panel target in a Grafana dashboard, in panel order, rows'
/// collapsed panels included. Targets without an `expr` (or with a non-string one) yield
/// an empty string, so a caller can assert there are none.
pub fn dashboard_exprs(dashboard: &Value) -> Vec<String> {
    let mut exprs = Vec::new();
    if let Some(panels) = dashboard["panels"].as_array() {
        collect_panel_exprs(panels, &mut exprs);
    }
    exprs
}

fn collect_panel_exprs(panels: &[Value], exprs: &mut Vec<String>) {
    for panel in panels {
        if let Some(targets) = panel["targets"].as_array() {
            for target in targets {
                exprs.push(target["expr"].as_str().unwrap_or_default().to_owned());
            }
        }
        // A collapsed row keeps its panels inside it.
        if let Some(nested) = panel["panels"].as_array() {
            collect_panel_exprs(nested, exprs);
        }
    }
}

/// `(alert or record name, expr)` of every rule in a Prometheus rules file (`groups:` →
/// `rules:`), in file order. Panics, naming the rule, on YAML that is not a rules file:
/// this is for tests.
pub fn rule_exprs(yaml: &str) -> Vec<(String, String)> {
    let file: Value = serde_saphyr::from_str(yaml)
        .unwrap_or_else(|e| panic!("the rules file is not valid YAML: {e}"));
    let groups = file["groups"]
        .as_array()
        .unwrap_or_else(|| panic!("the rules file has no `groups` list"));
    let mut exprs = Vec::new();
    for group in groups {
        let group_name = group["name"].as_str().unwrap_or("<unnamed>");
        let rules = group["rules"]
            .as_array()
            .unwrap_or_else(|| panic!("group {group_name} has no `rules` list"));
        for (i, rule) in rules.iter().enumerate() {
            let name = rule["alert"]
                .as_str()
                .or_else(|| rule["record"].as_str())
                .unwrap_or_else(|| {
                    panic!("rule {i} of group {group_name} has neither `alert` nor `record`")
                });
            // `expr: 1` is valid PromQL that YAML reads as a number.
            let expr = match &rule["expr"] {
                Value::String(s) => s.trim().to_owned(),
                Value::Number(n) => n.to_string(),
                other => panic!("rule {name} in group {group_name}: expr is {other}"),
            };
            exprs.push((name.to_owned(), expr));
        }
    }
    exprs
}

/// `expr` with Grafana's variables replaced so that Prometheus accepts it, as Grafana would
/// send it with every template variable at "All" (the dashboard's `allValue` is `.*`):
///
/// - `$__rate_interval` → `1m`, `$__range` → `5m`, `$__interval` → `15s` (and the `_s` /
///   `_ms` forms of the last two → their numbers);
/// - a variable inside a regex matcher (`=~"$miner"`, `!~"…${site}…"`) → `.*`;
/// - a variable inside an equality matcher (`="$miner"`, `!="$miner"`) → the matcher
///   becomes a regex one (`=~`, `!~`) and the variable `.+`, since no single value can
///   stand for it.
///
/// `$name`, `${name}`, `${name:format}` and `[[name]]` are recognised. Other variables
/// outside label matchers are left as they are (Prometheus will then refuse the query,
/// which is what a test wants to hear about).
pub fn substitute_grafana_variables(expr: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut i = 0;
    while let Some(c) = expr.get(i..).and_then(|rest| rest.chars().next()) {
        if c == '"' || c == '\'' || c == '`' {
            let end = closing_quote(expr, i);
            let content = &expr[i + 1..end];
            if contains_variable(content) {
                let (op_start, op) = matcher_before(&out);
                let (op, all) = match op {
                    Some("=") => (Some("=~"), ".+"),
                    Some("!=") => (Some("!~"), ".+"),
                    regex => (regex, ".*"),
                };
                if let Some(op) = op {
                    out.truncate(op_start);
                    out.push_str(op);
                }
                out.push(c);
                out.push_str(&replace_variables(content, all));
            } else {
                out.push(c);
                out.push_str(content);
            }
            if end < expr.len() {
                out.push(c);
            }
            i = end + 1;
            continue;
        }
        // Outside strings only Grafana's interval variables have a sensible value.
        if let Some((len, name)) = variable_at(&expr[i..])
            && let Some(value) = builtin(&name)
        {
            out.push_str(value);
            i += len;
            continue;
        }
        out.push(c);
        i += c.len_utf8();
    }
    out
}

/// Byte index of the quote closing the string opened at byte `open` (PromQL: backslash
/// escapes in `"` and `'` strings, none in raw `` ` `` strings); `text.len()` when
/// unterminated.
fn closing_quote(text: &str, open: usize) -> usize {
    let bytes = text.as_bytes();
    let quote = bytes[open];
    let mut j = open + 1;
    while j < bytes.len() {
        if bytes[j] == b'\\' && quote != b'`' {
            j += 2;
            continue;
        }
        if bytes[j] == quote {
            return j;
        }
        j += 1;
    }
    bytes.len()
}

/// The label-matching operator right before a string about to be written after `out`, and
/// where it starts in `out`.
fn matcher_before(out: &str) -> (usize, Option<&'static str>) {
    let trimmed = out.trim_end();
    for op in ["=~", "!~", "!=", "=="] {
        if trimmed.ends_with(op) {
            // `==` is a comparison, not a matcher.
            return (trimmed.len() - op.len(), (op != "==").then_some(op));
        }
    }
    if trimmed.ends_with('=') {
        return (trimmed.len() - 1, Some("="));
    }
    (out.len(), None)
}

fn contains_variable(text: &str) -> bool {
    text.char_indices()
        .any(|(i, _)| variable_at(&text[i..]).is_some())
}

/// `text` (a matcher's value) with Grafana's interval variables replaced by their values
/// and every other variable by `all`.
fn replace_variables(text: &str, all: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if let Some((len, name)) = variable_at(rest) {
            out.push_str(builtin(&name).unwrap_or(all));
            rest = &rest[len..];
        } else {
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// A variable reference at the start of `text`: its length in bytes and its name.
fn variable_at(text: &str) -> Option<(usize, String)> {
    // Like Grafana's names: a letter or `_` first, so label_replace's `$1` is no variable.
    let ident_len = |s: &str| {
        if !s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
            return 0;
        }
        s.char_indices()
            .find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '_'))
            .map_or(s.len(), |(i, _)| i)
    };
    if let Some(braced) = text.strip_prefix("${") {
        let close = braced.find('}')?;
        let inner = &braced[..close];
        let name = inner.split(':').next().unwrap_or_default();
        return (!name.is_empty() && ident_len(name) == name.len())
            .then(|| (close + 3, name.to_owned()));
    }
    if let Some(bracketed) = text.strip_prefix("[[") {
        let close = bracketed.find("]]")?;
        let name = bracketed[..close].split(':').next().unwrap_or_default();
        return (!name.is_empty() && ident_len(name) == name.len())
            .then(|| (close + 4, name.to_owned()));
    }
    let plain = text.strip_prefix('$')?;
    let len = ident_len(plain);
    (len > 0).then(|| (len + 1, plain[..len].to_owned()))
}

/// Values for Grafana's global interval variables: a 15 s scrape interval, a 5 min range.
fn builtin(name: &str) -> Option<&'static str> {
    Some(match name {
        "__rate_interval" => "1m",
        "__interval" => "15s",
        "__interval_ms" => "15000",
        "__range" => "5m",
        "__range_s" => "300",
        "__range_ms" => "300000",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn interval_variables_become_durations() {
        assert_eq!(
            substitute_grafana_variables(
                "sum(rate(x_total[$__rate_interval])) / sum(increase(x_total[$__range]))"
            ),
            "sum(rate(x_total[1m])) / sum(increase(x_total[5m]))"
        );
        assert_eq!(
            substitute_grafana_variables("rate(x[$__interval]) * $__range_s + ${__interval_ms}"),
            "rate(x[15s]) * 300 + 15000"
        );
    }

    #[test]
    fn regex_matchers_take_the_all_value() {
        assert_eq!(
            substitute_grafana_variables(
                r#"sum(m{kind="nominal", miner_namespace=~"$namespace", miner=~"${miner:regex}"})"#
            ),
            r#"sum(m{kind="nominal", miner_namespace=~".*", miner=~".*"})"#
        );
        assert_eq!(
            substitute_grafana_variables(r#"m{site!~"[[site]]-backup", state=~"a|b"}"#),
            r#"m{site!~".*-backup", state=~"a|b"}"#
        );
    }

    #[test]
    fn equality_matchers_become_any_value() {
        assert_eq!(
            substitute_grafana_variables(r#"m{miner = "$miner", site!="$site", kind="x"}"#),
            r#"m{miner =~".+", site!~".+", kind="x"}"#
        );
    }

    #[test]
    fn strings_without_variables_and_dollars_in_them_are_kept() {
        // A literal `$` at the end of a regex, escapes, and label_replace's arguments.
        let expr = r#"label_replace(m{path=~"/a\"b$"}, "site", "(none)", "site", "")"#;
        assert_eq!(substitute_grafana_variables(expr), expr);
        let expr = r#"label_replace(m, "dst", "$1-${1}", "src", "(.*)")"#;
        assert_eq!(substitute_grafana_variables(expr), expr);
        // An unterminated string is copied, not a panic.
        assert_eq!(substitute_grafana_variables(r#"m{a="\"#), r#"m{a="\"#);
        // An unknown variable outside a matcher stays, for Prometheus to refuse.
        assert_eq!(substitute_grafana_variables("topk($n, m)"), "topk($n, m)");
    }

    #[test]
    fn dashboard_exprs_walk_panels_and_collapsed_rows() {
        let dashboard = json!({
            "panels": [
                {"type": "stat", "targets": [{"expr": "a"}, {"expr": "b"}]},
                {"type": "row", "collapsed": true, "panels": [
                    {"type": "timeseries", "targets": [{"expr": "c"}]}
                ]},
                {"type": "text"},
                {"type": "timeseries", "targets": [{"refId": "A"}]}
            ]
        });
        assert_eq!(dashboard_exprs(&dashboard), ["a", "b", "c", ""]);
        assert!(dashboard_exprs(&json!({})).is_empty());
    }

    #[test]
    fn rule_exprs_name_alerts_and_recordings() {
        let yaml = r#"
groups:
  - name: one
    rules:
      - record: job:up:sum
        expr: sum by (job) (up)
      - alert: Down
        expr: |
          up == 0
        for: 5m
        annotations:
          summary: "{{ $labels.job }} is down"
  - name: two
    rules:
      - alert: Always
        expr: 1
"#;
        assert_eq!(
            rule_exprs(yaml),
            [
                ("job:up:sum".to_owned(), "sum by (job) (up)".to_owned()),
                ("Down".to_owned(), "up == 0".to_owned()),
                ("Always".to_owned(), "1".to_owned()),
            ]
        );
    }

    /// The chart's own files: every query comes out free of Grafana variables, every
    /// rule has an expression.
    #[test]
    fn the_charts_queries_substitute_completely() {
        let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/micromine");
        let read = |path: &str| {
            std::fs::read_to_string(chart.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
        };
        let dashboard: Value =
            serde_json::from_str(&read("dashboards/micromine.json")).expect("JSON");
        let exprs = dashboard_exprs(&dashboard);
        assert!(exprs.len() > 20, "{} queries", exprs.len());
        for expr in exprs {
            let substituted = substitute_grafana_variables(&expr);
            assert!(!substituted.contains('$'), "{expr} -> {substituted}");
        }
        let rules = rule_exprs(&read("alerts/micromine-rules.yaml"));
        assert!(
            rules
                .iter()
                .any(|(name, _)| name == "MicromineControllerDown")
        );
        assert!(rules.iter().all(|(_, expr)| !expr.is_empty()));
    }

    #[test]
    #[should_panic(expected = "neither `alert` nor `record`")]
    fn rule_exprs_refuse_a_nameless_rule() {
        rule_exprs("groups:\n  - name: g\n    rules:\n      - expr: up\n");
    }
}
