//! Where the Enrollment service redeems bootstrap tokens: the token files of standalone
//! mode or the Secrets of Kubernetes mode. Above both stores, so neither needs the other.

use std::sync::Arc;

use micromine_proto::token::BootstrapToken;

use crate::kubernetes::tokens::{SecretTokenError, SecretTokens};
use crate::tokens::{TokenError, TokenRecord, TokenStore};

/// Where enrollment finds tokens: files in standalone mode, Secrets in Kubernetes mode.
#[derive(Clone)]
pub enum TokenSource {
    /// A token directory.
    Files(Arc<TokenStore>),
    /// Secrets in the controller's namespace.
    Secrets(Box<SecretTokens>),
}

/// Why a token bought nothing.
#[derive(Debug, thiserror::Error)]
pub enum RedeemError {
    /// The token is wrong, expired or used up; the reason is for the operator's log only.
    #[error("{0}")]
    Refused(String),
    /// The tokens could not be read or written; the device should try again later.
    #[error("{0}")]
    Unavailable(String),
}

impl TokenSource {
    /// Checks and consumes one use of `token`.
    pub async fn redeem(
        &self,
        token: &BootstrapToken,
        ca_fingerprint: [u8; 32],
        now_unix_ms: i64,
    ) -> Result<TokenRecord, RedeemError> {
        match self {
            TokenSource::Files(store) => {
                let store = store.clone();
                let token = token.clone();
                tokio::task::spawn_blocking(move || {
                    store.redeem(&token, ca_fingerprint, now_unix_ms)
                })
                .await
                .map_err(|e| RedeemError::Unavailable(e.to_string()))?
                .map_err(|e| match e {
                    TokenError::Io(_) => RedeemError::Unavailable(e.to_string()),
                    e => RedeemError::Refused(e.to_string()),
                })
            }
            TokenSource::Secrets(secrets) => secrets
                .redeem(token, ca_fingerprint, now_unix_ms)
                .await
                .map_err(|e| match e {
                    SecretTokenError::Token(e) => RedeemError::Refused(e.to_string()),
                    e => RedeemError::Unavailable(e.to_string()),
                }),
        }
    }
}
