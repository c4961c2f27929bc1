//! Logs as text or JSON lines on stderr, with a level filter an operator can change while
//! the controller runs (`PUT /loglevel` on the HTTP listener, from loopback, e.g. through
//! `kubectl port-forward`), so chasing a problem does not need a restart that would make
//! it go away.

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Installs the process's logger: `RUST_LOG` if set, else `default_filter`; JSON lines
/// when `json`. Call once, first thing.
pub fn init(json: bool, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let format = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .boxed()
    };
    if tracing_subscriber::registry()
        .with(filter)
        .with(format)
        .try_init()
        .is_ok()
    {
        let _ = FILTER.set(handle);
    }
}

/// The filter in effect, in `RUST_LOG` syntax; `None` before [`init`].
pub fn filter() -> Option<String> {
    FILTER.get()?.with_current(|f| f.to_string()).ok()
}

/// Replaces the filter, e.g. `debug` or `info,micromine_controller::kubernetes=debug`.
/// An error says what is wrong with the directive and changes nothing.
pub fn set_filter(directives: &str) -> Result<String, String> {
    let handle = FILTER
        .get()
        .ok_or_else(|| "logging is not set up in this process".to_string())?;
    let parsed = EnvFilter::builder()
        .parse(directives.trim())
        .map_err(|e| format!("log filter `{}`: {e}", directives.trim()))?;
    let shown = parsed.to_string();
    handle.reload(parsed).map_err(|e| e.to_string())?;
    Ok(shown)
}
