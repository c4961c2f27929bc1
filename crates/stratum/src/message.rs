//! Stratum V1 messages: line-delimited JSON-RPC 1.0 as pools speak it.
//!
//! Everything from the pool is checked before use; a problem becomes a [`ProtocolError`]
//! naming the method, the parameter and what was wrong, for the log line that replaces a
//! crash.

use serde_json::{Value, json};

use super::fields::{ProtocolError, hex_field, u32_field};
use super::job::PoolJob;

/// The longest line accepted from a pool. Coinbases with many outputs make long notifies,
/// but nothing legitimate comes near this.
pub const MAX_LINE: usize = 256 * 1024;
/// The largest `extranonce2` size accepted from a pool, bytes.
pub const MAX_EXTRANONCE2: usize = 16;
/// The largest `extranonce1` accepted from a pool, bytes.
const MAX_EXTRANONCE1: usize = 32;

/// An error a pool answered a request with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolError {
    /// The numeric code (20 other, 21 job not found, 22 duplicate, 23 low difficulty,
    /// 24 unauthorized, 25 not subscribed), 0 when the pool gave none.
    pub code: i64,
    /// The pool's message.
    pub message: String,
}

impl PoolError {
    /// Reads the `error` member: `[code, message, data]`, `{code, message}` or a string.
    fn from_value(value: &Value) -> Option<PoolError> {
        let text = |v: &Value| match v {
            Value::String(s) => s.chars().take(200).collect(),
            Value::Null => String::new(),
            other => other.to_string().chars().take(200).collect(),
        };
        match value {
            Value::Null => None,
            Value::Array(items) => Some(PoolError {
                code: items.first().and_then(Value::as_i64).unwrap_or(0),
                message: items.get(1).map(text).unwrap_or_default(),
            }),
            Value::Object(map) => Some(PoolError {
                code: map.get("code").and_then(Value::as_i64).unwrap_or(0),
                message: map.get("message").map(text).unwrap_or_default(),
            }),
            other => Some(PoolError {
                code: 0,
                message: text(other),
            }),
        }
    }

    /// The rejection reason operators see, from the code and, for pools that only send
    /// text, the message.
    pub fn reason(&self) -> RejectReason {
        let message = self.message.to_ascii_lowercase();
        match self.code {
            21 if message.contains("stale") => RejectReason::Stale,
            21 => RejectReason::JobNotFound,
            22 => RejectReason::Duplicate,
            23 => RejectReason::LowDifficulty,
            24 => RejectReason::Unauthorized,
            25 => RejectReason::NotSubscribed,
            _ => RejectReason::from_text(&message),
        }
    }
}

/// Why a pool did not accept a share, as status and metrics count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    /// The job had been replaced (the pool said stale).
    Stale,
    /// The pool did not know the job.
    JobNotFound,
    /// The pool had it already.
    Duplicate,
    /// Below the pool's difficulty.
    LowDifficulty,
    /// The worker is not authorized.
    Unauthorized,
    /// The connection was not subscribed.
    NotSubscribed,
    /// Any other error the pool gave.
    Other,
    /// The pool did not answer in time.
    Timeout,
    /// The share's pool session ended before it could be submitted (the pool changed, or
    /// did not resume the session after a reconnect), so it could not be submitted.
    SessionLost,
    /// The pool replaced the share's job (`clean_jobs`) before it could be sent; not sent,
    /// as the pool would only count it stale.
    JobReplaced,
}

impl RejectReason {
    /// Every reason, in the order status lists them.
    pub const ALL: [RejectReason; 10] = [
        RejectReason::Stale,
        RejectReason::JobNotFound,
        RejectReason::Duplicate,
        RejectReason::LowDifficulty,
        RejectReason::Unauthorized,
        RejectReason::NotSubscribed,
        RejectReason::Other,
        RejectReason::Timeout,
        RejectReason::SessionLost,
        RejectReason::JobReplaced,
    ];

    /// The label value in status and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Stale => "stale",
            RejectReason::JobNotFound => "job-not-found",
            RejectReason::Duplicate => "duplicate",
            RejectReason::LowDifficulty => "low-difficulty",
            RejectReason::Unauthorized => "unauthorized",
            RejectReason::NotSubscribed => "not-subscribed",
            RejectReason::Other => "other",
            RejectReason::Timeout => "timeout",
            RejectReason::SessionLost => "session-lost",
            RejectReason::JobReplaced => "job-replaced",
        }
    }

    /// Parses [`RejectReason::as_str`].
    pub fn parse(text: &str) -> Option<RejectReason> {
        RejectReason::ALL.into_iter().find(|r| r.as_str() == text)
    }

    /// Classifies a free-text rejection (ckpool's `reject-reason`, pools without codes).
    pub fn from_text(message: &str) -> RejectReason {
        let message = message.to_ascii_lowercase();
        if message.contains("stale") {
            RejectReason::Stale
        } else if message.contains("job not found") || message.contains("unknown job") {
            RejectReason::JobNotFound
        } else if message.contains("duplicate") {
            RejectReason::Duplicate
        } else if message.contains("low difficulty") || message.contains("above target") {
            RejectReason::LowDifficulty
        } else if message.contains("unauthori") {
            RejectReason::Unauthorized
        } else if message.contains("not subscribed") {
            RejectReason::NotSubscribed
        } else {
            RejectReason::Other
        }
    }
}

/// One message from the pool.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// The answer to one of our requests.
    Response {
        /// Our request's id.
        id: u64,
        /// The result (`null` on error).
        result: Value,
        /// The error, if any; ckpool-style `reject-reason` included.
        error: Option<PoolError>,
    },
    /// `mining.notify`.
    Notify(PoolJob),
    /// `mining.set_difficulty`.
    SetDifficulty(f64),
    /// `mining.set_extranonce`.
    SetExtranonce {
        /// The new extranonce1.
        extranonce1: Vec<u8>,
        /// The new extranonce2 size.
        extranonce2_size: usize,
    },
    /// `mining.set_version_mask`.
    SetVersionMask(u32),
    /// `client.reconnect`: connect again, to another host/port if given, after a wait.
    Reconnect {
        /// Host to connect to, if not the current one.
        host: Option<String>,
        /// Port to connect to, if not the current one.
        port: Option<u16>,
        /// Seconds to wait first.
        wait_seconds: u64,
    },
    /// A request we must answer (`client.get_version`), by id.
    GetVersion(Value),
    /// `client.show_message`: text for the operator.
    ShowMessage(String),
    /// A method we do not know; requests among them are answered with an error.
    Unknown {
        /// The method name.
        method: String,
        /// The request id, when the pool expects an answer.
        id: Option<Value>,
    },
}

/// Parses one line from the pool.
pub fn parse_line(line: &str) -> Result<Incoming, ProtocolError> {
    let value: Value = serde_json::from_str(line)
        .map_err(|e| ProtocolError::new("message", "line", format!("is not JSON ({e})")))?;
    let Value::Object(map) = &value else {
        return Err(ProtocolError::new(
            "message",
            "line",
            "must be a JSON object",
        ));
    };
    let id = map.get("id").cloned().unwrap_or(Value::Null);
    let method = match map.get("method") {
        None | Some(Value::Null) => None,
        Some(Value::String(m)) => Some(m.as_str()),
        Some(other) => {
            return Err(ProtocolError::new(
                "message",
                "method",
                format!("must be a string, got {other}"),
            ));
        }
    };
    let Some(method) = method else {
        let id = id.as_u64().ok_or_else(|| {
            ProtocolError::new(
                "response",
                "id",
                format!("must be one of our request ids, got {id}"),
            )
        })?;
        let mut error = map.get("error").and_then(PoolError::from_value);
        if error.is_none()
            && let Some(reason) = map.get("reject-reason").and_then(Value::as_str)
        {
            error = Some(PoolError {
                code: 0,
                message: reason.chars().take(200).collect(),
            });
        }
        return Ok(Incoming::Response {
            id,
            result: map.get("result").cloned().unwrap_or(Value::Null),
            error,
        });
    };
    let params = map
        .get("params")
        .cloned()
        .unwrap_or(Value::Array(Vec::new()));
    let param = |i: usize| params.get(i).cloned().unwrap_or(Value::Null);
    match method {
        "mining.notify" => Ok(Incoming::Notify(PoolJob::from_params(&params)?)),
        "mining.set_difficulty" => {
            let difficulty = param(0).as_f64().filter(|d| d.is_finite() && *d > 0.0);
            match difficulty {
                Some(d) => Ok(Incoming::SetDifficulty(d)),
                None => Err(ProtocolError::new(
                    method,
                    "params[0] (difficulty)",
                    format!("must be a number above 0, got {}", param(0)),
                )),
            }
        }
        "mining.set_extranonce" => {
            let extranonce1 = hex_field(method, "params[0] (extranonce1)", &param(0), None)?;
            if extranonce1.len() > MAX_EXTRANONCE1 {
                return Err(ProtocolError::new(
                    method,
                    "params[0] (extranonce1)",
                    format!("{} bytes, at most {MAX_EXTRANONCE1}", extranonce1.len()),
                ));
            }
            let extranonce2_size =
                extranonce2_size(method, "params[1] (extranonce2_size)", &param(1))?;
            Ok(Incoming::SetExtranonce {
                extranonce1,
                extranonce2_size,
            })
        }
        "mining.set_version_mask" => Ok(Incoming::SetVersionMask(u32_field(
            method,
            "params[0] (mask)",
            &param(0),
        )?)),
        "client.reconnect" => {
            let host = match param(0) {
                Value::Null => None,
                Value::String(h) if h.is_empty() => None,
                Value::String(h) if h.len() <= 253 && !h.contains(['/', ' ', '@']) => Some(h),
                other => {
                    return Err(ProtocolError::new(
                        method,
                        "params[0] (host)",
                        format!("must be a host name, got {other}"),
                    ));
                }
            };
            let port = match param(1) {
                Value::Null => None,
                Value::Number(n) => Some(
                    n.as_u64()
                        .and_then(|p| u16::try_from(p).ok())
                        .filter(|p| *p > 0)
                        .ok_or_else(|| {
                            ProtocolError::new(
                                method,
                                "params[1] (port)",
                                format!("must be 1-65535, got {n}"),
                            )
                        })?,
                ),
                Value::String(s) => {
                    Some(s.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                        ProtocolError::new(
                            method,
                            "params[1] (port)",
                            format!("must be 1-65535, got {s:?}"),
                        )
                    })?)
                }
                other => {
                    return Err(ProtocolError::new(
                        method,
                        "params[1] (port)",
                        format!("must be 1-65535, got {other}"),
                    ));
                }
            };
            let wait_seconds = param(2).as_u64().unwrap_or(0);
            Ok(Incoming::Reconnect {
                host,
                port,
                wait_seconds,
            })
        }
        "client.get_version" => Ok(Incoming::GetVersion(id)),
        "client.show_message" => Ok(Incoming::ShowMessage(
            param(0)
                .as_str()
                .unwrap_or_default()
                .chars()
                .take(500)
                .collect(),
        )),
        other => Ok(Incoming::Unknown {
            method: other.chars().take(100).collect(),
            id: (!id.is_null()).then_some(id),
        }),
    }
}

fn extranonce2_size(method: &str, field: &str, value: &Value) -> Result<usize, ProtocolError> {
    value
        .as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .filter(|n| *n <= MAX_EXTRANONCE2)
        .ok_or_else(|| {
            ProtocolError::new(
                method,
                field,
                format!("must be a whole number from 0 to {MAX_EXTRANONCE2}, got {value}"),
            )
        })
}

/// What `mining.subscribe` returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The id to resume this session with later, when the pool gave one.
    pub session_id: Option<String>,
    /// The pool's part of the coinbase's extranonce, for this connection.
    pub extranonce1: Vec<u8>,
    /// How many bytes of extranonce the miner (the controller) chooses.
    pub extranonce2_size: usize,
}

impl Subscription {
    /// Reads the result of `mining.subscribe`: `[subscriptions, extranonce1,
    /// extranonce2_size]`, where the first `mining.notify` subscription id is the session
    /// id.
    pub fn from_result(result: &Value) -> Result<Subscription, ProtocolError> {
        let method = "mining.subscribe";
        let items = result.as_array().filter(|a| a.len() >= 3).ok_or_else(|| {
            ProtocolError::new(
                method,
                "result",
                format!("must be [subscriptions, extranonce1, extranonce2_size], got {result}"),
            )
        })?;
        let session_id = items[0].as_array().and_then(|subs| {
            // Either [["mining.notify", id], ...] or a flat ["mining.notify", id].
            let pairs: Vec<&Value> = if subs.first().is_some_and(Value::is_array) {
                subs.iter().collect()
            } else {
                vec![&items[0]]
            };
            pairs.into_iter().find_map(|pair| {
                let pair = pair.as_array()?;
                (pair.first()?.as_str()? == "mining.notify")
                    .then(|| pair.get(1)?.as_str().map(str::to_string))
                    .flatten()
                    .filter(|id| !id.is_empty() && id.len() <= 128)
            })
        });
        let extranonce1 = hex_field(method, "result[1] (extranonce1)", &items[1], None)?;
        if extranonce1.len() > MAX_EXTRANONCE1 {
            return Err(ProtocolError::new(
                method,
                "result[1] (extranonce1)",
                format!("{} bytes, at most {MAX_EXTRANONCE1}", extranonce1.len()),
            ));
        }
        let extranonce2_size = extranonce2_size(method, "result[2] (extranonce2_size)", &items[2])?;
        Ok(Subscription {
            session_id,
            extranonce1,
            extranonce2_size,
        })
    }
}

/// The version-rolling mask from `mining.configure`'s result, if the pool agreed to it.
pub fn version_rolling_mask(result: &Value) -> Option<u32> {
    let map = result.as_object()?;
    if map.get("version-rolling").and_then(Value::as_bool) != Some(true) {
        return None;
    }
    let mask = map.get("version-rolling.mask")?.as_str()?;
    u32::from_str_radix(mask, 16).ok().filter(|m| *m != 0)
}

/// A request line (with its newline).
pub fn request(id: u64, method: &str, params: Value) -> String {
    let mut line = json!({"id": id, "method": method, "params": params}).to_string();
    line.push('\n');
    line
}

/// A response line to a pool's request.
pub fn response(id: &Value, result: Value, error: Value) -> String {
    let mut line = json!({"id": id, "result": result, "error": error}).to_string();
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_and_errors_in_every_shape_pools_use() {
        let ok = parse_line(r#"{"id":4,"result":true,"error":null}"#).expect("parses");
        assert_eq!(
            ok,
            Incoming::Response {
                id: 4,
                result: Value::Bool(true),
                error: None
            }
        );
        let cases = [
            (
                r#"{"id":5,"result":null,"error":[21,"Job not found",null]}"#,
                RejectReason::JobNotFound,
            ),
            (
                r#"{"id":5,"result":false,"error":[21,"Stale",null]}"#,
                RejectReason::Stale,
            ),
            (
                r#"{"id":5,"result":null,"error":[22,"Duplicate share",null]}"#,
                RejectReason::Duplicate,
            ),
            (
                r#"{"id":5,"result":null,"error":{"code":23,"message":"Low difficulty share"}}"#,
                RejectReason::LowDifficulty,
            ),
            (
                r#"{"id":5,"result":false,"error":null,"reject-reason":"Stale"}"#,
                RejectReason::Stale,
            ),
            (
                r#"{"id":5,"result":false,"error":"high-hash"}"#,
                RejectReason::Other,
            ),
            (
                r#"{"id":5,"result":null,"error":[24,"Unauthorized worker",null]}"#,
                RejectReason::Unauthorized,
            ),
            (
                r#"{"id":5,"result":null,"error":[25,"Not subscribed",null]}"#,
                RejectReason::NotSubscribed,
            ),
        ];
        for (line, reason) in cases {
            match parse_line(line).expect(line) {
                Incoming::Response { error: Some(e), .. } => {
                    assert_eq!(e.reason(), reason, "{line}")
                }
                other => panic!("{line}: {other:?}"),
            }
        }
        for reason in RejectReason::ALL {
            assert_eq!(RejectReason::parse(reason.as_str()), Some(reason));
        }
    }

    #[test]
    fn notifications_are_read_and_checked() {
        assert_eq!(
            parse_line(r#"{"id":null,"method":"mining.set_difficulty","params":[0.25]}"#),
            Ok(Incoming::SetDifficulty(0.25))
        );
        assert_eq!(
            parse_line(r#"{"id":null,"method":"mining.set_extranonce","params":["abcd",6]}"#),
            Ok(Incoming::SetExtranonce {
                extranonce1: vec![0xab, 0xcd],
                extranonce2_size: 6
            })
        );
        assert_eq!(
            parse_line(
                r#"{"id":null,"method":"client.reconnect","params":["pool2.example","3334",5]}"#
            ),
            Ok(Incoming::Reconnect {
                host: Some("pool2.example".into()),
                port: Some(3334),
                wait_seconds: 5
            })
        );
        assert_eq!(
            parse_line(r#"{"id":null,"method":"client.reconnect","params":[]}"#),
            Ok(Incoming::Reconnect {
                host: None,
                port: None,
                wait_seconds: 0
            })
        );
        assert_eq!(
            parse_line(r#"{"id":9,"method":"client.get_version","params":[]}"#),
            Ok(Incoming::GetVersion(json!(9)))
        );
        assert_eq!(
            parse_line(r#"{"id":null,"method":"mining.set_version_mask","params":["1fffe000"]}"#),
            Ok(Incoming::SetVersionMask(0x1fff_e000))
        );
        assert!(matches!(
            parse_line(r#"{"id":7,"method":"mining.frobnicate","params":[]}"#),
            Ok(Incoming::Unknown { id: Some(_), .. })
        ));
    }

    #[test]
    fn hostile_lines_are_errors_that_name_the_problem() {
        let cases = [
            ("not json", "line"),
            ("[1,2,3]", "line"),
            (r#"{"id":"x","result":true}"#, "id"),
            (r#"{"id":-1,"result":true}"#, "id"),
            (r#"{"method":7}"#, "method"),
            (
                r#"{"id":null,"method":"mining.set_difficulty","params":[0]}"#,
                "params[0] (difficulty)",
            ),
            (
                r#"{"id":null,"method":"mining.set_difficulty","params":["1e400"]}"#,
                "params[0] (difficulty)",
            ),
            (
                r#"{"id":null,"method":"mining.set_difficulty","params":[-3]}"#,
                "params[0] (difficulty)",
            ),
            (
                r#"{"id":null,"method":"mining.set_extranonce","params":["zz",4]}"#,
                "params[0] (extranonce1)",
            ),
            (
                r#"{"id":null,"method":"mining.set_extranonce","params":["ab",400]}"#,
                "params[1] (extranonce2_size)",
            ),
            (
                r#"{"id":null,"method":"client.reconnect","params":["evil/host",1,1]}"#,
                "params[0] (host)",
            ),
            (
                r#"{"id":null,"method":"client.reconnect","params":["h",70000,1]}"#,
                "params[1] (port)",
            ),
            (
                r#"{"id":null,"method":"mining.notify","params":[]}"#,
                "params",
            ),
        ];
        for (line, field) in cases {
            let err = parse_line(line).expect_err(line);
            assert_eq!(err.field, field, "{line}: {err}");
        }
    }

    #[test]
    fn subscribe_results_in_both_layouts() {
        let nested = json!([
            [["mining.set_difficulty", "d1"], ["mining.notify", "s1"]],
            "08000002",
            4
        ]);
        assert_eq!(
            Subscription::from_result(&nested),
            Ok(Subscription {
                session_id: Some("s1".into()),
                extranonce1: vec![8, 0, 0, 2],
                extranonce2_size: 4
            })
        );
        let flat = json!([
            ["mining.notify", "ae6812eb4cd7735a302a8a9dd95cf71f"],
            "f8002c90",
            8
        ]);
        assert_eq!(
            Subscription::from_result(&flat).map(|s| s.session_id),
            Ok(Some("ae6812eb4cd7735a302a8a9dd95cf71f".into()))
        );
        let none = json!([[], "", 4]);
        assert_eq!(
            Subscription::from_result(&none),
            Ok(Subscription {
                session_id: None,
                extranonce1: vec![],
                extranonce2_size: 4
            })
        );
        assert!(Subscription::from_result(&json!(true)).is_err());
        assert!(Subscription::from_result(&json!([[], "ab", 99])).is_err());
        assert!(Subscription::from_result(&json!([[], "x", 4])).is_err());
    }

    #[test]
    fn configure_results() {
        assert_eq!(
            version_rolling_mask(
                &json!({"version-rolling": true, "version-rolling.mask": "1fffe000"})
            ),
            Some(0x1fff_e000)
        );
        assert_eq!(
            version_rolling_mask(&json!({"version-rolling": false})),
            None
        );
        assert_eq!(version_rolling_mask(&json!(null)), None);
        assert_eq!(
            version_rolling_mask(&json!({"version-rolling": true, "version-rolling.mask": "zz"})),
            None
        );
    }

    #[test]
    fn requests_are_single_lines() {
        let line = request(3, "mining.authorize", json!(["u.w", "p\nq"]));
        assert!(line.ends_with('\n'));
        assert_eq!(line.matches('\n').count(), 1);
        let back: Value = serde_json::from_str(line.trim_end()).expect("json");
        assert_eq!(back["params"][1], "p\nq");
    }
}
