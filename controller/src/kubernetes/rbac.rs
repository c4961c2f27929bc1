//! Every permission the controller uses, in one place: the chart's ClusterRole and Role
//! are checked against this list (`controller/tests/chart.rs`), and the mocked API server
//! in the reconciler tests refuses any request it does not allow, so a new API call
//! without its permission fails a test instead of a production rollout.

/// Where a permission applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Granted by the chart's ClusterRole (cluster-scoped resources, or namespaced ones
    /// in every namespace, like MicroMiners).
    Cluster,
    /// Granted by the chart's Role, in the controller's own namespace only.
    OwnNamespace,
}

/// One RBAC rule: an API group, one resource (or `resource/subresource`), its verbs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// Where the rule is granted.
    pub scope: Scope,
    /// API group, `""` for the core group.
    pub api_group: &'static str,
    /// Resource name, plural, with `/subresource` when it is one.
    pub resource: &'static str,
    /// Verbs, sorted.
    pub verbs: &'static [&'static str],
}

/// What the controller calls, and nothing more.
pub const RULES: &[Rule] = &[
    // Watched; the finalizer goes on and off by JSON patch.
    Rule {
        scope: Scope::Cluster,
        api_group: "micromine.dev",
        resource: "microminers",
        verbs: &["get", "list", "patch", "watch"],
    },
    Rule {
        scope: Scope::Cluster,
        api_group: "micromine.dev",
        resource: "microminers/status",
        verbs: &["patch"],
    },
    // Needed where the OwnerReferencesPermissionEnforcement admission plugin runs.
    Rule {
        scope: Scope::Cluster,
        api_group: "micromine.dev",
        resource: "microminers/finalizers",
        verbs: &["update"],
    },
    // Created by server-side apply when an agent first connects.
    Rule {
        scope: Scope::Cluster,
        api_group: "micromine.dev",
        resource: "edgedevices",
        verbs: &["create", "get", "list", "patch", "watch"],
    },
    Rule {
        scope: Scope::Cluster,
        api_group: "micromine.dev",
        resource: "edgedevices/status",
        verbs: &["patch"],
    },
    // The event recorder creates an event and patches its series count on repeats.
    Rule {
        scope: Scope::Cluster,
        api_group: "events.k8s.io",
        resource: "events",
        verbs: &["create", "patch"],
    },
    Rule {
        scope: Scope::OwnNamespace,
        api_group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["create", "get", "update"],
    },
    // Bootstrap tokens: read when presented, a use consumed by update, deleted when the
    // last one is gone or it expired. `token create --kubernetes` runs with the operator's
    // own credentials, not these.
    Rule {
        scope: Scope::OwnNamespace,
        api_group: "",
        resource: "secrets",
        verbs: &["delete", "get", "update"],
    },
    // Pool passwords (`workSource.stratum.passwordSecretRef`) live next to their
    // MicroMiner, in any namespace; only read, and only the named Secret.
    Rule {
        scope: Scope::Cluster,
        api_group: "",
        resource: "secrets",
        verbs: &["get"],
    },
    // The gRPC Service has no selector: the leader points it at itself with one
    // EndpointSlice (server-side apply), so agents reach the replica that serves.
    Rule {
        scope: Scope::OwnNamespace,
        api_group: "discovery.k8s.io",
        resource: "endpointslices",
        verbs: &["create", "get", "patch"],
    },
    // The CA bundle, published for agents and `token create --kubernetes`.
    Rule {
        scope: Scope::OwnNamespace,
        api_group: "",
        resource: "configmaps",
        verbs: &["create", "get", "patch"],
    },
];

/// Whether `RULES` allow `verb` on `resource` of `api_group`.
pub fn allows(api_group: &str, resource: &str, verb: &str) -> bool {
    RULES
        .iter()
        .any(|r| r.api_group == api_group && r.resource == resource && r.verbs.contains(&verb))
}

/// The permission an API request needs: `(group, resource[/subresource], verb)`, from
/// its method, path and query. An error names what is not an API request.
pub fn requirement(
    method: &str,
    path: &str,
    query: &str,
) -> Result<(String, String, &'static str), String> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    // /api/v1/... is the core group; /apis/GROUP/VERSION/... the rest.
    let (group, rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return Err(format!("not an API path: {path}")),
    };
    let rest = match rest {
        ["namespaces", _ns, rest @ ..] if !rest.is_empty() => rest,
        other => other,
    };
    let (resource, named) = match rest {
        [resource] => (resource.to_string(), false),
        [resource, _name] => (resource.to_string(), true),
        [resource, _name, sub] => (format!("{resource}/{sub}"), true),
        _ => return Err(format!("unexpected API path shape: {path}")),
    };
    let verb = match method {
        "GET" if query.split('&').any(|kv| kv == "watch=true") => "watch",
        "GET" if named => "get",
        "GET" => "list",
        "POST" => "create",
        "PUT" => "update",
        "PATCH" => "patch",
        "DELETE" => "delete",
        _ => return Err(format!("unexpected method {method} {path}")),
    };
    Ok((group.to_string(), resource, verb))
}

/// Whether `RULES` allow the request; the error says what it needs and lacks.
pub fn permits(method: &str, path: &str, query: &str) -> Result<(), String> {
    let (group, resource, verb) = requirement(method, path, query)?;
    if allows(&group, &resource, verb) {
        Ok(())
    } else {
        Err(format!(
            "{method} {path} needs `{verb}` on {resource} in group \"{group}\", which rbac::RULES (and so the chart) does not grant"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs_are_sorted_and_rules_unique() {
        for rule in RULES {
            let mut sorted = rule.verbs.to_vec();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted, rule.verbs, "{rule:?}");
        }
        for (i, a) in RULES.iter().enumerate() {
            for b in &RULES[i + 1..] {
                // One rule per resource in each of the two roles.
                assert!(
                    (a.scope, a.api_group, a.resource) != (b.scope, b.api_group, b.resource),
                    "{a:?} and {b:?}"
                );
            }
        }
        assert!(allows("micromine.dev", "microminers/status", "patch"));
        assert!(!allows("", "secrets", "list"));
    }

    #[test]
    fn requests_map_to_the_verbs_rbac_checks() {
        let cases = [
            (
                "GET",
                "/apis/micromine.dev/v1alpha1/microminers",
                "watch=true&timeoutSeconds=290",
                ("micromine.dev", "microminers", "watch"),
            ),
            (
                "GET",
                "/apis/micromine.dev/v1alpha1/edgedevices",
                "",
                ("micromine.dev", "edgedevices", "list"),
            ),
            (
                "PATCH",
                "/apis/micromine.dev/v1alpha1/namespaces/a/microminers/b/status",
                "",
                ("micromine.dev", "microminers/status", "patch"),
            ),
            (
                "PUT",
                "/apis/coordination.k8s.io/v1/namespaces/a/leases/b",
                "",
                ("coordination.k8s.io", "leases", "update"),
            ),
            (
                "DELETE",
                "/api/v1/namespaces/a/secrets/b",
                "",
                ("", "secrets", "delete"),
            ),
            (
                "POST",
                "/api/v1/namespaces/a/configmaps",
                "",
                ("", "configmaps", "create"),
            ),
        ];
        for (method, path, query, (group, resource, verb)) in cases {
            assert_eq!(
                requirement(method, path, query),
                Ok((group.to_string(), resource.to_string(), verb)),
                "{method} {path}"
            );
        }
        assert!(requirement("GET", "/healthz", "").is_err());
        let refused = permits("GET", "/api/v1/namespaces/a/secrets", "")
            .expect_err("list on secrets is not granted");
        assert!(refused.contains("needs `list` on secrets"), "{refused}");
    }
}
