//! Reading the fields of a pool's JSON params, each checked, into typed values or a
//! [`ProtocolError`] that names the method, the field and what was wrong with it. Shared by
//! the message parser and the job builder.

use serde_json::Value;

/// Something a pool sent that does not follow the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{method}: {field} {problem}")]
pub struct ProtocolError {
    /// The method (or `response`) the problem is in.
    pub method: String,
    /// The parameter or field.
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

impl ProtocolError {
    /// A problem with `field` of `method`.
    pub fn new(method: &str, field: &str, problem: impl Into<String>) -> ProtocolError {
        ProtocolError {
            method: method.to_string(),
            field: field.to_string(),
            problem: problem.into(),
        }
    }
}

/// Reads a hex string parameter, of exactly `len` bytes when given.
pub fn hex_field(
    method: &str,
    field: &str,
    value: &Value,
    len: Option<usize>,
) -> Result<Vec<u8>, ProtocolError> {
    let text = value.as_str().ok_or_else(|| {
        ProtocolError::new(method, field, format!("must be a hex string, got {value}"))
    })?;
    let bytes = hex::decode(text)
        .map_err(|e| ProtocolError::new(method, field, format!("is not hex ({e})")))?;
    if let Some(len) = len
        && bytes.len() != len
    {
        return Err(ProtocolError::new(
            method,
            field,
            format!(
                "must be {len} bytes ({} hex digits), got {}",
                2 * len,
                bytes.len()
            ),
        ));
    }
    Ok(bytes)
}

/// Reads a u32 sent as 8 big-endian hex digits.
pub fn u32_field(method: &str, field: &str, value: &Value) -> Result<u32, ProtocolError> {
    let text = value.as_str().filter(|s| s.len() == 8).ok_or_else(|| {
        ProtocolError::new(method, field, format!("must be 8 hex digits, got {value}"))
    })?;
    u32::from_str_radix(text, 16).map_err(|_| {
        ProtocolError::new(method, field, format!("must be 8 hex digits, got {value}"))
    })
}
