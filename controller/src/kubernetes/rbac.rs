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
                assert!(
                    (a.api_group, a.resource) != (b.api_group, b.resource),
                    "{a:?} and {b:?}"
                );
            }
        }
        assert!(allows("micromine.dev", "microminers/status", "patch"));
        assert!(!allows("", "secrets", "list"));
    }
}
