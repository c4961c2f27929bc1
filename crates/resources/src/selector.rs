//! Kubernetes label selectors (`matchLabels` and `matchExpressions`) evaluated against a
//! device's labels, exactly as the API server would.

use std::collections::BTreeMap;

use micromine_proto::names::{label_key_problem, label_value_problem};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

/// A selector that cannot be evaluated, with the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct SelectorError {
    /// Path of the field inside the selector, e.g. `matchExpressions[0].operator`.
    pub field: String,
    /// What is wrong.
    pub problem: String,
}

/// Checks the parts of a selector the schema cannot: operators and their value lists.
pub fn validate(selector: &LabelSelector) -> Result<(), SelectorError> {
    // A key or value no label can have would silently match nothing.
    for (key, value) in selector.match_labels.iter().flatten() {
        if let Some(problem) = label_key_problem(key) {
            return Err(SelectorError {
                field: format!("matchLabels.{key}"),
                problem: format!("`{key}` is not a label key: {problem}"),
            });
        }
        if let Some(problem) = label_value_problem(value) {
            return Err(SelectorError {
                field: format!("matchLabels.{key}"),
                problem: format!("`{value}` is not a label value: {problem}"),
            });
        }
    }
    for (i, requirement) in selector.match_expressions.iter().flatten().enumerate() {
        let field = |name: &str| format!("matchExpressions[{i}].{name}");
        let values = requirement.values.as_deref().unwrap_or_default();
        match requirement.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                return Err(SelectorError {
                    field: field("values"),
                    problem: format!("operator {} needs at least one value", requirement.operator),
                });
            }
            "Exists" | "DoesNotExist" if !values.is_empty() => {
                return Err(SelectorError {
                    field: field("values"),
                    problem: format!("operator {} takes no values", requirement.operator),
                });
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => {
                return Err(SelectorError {
                    field: field("operator"),
                    problem: format!(
                        "unknown operator `{other}` (expected In, NotIn, Exists or DoesNotExist)"
                    ),
                });
            }
        }
        if let Some(problem) = label_key_problem(&requirement.key) {
            return Err(SelectorError {
                field: field("key"),
                problem: format!("`{}` is not a label key: {problem}", requirement.key),
            });
        }
        for (j, value) in values.iter().enumerate() {
            if let Some(problem) = label_value_problem(value) {
                return Err(SelectorError {
                    field: field(&format!("values[{j}]")),
                    problem: format!("`{value}` is not a label value: {problem}"),
                });
            }
        }
    }
    Ok(())
}

/// Whether `labels` satisfy the selector. An empty selector matches everything, as in
/// Kubernetes. A requirement with an unknown operator matches nothing (validation refuses
/// such selectors before they get here).
pub fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    labels_ok
        && selector
            .match_expressions
            .iter()
            .flatten()
            .all(|r| requirement_matches(r, labels))
}

fn requirement_matches(
    requirement: &LabelSelectorRequirement,
    labels: &BTreeMap<String, String>,
) -> bool {
    let value = labels.get(&requirement.key);
    let values = requirement.values.as_deref().unwrap_or_default();
    match requirement.operator.as_str() {
        "In" => value.is_some_and(|v| values.contains(v)),
        "NotIn" => value.is_none_or(|v| !values.contains(v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: if values.is_empty() {
                None
            } else {
                Some(values.iter().map(|v| v.to_string()).collect())
            },
        }
    }

    #[test]
    fn match_labels_and_expressions() {
        let selector = LabelSelector {
            match_labels: Some(labels(&[("site", "plant-3")])),
            match_expressions: Some(vec![
                expr("class", "In", &["gateway", "edge"]),
                expr("retired", "DoesNotExist", &[]),
            ]),
        };
        assert!(matches(
            &selector,
            &labels(&[("site", "plant-3"), ("class", "gateway")])
        ));
        assert!(!matches(
            &selector,
            &labels(&[("site", "plant-4"), ("class", "gateway")])
        ));
        assert!(!matches(
            &selector,
            &labels(&[("site", "plant-3"), ("class", "phone")])
        ));
        assert!(!matches(
            &selector,
            &labels(&[("site", "plant-3"), ("class", "edge"), ("retired", "yes")])
        ));
        assert!(matches(&LabelSelector::default(), &labels(&[])));
        let not_in = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![
                expr("site", "NotIn", &["lab"]),
                expr("site", "Exists", &[]),
            ]),
        };
        assert!(matches(&not_in, &labels(&[("site", "plant")])));
        assert!(!matches(&not_in, &labels(&[("site", "lab")])));
        assert!(!matches(&not_in, &labels(&[])));
    }

    #[test]
    fn validation_names_the_field() {
        let bad = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![expr("a", "In", &["x"]), expr("b", "Equals", &["y"])]),
        };
        let err = validate(&bad).expect_err("unknown operator");
        assert_eq!(err.field, "matchExpressions[1].operator");
        assert!(err.problem.contains("Equals"));
        let empty_in = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![expr("a", "In", &[])]),
        };
        assert_eq!(
            validate(&empty_in).expect_err("no values").field,
            "matchExpressions[0].values"
        );
    }

    #[test]
    fn keys_and_values_no_label_can_have_are_refused() {
        let spaced = LabelSelector {
            match_labels: Some([("site".to_string(), "plant 3".to_string())].into()),
            match_expressions: None,
        };
        let err = validate(&spaced).expect_err("space in a value");
        assert_eq!(err.field, "matchLabels.site");
        assert!(
            err.problem.contains("`plant 3` is not a label value"),
            "{}",
            err.problem
        );
        let bad_key = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![expr("Class/x", "Exists", &[])]),
        };
        assert_eq!(
            validate(&bad_key).expect_err("bad prefix").field,
            "matchExpressions[0].key"
        );
        let bad_value = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![expr("class", "In", &["gateway", "-edge"])]),
        };
        assert_eq!(
            validate(&bad_value).expect_err("bad value").field,
            "matchExpressions[0].values[1]"
        );
    }
}
