//! The address of a Stratum V1 pool as a MicroMiner names it: `stratum+tcp://HOST:PORT`
//! or `stratum+ssl://HOST:PORT`. Checked when the resource is read, used when connecting.

use std::fmt;

/// A pool address from `stratum+tcp://HOST:PORT` or `stratum+ssl://HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolUrl {
    /// Whether the connection is TLS (`stratum+ssl`).
    pub tls: bool,
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl PoolUrl {
    /// Parses a pool URL; the error says what is wrong with it.
    pub fn parse(url: &str) -> Result<PoolUrl, String> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("stratum+tcp://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("stratum+ssl://") {
            (true, rest)
        } else {
            return Err(format!(
                "`{url}` must start with stratum+tcp:// or stratum+ssl://"
            ));
        };
        let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| format!("`{url}`: an IPv6 address needs a closing ]"))?;
            let port = after
                .strip_prefix(':')
                .ok_or_else(|| format!("`{url}` needs a port (HOST:PORT)"))?;
            (host, port)
        } else {
            rest.rsplit_once(':')
                .ok_or_else(|| format!("`{url}` needs a port (HOST:PORT)"))?
        };
        let valid = if rest.starts_with('[') {
            host.parse::<std::net::Ipv6Addr>().is_ok()
        } else {
            !host.is_empty()
                && host.len() <= 253
                && !host.chars().any(|c| {
                    c.is_whitespace() || c.is_control() || matches!(c, '/' | '@' | ':' | '[' | ']')
                })
        };
        if !valid {
            return Err(format!("`{url}` has no valid host"));
        }
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("`{url}`: the port must be a number from 1 to 65535"))?;
        Ok(PoolUrl {
            tls,
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for PoolUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls {
            "stratum+ssl"
        } else {
            "stratum+tcp"
        };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_urls() {
        assert_eq!(
            PoolUrl::parse("stratum+tcp://pool.example:3333"),
            Ok(PoolUrl {
                tls: false,
                host: "pool.example".into(),
                port: 3333
            })
        );
        let v6 = PoolUrl::parse("stratum+ssl://[::1]:443").expect("IPv6");
        assert!(v6.tls);
        assert_eq!(v6.host, "::1");
        assert_eq!(v6.to_string(), "stratum+ssl://[::1]:443");
        for bad in [
            "http://pool:3333",
            "stratum+tcp://pool",
            "stratum+tcp://:3333",
            "stratum+tcp://pool:0",
            "stratum+tcp://pool:65536",
            "stratum+tcp://user@pool:3333",
            "stratum+tcp://pool/x:3333",
            "stratum+tcp://[::1:3333",
        ] {
            assert!(PoolUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
