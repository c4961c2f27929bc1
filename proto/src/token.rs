//! The bootstrap token a device joins a fleet with.
//!
//! `mm1.<id>.<secret>.<ca>`: a 16-hex-digit public id (names the token in logs and
//! listings), a 32-hex-digit secret (the controller stores only its SHA-256), and the
//! SHA-256 fingerprint of the controller's CA certificate (64 hex digits). The fingerprint
//! lets a device that has nothing but the controller's address and this token
//! authenticate the controller before it sends the secret, as `kubeadm join` does with its
//! discovery hash.

use std::fmt;
use std::str::FromStr;

const PREFIX: &str = "mm1";

/// A parsed bootstrap token.
#[derive(Clone, PartialEq, Eq)]
pub struct BootstrapToken {
    /// Public token id, 8 bytes.
    pub id: [u8; 8],
    /// The secret, 16 bytes.
    pub secret: [u8; 16],
    /// SHA-256 of the controller CA certificate (DER).
    pub ca_fingerprint: [u8; 32],
}

/// Why a string is not a bootstrap token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenFormatError {
    /// Wrong number of dot-separated parts or wrong prefix.
    #[error("a bootstrap token looks like mm1.<16 hex>.<32 hex>.<64 hex>")]
    Shape,
    /// A part is not hex of the right length.
    #[error("bootstrap token part `{part}` must be {digits} hex digits")]
    Part {
        /// Which part.
        part: &'static str,
        /// Expected number of hex digits.
        digits: usize,
    },
}

impl BootstrapToken {
    /// The id as hex, the form used in file names and logs.
    pub fn id_hex(&self) -> String {
        hex::encode(self.id)
    }
}

fn decode_part<const N: usize>(
    text: &str,
    part: &'static str,
) -> Result<[u8; N], TokenFormatError> {
    let err = TokenFormatError::Part {
        part,
        digits: N * 2,
    };
    if text.len() != N * 2 {
        return Err(err);
    }
    hex::decode(text)
        .ok()
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or(err)
}

impl FromStr for BootstrapToken {
    type Err = TokenFormatError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.trim().split('.').collect();
        let [prefix, id, secret, ca] = parts.as_slice() else {
            return Err(TokenFormatError::Shape);
        };
        if *prefix != PREFIX {
            return Err(TokenFormatError::Shape);
        }
        Ok(BootstrapToken {
            id: decode_part(id, "id")?,
            secret: decode_part(secret, "secret")?,
            ca_fingerprint: decode_part(ca, "ca fingerprint")?,
        })
    }
}

impl fmt::Display for BootstrapToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PREFIX}.{}.{}.{}",
            hex::encode(self.id),
            hex::encode(self.secret),
            hex::encode(self.ca_fingerprint)
        )
    }
}

/// Never print the secret by accident.
impl fmt::Debug for BootstrapToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootstrapToken")
            .field("id", &self.id_hex())
            .field("secret", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_hides_its_secret() {
        let token = BootstrapToken {
            id: [1; 8],
            secret: [2; 16],
            ca_fingerprint: [3; 32],
        };
        let text = token.to_string();
        assert!(text.starts_with("mm1.0101010101010101.0202"));
        assert_eq!(text.parse::<BootstrapToken>(), Ok(token.clone()));
        assert!(!format!("{token:?}").contains("0202"));
    }

    #[test]
    fn malformed_tokens_say_what_is_wrong() {
        assert_eq!("".parse::<BootstrapToken>(), Err(TokenFormatError::Shape));
        assert_eq!(
            "mm2.0101010101010101.02020202020202020202020202020202.x".parse::<BootstrapToken>(),
            Err(TokenFormatError::Shape)
        );
        assert_eq!(
            "mm1.01.02.03".parse::<BootstrapToken>(),
            Err(TokenFormatError::Part {
                part: "id",
                digits: 16
            })
        );
        let bad_secret = format!(
            "mm1.{}.{}.{}",
            "01".repeat(8),
            "zz".repeat(16),
            "03".repeat(32)
        );
        assert_eq!(
            bad_secret.parse::<BootstrapToken>(),
            Err(TokenFormatError::Part {
                part: "secret",
                digits: 32
            })
        );
    }
}
