//! Bootstrap tokens as Secrets in the controller's namespace, for Kubernetes mode: the
//! controller's volume is not where operators work, the API server is.
//!
//! One Secret per token, named `micromine-token-<id>`, of type
//! `micromine.dev/bootstrap-token`, holding the same record as a token file (the SHA-256
//! of the secret, never the secret). A use is consumed by replacing the Secret with the
//! `resourceVersion` that was read, or deleting it with that version as a precondition
//! when the last use goes: two controllers (or two enrollments) racing for the last use
//! cannot both win, the API server answers the loser with a conflict and it reads again.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams, Preconditions};
use micromine_proto::token::BootstrapToken;
use sha2::{Digest, Sha256};

use crate::tokens::{Consumed, TokenError, TokenFile, TokenRecord, TokenSpec, check_ca, mint};

/// The Secret type of a bootstrap token.
pub const SECRET_TYPE: &str = "micromine.dev/bootstrap-token";
/// The label every token Secret carries, so they can be listed.
pub const TOKEN_LABEL: &str = "micromine.dev/bootstrap-token";
/// The key holding the record.
const RECORD_KEY: &str = "token.json";
/// The ConfigMap the controller publishes its CA bundle in.
pub const CA_CONFIGMAP: &str = "micromine-ca";
/// The key of the bundle in it.
pub const CA_BUNDLE_KEY: &str = "ca.crt";
/// Attempts at consuming a use when other writers keep winning.
const CONFLICT_RETRIES: usize = 5;

/// The name of the Secret holding token `id_hex`.
pub fn secret_name(id_hex: &str) -> String {
    format!("micromine-token-{id_hex}")
}

/// Everything that can go wrong with Secret-backed tokens.
#[derive(Debug, thiserror::Error)]
pub enum SecretTokenError {
    /// The token itself was refused (same reasons as for token files).
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The API server refused or could not be reached.
    #[error("{action} Secret {name}: {source}")]
    Api {
        /// What was being done.
        action: &'static str,
        /// The Secret.
        name: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// Other writers kept consuming the same token.
    #[error("Secret {0} kept changing while a use was being consumed")]
    Contended(String),
    /// The CA ConfigMap is missing or unusable.
    #[error("ConfigMap {namespace}/{CA_CONFIGMAP}: {problem}")]
    CaBundle {
        /// Where it was looked for.
        namespace: String,
        /// What is wrong.
        problem: String,
    },
}

/// Tokens in one namespace.
#[derive(Clone)]
pub struct SecretTokens {
    api: Api<Secret>,
    namespace: String,
}

impl SecretTokens {
    /// Tokens kept as Secrets in `namespace`.
    pub fn new(client: kube::Client, namespace: &str) -> SecretTokens {
        SecretTokens {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
        }
    }

    /// The API client, for other lookups with the same credentials.
    pub fn client(&self) -> kube::Client {
        self.api.clone().into_client()
    }

    /// Mints a token for the CA with `ca_fingerprint` and stores it as a new Secret.
    pub async fn create(
        &self,
        spec: &TokenSpec,
        ca_fingerprint: [u8; 32],
    ) -> Result<(BootstrapToken, TokenRecord), SecretTokenError> {
        let (token, file) = mint(spec, ca_fingerprint)?;
        let name = secret_name(&file.id);
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([
                    (TOKEN_LABEL.to_string(), "true".to_string()),
                    (
                        "app.kubernetes.io/managed-by".to_string(),
                        "micromine".to_string(),
                    ),
                ])),
                ..ObjectMeta::default()
            },
            type_: Some(SECRET_TYPE.to_string()),
            data: Some(record_data(&file)?),
            ..Secret::default()
        };
        self.api
            .create(&PostParams::default(), &secret)
            .await
            .map_err(|source| SecretTokenError::Api {
                action: "creating",
                name,
                source,
            })?;
        Ok((token, file.record()))
    }

    /// Checks and consumes one use of `token`, as [`crate::tokens::TokenStore::redeem`]
    /// does for files.
    pub async fn redeem(
        &self,
        token: &BootstrapToken,
        ca_fingerprint: [u8; 32],
        now_unix_ms: i64,
    ) -> Result<TokenRecord, SecretTokenError> {
        check_ca(token, ca_fingerprint)?;
        let id = token.id_hex();
        let name = secret_name(&id);
        let presented: [u8; 32] = Sha256::digest(token.secret).into();
        let api_error = |action, source| SecretTokenError::Api {
            action,
            name: name.clone(),
            source,
        };
        for _ in 0..CONFLICT_RETRIES {
            let Some(mut secret) = self
                .api
                .get_opt(&name)
                .await
                .map_err(|e| api_error("reading", e))?
            else {
                return Err(TokenError::UnknownToken { id }.into());
            };
            let mut file = read_record(&secret, &name)?;
            if file.id != id {
                return Err(corrupt(&name, format!("it holds token {}", file.id)).into());
            }
            let version = secret.metadata.resource_version.clone();
            let outcome = file.consume(&presented, now_unix_ms, &format!("Secret {name}"));
            let written = match &outcome {
                Consumed::Refused(_) => Ok(()),
                Consumed::Discard(_) | Consumed::Last => {
                    let params = DeleteParams {
                        preconditions: Some(Preconditions {
                            resource_version: version,
                            uid: None,
                        }),
                        ..DeleteParams::default()
                    };
                    match self.api.delete(&name, &params).await {
                        // Gone already: someone else consumed or discarded it.
                        Err(kube::Error::Api(s)) if s.code == 404 => {
                            return Err(TokenError::UnknownToken { id }.into());
                        }
                        other => other.map(|_| ()),
                    }
                }
                Consumed::Some => {
                    secret.data = Some(record_data(&file)?);
                    self.api
                        .replace(&name, &PostParams::default(), &secret)
                        .await
                        .map(|_| ())
                }
            };
            match written {
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return Err(api_error("consuming a use of", e)),
                Ok(()) => {}
            }
            return match outcome {
                Consumed::Refused(e) | Consumed::Discard(e) => Err(e.into()),
                Consumed::Last | Consumed::Some => Ok(file.record()),
            };
        }
        Err(SecretTokenError::Contended(name))
    }

    /// Every token Secret, oldest first; unreadable ones are skipped with a warning.
    pub async fn list(&self) -> Result<Vec<TokenRecord>, SecretTokenError> {
        let secrets = self
            .api
            .list(&ListParams::default().labels(TOKEN_LABEL))
            .await
            .map_err(|source| SecretTokenError::Api {
                action: "listing",
                name: format!("{}/*", self.namespace),
                source,
            })?;
        let mut records = Vec::new();
        for secret in secrets {
            let name = secret.metadata.name.clone().unwrap_or_default();
            match read_record(&secret, &name) {
                Ok(file) => records.push(file.record()),
                Err(error) => tracing::warn!(%error, "skipping token Secret"),
            }
        }
        records.sort_by(|a, b| (a.created_unix_ms, &a.id_hex).cmp(&(b.created_unix_ms, &b.id_hex)));
        Ok(records)
    }
}

fn corrupt(name: &str, reason: String) -> TokenError {
    TokenError::Corrupt {
        path: format!("Secret {name}").into(),
        reason,
    }
}

fn record_data(file: &TokenFile) -> Result<BTreeMap<String, ByteString>, TokenError> {
    let json = serde_json::to_vec(file).map_err(|e| corrupt(&file.id, e.to_string()))?;
    Ok(BTreeMap::from([(RECORD_KEY.to_string(), ByteString(json))]))
}

fn read_record(secret: &Secret, name: &str) -> Result<TokenFile, TokenError> {
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(RECORD_KEY))
        .ok_or_else(|| corrupt(name, format!("no {RECORD_KEY} key")))?;
    serde_json::from_slice(&bytes.0).map_err(|e| corrupt(name, e.to_string()))
}

/// Publishes the CA bundle (PEM, active CA first) in ConfigMap `micromine-ca`, by
/// server-side apply, for agents (`--ca-file`) and `token create --kubernetes`.
pub async fn publish_ca_bundle(
    client: kube::Client,
    namespace: &str,
    bundle_pem: &str,
) -> Result<(), kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    let patch = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": CA_CONFIGMAP,
            "labels": {"app.kubernetes.io/managed-by": "micromine"},
        },
        "data": {CA_BUNDLE_KEY: bundle_pem},
    });
    api.patch(
        CA_CONFIGMAP,
        &kube::api::PatchParams::apply(super::FIELD_MANAGER).force(),
        &kube::api::Patch::Apply(&patch),
    )
    .await
    .map(|_| ())
}

/// The SHA-256 fingerprint of the active CA (the first certificate of the published
/// bundle): what a token must name.
pub async fn published_ca_fingerprint(
    client: kube::Client,
    namespace: &str,
) -> Result<[u8; 32], SecretTokenError> {
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    let problem = |problem: String| SecretTokenError::CaBundle {
        namespace: namespace.to_string(),
        problem,
    };
    let map = api
        .get_opt(CA_CONFIGMAP)
        .await
        .map_err(|e| problem(e.to_string()))?
        .ok_or_else(|| problem("not found; is the controller running in this namespace?".into()))?;
    let pem = map
        .data
        .as_ref()
        .and_then(|d| d.get(CA_BUNDLE_KEY))
        .ok_or_else(|| problem(format!("no {CA_BUNDLE_KEY} key")))?;
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| problem(format!("{CA_BUNDLE_KEY} is not a PEM certificate: {e}")))?;
    Ok(Sha256::digest(&der).into())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::kubernetes::testing::{self, Handle, expect, expect_operator};
    use http::{Method, StatusCode};
    use serde_json::{Value, json};

    const NS: &str = "micromine";
    const CA: [u8; 32] = [7; 32];

    fn tokens() -> (SecretTokens, Handle) {
        let (client, api) = testing::client(NS);
        (SecretTokens::new(client, NS), api)
    }

    fn collection() -> String {
        format!("/api/v1/namespaces/{NS}/secrets")
    }

    fn path(id: &str) -> String {
        format!("{}/{}", collection(), secret_name(id))
    }

    /// The Secret `create` posted, with the record decoded.
    fn stored(body: &Value) -> (Value, Value) {
        // ByteString's own deserializer undoes the base64 of `data`.
        let record: ByteString = serde_json::from_value(body["data"][RECORD_KEY].clone()).unwrap();
        (body.clone(), serde_json::from_slice(&record.0).unwrap())
    }

    fn with_version(mut secret: Value, version: &str) -> Value {
        secret["metadata"]["resourceVersion"] = json!(version);
        secret
    }

    /// Answers the read of `name` with 404; `run`, the redeem, must then find the token
    /// unknown.
    async fn answer_gone(
        api: &mut Handle,
        name: &str,
        run: tokio::task::JoinHandle<Result<TokenRecord, SecretTokenError>>,
    ) {
        expect(api, Method::GET, name).await.answer(
            StatusCode::NOT_FOUND,
            &testing::failure(404, "NotFound", "gone"),
        );
        assert!(matches!(
            run.await.unwrap(),
            Err(SecretTokenError::Token(TokenError::UnknownToken { .. }))
        ));
    }

    async fn created(uses: u32) -> (SecretTokens, Handle, BootstrapToken, Value) {
        let (tokens, mut api) = tokens();
        let spec = TokenSpec {
            uses,
            labels: BTreeMap::from([("site".into(), "plant-3".into())]),
            ..TokenSpec::default()
        };
        let creator = tokens.clone();
        let run = tokio::spawn(async move { creator.create(&spec, CA).await });
        let seen = expect_operator(&mut api, Method::POST, &collection()).await;
        let body = seen.body.clone();
        seen.answer(StatusCode::CREATED, &with_version(body.clone(), "1"));
        let (token, record) = run.await.unwrap().unwrap();
        assert_eq!(record.uses_remaining, uses);
        (tokens, api, token, with_version(body, "1"))
    }

    #[tokio::test]
    async fn create_stores_only_the_hash_in_a_labelled_secret() {
        let (_, _, token, secret) = created(2).await;
        let (secret, record) = stored(&secret);
        assert_eq!(secret["metadata"]["name"], secret_name(&token.id_hex()));
        assert_eq!(secret["type"], SECRET_TYPE);
        assert_eq!(secret["metadata"]["labels"][TOKEN_LABEL], "true");
        assert_eq!(record["uses_remaining"], 2);
        assert_eq!(record["labels"]["site"], "plant-3");
        assert_eq!(
            record["secret_sha256"],
            hex::encode(Sha256::digest(token.secret))
        );
        assert!(
            !secret.to_string().contains(&hex::encode(token.secret)),
            "the secret itself is never stored"
        );
    }

    #[tokio::test]
    async fn a_use_is_consumed_by_replace_with_the_version_read_and_the_last_by_delete() {
        let (tokens, mut api, token, secret) = created(2).await;
        let name = path(&token.id_hex());

        let redeemer = tokens.clone();
        let t = token.clone();
        let run = tokio::spawn(async move { redeemer.redeem(&t, CA, 0).await });
        expect(&mut api, Method::GET, &name)
            .await
            .answer(StatusCode::OK, &secret);
        let put = expect(&mut api, Method::PUT, &name).await;
        assert_eq!(
            put.body["metadata"]["resourceVersion"], "1",
            "optimistic concurrency"
        );
        let (_, record) = stored(&put.body);
        assert_eq!(record["uses_remaining"], 1);
        let after = with_version(put.body.clone(), "2");
        put.answer(StatusCode::OK, &after);
        assert_eq!(run.await.unwrap().unwrap().uses_remaining, 1);

        let redeemer = tokens.clone();
        let t = token.clone();
        let run = tokio::spawn(async move { redeemer.redeem(&t, CA, 0).await });
        expect(&mut api, Method::GET, &name)
            .await
            .answer(StatusCode::OK, &after);
        let delete = expect(&mut api, Method::DELETE, &name).await;
        assert_eq!(delete.body["preconditions"]["resourceVersion"], "2");
        delete.answer(StatusCode::OK, &after);
        assert_eq!(run.await.unwrap().unwrap().uses_remaining, 0);

        // Replayed after its last use: the Secret is gone.
        let run = tokio::spawn(async move { tokens.redeem(&token, CA, 0).await });
        answer_gone(&mut api, &name, run).await;
    }

    #[tokio::test]
    async fn a_conflicting_writer_makes_redeem_read_again() {
        let (tokens, mut api, token, secret) = created(1).await;
        let name = path(&token.id_hex());
        let run = tokio::spawn(async move { tokens.redeem(&token, CA, 0).await });
        expect(&mut api, Method::GET, &name)
            .await
            .answer(StatusCode::OK, &secret);
        expect(&mut api, Method::DELETE, &name).await.answer(
            StatusCode::CONFLICT,
            &testing::failure(409, "Conflict", "precondition failed"),
        );
        // The other writer consumed the last use: on the second read the Secret is gone.
        answer_gone(&mut api, &name, run).await;
    }

    #[tokio::test]
    async fn wrong_secrets_change_nothing_and_expired_tokens_are_deleted() {
        let (tokens, mut api, token, secret) = created(3).await;
        let name = path(&token.id_hex());
        let mut forged = token.clone();
        forged.secret[0] ^= 1;
        let redeemer = tokens.clone();
        let run = tokio::spawn(async move { redeemer.redeem(&forged, CA, 0).await });
        expect(&mut api, Method::GET, &name)
            .await
            .answer(StatusCode::OK, &secret);
        assert!(matches!(
            run.await.unwrap(),
            Err(SecretTokenError::Token(TokenError::WrongSecret { .. }))
        ));

        let mut wrong_ca = token.clone();
        wrong_ca.ca_fingerprint = [8; 32];
        // Refused before any request.
        assert!(matches!(
            tokens.redeem(&wrong_ca, CA, 0).await,
            Err(SecretTokenError::Token(TokenError::WrongCa { .. }))
        ));

        let run = tokio::spawn(async move { tokens.redeem(&token, CA, i64::MAX).await });
        expect(&mut api, Method::GET, &name)
            .await
            .answer(StatusCode::OK, &secret);
        expect(&mut api, Method::DELETE, &name)
            .await
            .answer(StatusCode::OK, &secret);
        assert!(matches!(
            run.await.unwrap(),
            Err(SecretTokenError::Token(TokenError::Expired { .. }))
        ));
    }

    #[tokio::test]
    async fn list_shows_token_secrets_oldest_first_and_skips_unreadable_ones() {
        let (tokens, mut api, _, secret) = created(2).await;
        let (_, record) = stored(&secret);
        let mut older = record.clone();
        older["id"] = json!("00000000000000aa");
        older["created_unix_ms"] = json!(1);
        let mut older_secret = secret.clone();
        older_secret["data"][RECORD_KEY] =
            serde_json::to_value(ByteString(serde_json::to_vec(&older).unwrap())).unwrap();
        let mut broken = secret.clone();
        broken["data"] = json!({});
        let run = tokio::spawn(async move { tokens.list().await });
        let seen = expect_operator(&mut api, Method::GET, &collection()).await;
        assert!(
            seen.query
                .contains("labelSelector=micromine.dev%2Fbootstrap-token"),
            "{}",
            seen.query
        );
        seen.answer(
            StatusCode::OK,
            &json!({"apiVersion": "v1", "kind": "SecretList", "metadata": {"resourceVersion": "9"},
                    "items": [secret, broken, older_secret]}),
        );
        let listed = run.await.unwrap().unwrap();
        let ids: Vec<&str> = listed.iter().map(|r| r.id_hex.as_str()).collect();
        assert_eq!(ids, ["00000000000000aa", record["id"].as_str().unwrap()]);
        assert_eq!(listed[1].uses_remaining, 2);
    }

    #[tokio::test]
    async fn a_secret_holding_another_token_is_corrupt() {
        let (tokens, mut api, token, secret) = created(1).await;
        let mut other = token.clone();
        other.id[0] ^= 1;
        let name = path(&other.id_hex());
        let run = tokio::spawn(async move { tokens.redeem(&other, CA, 0).await });
        expect(&mut api, Method::GET, &name)
            .await
            .answer(StatusCode::OK, &secret);
        let error = run.await.unwrap().unwrap_err().to_string();
        assert!(error.contains("holds token"), "{error}");
    }

    #[tokio::test]
    async fn the_ca_bundle_is_applied_and_read_back_as_a_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let pki = crate::pki::Pki::load_or_create(dir.path()).unwrap();
        let (client, mut api) = testing::client(NS);
        let bundle = pki.bundle_pem();
        let publisher = client.clone();
        let run = tokio::spawn(async move { publish_ca_bundle(publisher, NS, &bundle).await });
        let path = format!("/api/v1/namespaces/{NS}/configmaps/{CA_CONFIGMAP}");
        let apply = expect(&mut api, Method::PATCH, &path).await;
        assert_eq!(apply.content_type, "application/apply-patch+yaml");
        assert!(apply.query.contains("fieldManager=micromine-controller"));
        assert!(apply.query.contains("force=true"));
        let published = apply.body.clone();
        assert_eq!(published["data"][CA_BUNDLE_KEY], pki.bundle_pem());
        apply.answer(StatusCode::OK, &published);
        run.await.unwrap().unwrap();

        let run = tokio::spawn(async move { published_ca_fingerprint(client, NS).await });
        expect_operator(&mut api, Method::GET, &path)
            .await
            .answer(StatusCode::OK, &published);
        assert_eq!(run.await.unwrap().unwrap(), pki.ca_fingerprint());
    }
}
