//! Pool passwords from Secrets (`passwordSecretRef`) in the MicroMiner's namespace, read at
//! every connection attempt so a rotated password is used from the next connection on.

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use micromine_resources::microminer::StratumPool;
use micromine_stratum::passwords::{DEFAULT_PASSWORD, Lookup, Passwords};

/// Looks pool passwords up in Secrets.
#[derive(Clone)]
pub struct SecretPasswords {
    client: kube::Client,
}

impl SecretPasswords {
    /// Reads Secrets with `client`.
    pub fn new(client: kube::Client) -> SecretPasswords {
        SecretPasswords { client }
    }
}

impl Passwords for SecretPasswords {
    fn password<'a>(&'a self, namespace: &'a str, pool: &'a StratumPool) -> Lookup<'a> {
        Box::pin(async move {
            if pool.password_file.is_some() {
                return Err(
                    "passwordFile needs standalone mode; in Kubernetes mode use passwordSecretRef"
                        .to_string(),
                );
            }
            let Some(reference) = &pool.password_secret_ref else {
                return Ok(DEFAULT_PASSWORD.to_string());
            };
            let what = format!(
                "passwordSecretRef: Secret {namespace}/{} key {}",
                reference.name, reference.key
            );
            let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
            let secret = match api.get_opt(&reference.name).await {
                Ok(Some(secret)) => secret,
                Ok(None) => return Err(format!("{what}: the Secret does not exist")),
                Err(e) => return Err(format!("{what}: {e}")),
            };
            let value = secret
                .data
                .as_ref()
                .and_then(|data| data.get(&reference.key))
                .ok_or_else(|| format!("{what}: the Secret has no such key"))?;
            let text = String::from_utf8(value.0.clone())
                .map_err(|_| format!("{what}: the value is not UTF-8 text"))?;
            Ok(text.trim_end_matches(['\r', '\n']).to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use http::{Method, StatusCode};
    use serde_json::json;

    use super::*;
    use crate::kubernetes::testing::{client, expect};
    use micromine_resources::microminer::SecretKeyRef;

    fn pool(secret: Option<(&str, &str)>) -> StratumPool {
        StratumPool {
            url: "stratum+tcp://pool:3333".into(),
            user: "acct.worker".into(),
            password_secret_ref: secret.map(|(name, key)| SecretKeyRef {
                name: name.into(),
                key: key.into(),
            }),
            password_file: None,
        }
    }

    #[tokio::test]
    async fn the_password_is_read_from_the_secret_in_the_miners_namespace() {
        let (client, mut api) = client("micromine");
        let passwords = SecretPasswords::new(client);
        let with_secret = pool(Some(("pool-creds", "password")));
        let lookup = tokio::spawn({
            let passwords = passwords.clone();
            let pool = with_secret.clone();
            async move { passwords.password("plant-3", &pool).await }
        });
        // "s3cret\n" in base64.
        expect(&mut api, Method::GET, "/api/v1/namespaces/plant-3/secrets/pool-creds")
            .await
            .answer(
                StatusCode::OK,
                &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "pool-creds", "namespace": "plant-3"},
                        "data": {"password": "czNjcmV0Cg=="}}),
            );
        assert_eq!(lookup.await.expect("task"), Ok("s3cret".to_string()));

        let lookup = tokio::spawn({
            let passwords = passwords.clone();
            let pool = pool(Some(("pool-creds", "other")));
            async move { passwords.password("plant-3", &pool).await }
        });
        expect(&mut api, Method::GET, "/api/v1/namespaces/plant-3/secrets/pool-creds")
            .await
            .answer(
                StatusCode::OK,
                &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "pool-creds"}, "data": {"password": "eA=="}}),
            );
        let err = lookup.await.expect("task").expect_err("no such key");
        assert!(
            err.contains("Secret plant-3/pool-creds key other: the Secret has no such key"),
            "{err}"
        );

        let lookup = tokio::spawn({
            let passwords = passwords.clone();
            async move { passwords.password("plant-3", &with_secret).await }
        });
        expect(&mut api, Method::GET, "/api/v1/namespaces/plant-3/secrets/pool-creds")
            .await
            .answer(
                StatusCode::NOT_FOUND,
                &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "secrets \"pool-creds\" not found"}),
            );
        let err = lookup.await.expect("task").expect_err("missing");
        assert!(err.ends_with("the Secret does not exist"), "{err}");

        // No reference: the conventional password, and no API call at all.
        assert_eq!(
            passwords.password("plant-3", &pool(None)).await,
            Ok(DEFAULT_PASSWORD.to_string())
        );
        let mut file = pool(None);
        file.password_file = Some("/etc/pool".into());
        assert!(passwords.password("plant-3", &file).await.is_err());
    }
}
