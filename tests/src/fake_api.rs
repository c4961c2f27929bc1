//! A small in-memory Kubernetes API server, so end-to-end tests can run
//! `micromine-controller run --kubernetes` without a cluster.
//!
//! It speaks just enough of the API machinery for the controller's requests, with the
//! semantics the controller relies on (the unit tests' scripted mock cannot check those,
//! it only replays answers):
//!
//! - one global, monotonically increasing `resourceVersion`; `PUT` and `DELETE` with a
//!   stale one are refused with 409, which leader election and token consumption need;
//! - `metadata.generation` that moves only with the spec (and deletion), as for custom
//!   resources, so the controller's generation predicate and `observedGeneration` mean
//!   what they mean on a real cluster;
//! - finalizers hold a deleted object (with `deletionTimestamp`) until they are gone;
//! - a status subresource for MicroMiners and EdgeDevices: writes to the object leave
//!   `.status` alone, writes to `/status` touch nothing else;
//! - list-then-watch from the list's `resourceVersion`, as kube-runtime's watcher does;
//! - JSON patch (with `test`), merge patch, and server-side apply reduced to what one
//!   field manager per field can observe.
//!
//! There is no schema validation, no authentication and no discovery: a MicroMiner the
//! CRD schema would accept but the controller cannot serve reaches the controller as on
//! a cluster, and so does one the schema would refuse.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, watch};

/// Resources with a status subresource (the CRDs declare one).
const WITH_STATUS: [&str; 2] = ["microminers", "edgedevices"];

/// One request as the server saw it, for tests to count and inspect writes.
#[derive(Debug, Clone)]
pub struct Request {
    /// `GET`, `PATCH`, ...
    pub method: String,
    /// The URL path.
    pub path: String,
    /// The raw query string (empty when none).
    pub query: String,
    /// The `Content-Type` header (empty when none).
    pub content_type: String,
    /// The request body as text.
    pub body: String,
    /// The bearer token it carried: whose credentials made it.
    pub bearer: String,
}

impl Request {
    /// Whether the request could change something.
    pub fn is_write(&self) -> bool {
        !matches!(self.method.as_str(), "GET" | "HEAD")
    }
}

/// Where a request points: a collection, or one object, or its status.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    /// `v1` or `group/version`.
    api_version: String,
    /// Plural, lower case: `microminers`.
    resource: String,
    /// `None`: cluster-scoped, or every namespace for a list.
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

impl Target {
    /// Parses `/api/v1/...` and `/apis/<group>/<version>/...` paths.
    fn parse(path: &str) -> Option<Target> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (api_version, rest) = match segments.as_slice() {
            ["api", version, rest @ ..] => (version.to_string(), rest),
            ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
            _ => return None,
        };
        // `namespaces/<ns>/<resource>...` is namespaced; `namespaces/<ns>` is the
        // Namespace object itself.
        let (namespace, rest) = match rest {
            ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
            _ => (None, rest),
        };
        let (resource, name, status) = match rest {
            [resource] => (resource, None, false),
            [resource, name] => (resource, Some(name.to_string()), false),
            [resource, name, "status"] => (resource, Some(name.to_string()), true),
            _ => return None,
        };
        Some(Target {
            api_version,
            resource: resource.to_string(),
            namespace,
            name,
            status,
        })
    }

    fn key(&self) -> Key {
        (
            format!("{}/{}", self.api_version, self.resource),
            self.namespace.clone().unwrap_or_default(),
            self.name.clone().unwrap_or_default(),
        )
    }

    fn has_status(&self) -> bool {
        WITH_STATUS.contains(&self.resource.as_str())
    }

    fn kind(&self) -> String {
        let known = [
            ("leases", "Lease"),
            ("configmaps", "ConfigMap"),
            ("secrets", "Secret"),
            ("events", "Event"),
            ("endpointslices", "EndpointSlice"),
            ("microminers", "MicroMiner"),
            ("edgedevices", "EdgeDevice"),
            ("namespaces", "Namespace"),
        ];
        known
            .iter()
            .find(|(plural, _)| *plural == self.resource)
            .map(|(_, kind)| kind.to_string())
            .unwrap_or_else(|| self.resource.trim_end_matches('s').to_string())
    }
}

/// (`apiVersion/resource`, namespace or "", name).
type Key = (String, String, String);

/// An error as the API server reports it.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub code: u16,
    /// `NotFound`, `Conflict`, ...
    pub reason: &'static str,
    /// For people.
    pub message: String,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: String) -> ApiError {
        ApiError {
            code,
            reason,
            message,
        }
    }

    fn not_found(target: &Target) -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            format!(
                "{} \"{}\" not found",
                target.resource,
                target.name.as_deref().unwrap_or_default()
            ),
        )
    }

    fn conflict(target: &Target) -> ApiError {
        ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{}\": the object has been modified; please apply your changes to the latest version and try again",
                target.resource,
                target.name.as_deref().unwrap_or_default()
            ),
        )
    }

    fn status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (code, axum::Json(self.status())).into_response()
    }
}

/// A change, kept for watches.
#[derive(Debug, Clone)]
struct Change {
    version: u64,
    key: Key,
    type_: &'static str,
    object: Value,
}

#[derive(Debug, Default)]
struct Store {
    objects: BTreeMap<Key, Value>,
    /// Every change ever made: tests are short, and watches from any version just work.
    changes: Vec<Change>,
    version: u64,
    log: Vec<Request>,
}

/// Shared between the server tasks and the test thread.
struct Inner {
    store: Mutex<Store>,
    /// The latest resourceVersion, so watches wake up on changes.
    changed: watch::Sender<u64>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Store> {
        // A panicking test thread must not take the server down with it.
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `object` (or its removal) under a new resourceVersion and tells watchers.
    fn commit(
        &self,
        store: &mut Store,
        key: Key,
        object: Option<Value>,
        old: Option<&Value>,
    ) -> Value {
        store.version += 1;
        let version = store.version;
        let (type_, mut object) = match object {
            Some(object) => (if old.is_some() { "MODIFIED" } else { "ADDED" }, object),
            None => ("DELETED", old.cloned().unwrap_or_default()),
        };
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        match type_ {
            "DELETED" => {
                store.objects.remove(&key);
            }
            _ => {
                store.objects.insert(key.clone(), object.clone());
            }
        }
        store.changes.push(Change {
            version,
            key,
            type_,
            object: object.clone(),
        });
        self.changed.send_replace(version);
        object
    }

    /// Writes `new` in place of `old` (or creates it) with the API server's rules for
    /// the fields clients do not own; removes it when it is being deleted and no
    /// finalizer is left.
    fn write(
        &self,
        store: &mut Store,
        target: &Target,
        old: Option<Value>,
        mut new: Value,
    ) -> Value {
        let key = target.key();
        if !new.is_object() {
            new = json!({});
        }
        if let Some(old) = &old {
            if target.status {
                // Only the status moves through the status subresource.
                let status = new.get("status").cloned();
                new = old.clone();
                set_or_remove(&mut new, "status", status);
            } else if target.has_status() {
                set_or_remove(&mut new, "status", old.get("status").cloned());
            }
        } else if target.has_status() {
            set_or_remove(&mut new, "status", None);
        }
        new["apiVersion"] = json!(target.api_version);
        new["kind"] = json!(target.kind());
        if !new["metadata"].is_object() {
            new["metadata"] = json!({});
        }
        let meta = &mut new["metadata"];
        meta["name"] = json!(key.2);
        match &target.namespace {
            Some(ns) => meta["namespace"] = json!(ns),
            None => {
                if let Some(m) = meta.as_object_mut() {
                    m.remove("namespace");
                }
            }
        }
        match &old {
            Some(old) => {
                for field in ["uid", "creationTimestamp", "deletionTimestamp"] {
                    set_or_remove(meta, field, old["metadata"].get(field).cloned());
                }
                let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
                let moved = without_meta_and_status(old) != without_meta_and_status(&new);
                new["metadata"]["generation"] = json!(generation + i64::from(moved));
            }
            None => {
                meta["uid"] = json!(format!(
                    "00000000-0000-4000-8000-{:012x}",
                    store.version + 1
                ));
                meta["creationTimestamp"] = json!(now());
                meta["generation"] = json!(1);
                if let Some(m) = meta.as_object_mut() {
                    m.remove("deletionTimestamp");
                }
            }
        }
        let finalized = new["metadata"]
            .get("finalizers")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty);
        if new["metadata"].get("deletionTimestamp").is_some() && finalized {
            return self.commit(store, key, None, Some(&new));
        }
        self.commit(store, key, Some(new), old.as_ref())
    }

    fn get(&self, target: &Target) -> Result<Value, ApiError> {
        self.lock()
            .objects
            .get(&target.key())
            .cloned()
            .ok_or_else(|| ApiError::not_found(target))
    }

    fn list(&self, target: &Target, selector: Option<&str>) -> Value {
        let store = self.lock();
        let items: Vec<Value> = store
            .objects
            .iter()
            .filter(|(key, object)| in_collection(target, key) && selected(object, selector))
            .map(|(_, object)| object.clone())
            .collect();
        json!({
            "apiVersion": target.api_version,
            "kind": format!("{}List", target.kind()),
            "metadata": {"resourceVersion": store.version.to_string()},
            "items": items,
        })
    }

    fn create(&self, target: &Target, mut object: Value) -> Result<Value, ApiError> {
        let mut store = self.lock();
        let mut target = target.clone();
        let name = match object["metadata"]["name"].as_str() {
            Some(name) if !name.is_empty() => name.to_string(),
            _ => match object["metadata"]["generateName"].as_str() {
                Some(prefix) => format!("{prefix}{:05x}", store.version + 1),
                None => {
                    return Err(ApiError::new(
                        422,
                        "Invalid",
                        "metadata.name: Required value".into(),
                    ));
                }
            },
        };
        object["metadata"]["name"] = json!(name);
        target.name = Some(name.clone());
        if store.objects.contains_key(&target.key()) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", target.resource),
            ));
        }
        Ok(self.write(&mut store, &target, None, object))
    }

    fn replace(&self, target: &Target, object: Value) -> Result<Value, ApiError> {
        let mut store = self.lock();
        let old = store
            .objects
            .get(&target.key())
            .cloned()
            .ok_or_else(|| ApiError::not_found(target))?;
        if let Some(version) = object["metadata"]["resourceVersion"].as_str()
            && !version.is_empty()
            && Some(version) != old["metadata"]["resourceVersion"].as_str()
        {
            return Err(ApiError::conflict(target));
        }
        Ok(self.write(&mut store, target, Some(old), object))
    }

    fn patch(&self, target: &Target, content_type: &str, body: &[u8]) -> Result<Value, ApiError> {
        let patch: Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::new(400, "BadRequest", format!("the patch is not JSON: {e}")))?;
        let mut store = self.lock();
        let old = store.objects.get(&target.key()).cloned();
        let kind = content_type.split(';').next().unwrap_or_default().trim();
        let new = match (kind, &old) {
            // Server-side apply creates what does not exist yet (not through /status).
            ("application/apply-patch+yaml", None) if !target.status => patch,
            (_, None) => return Err(ApiError::not_found(target)),
            ("application/apply-patch+yaml", Some(old)) if target.status => {
                // One field manager owns the whole status, so what it leaves out of an
                // apply is removed, as server-side apply would: the status is replaced.
                let mut new = old.clone();
                set_or_remove(&mut new, "status", patch.get("status").cloned());
                new
            }
            // Elsewhere fields are shared with other managers (kubectl's spec, our
            // labels): a deep merge is what they can observe.
            ("application/apply-patch+yaml" | "application/merge-patch+json", Some(old)) => {
                let mut new = old.clone();
                merge(&mut new, &patch);
                new
            }
            ("application/json-patch+json", Some(old)) => json_patch(old, &patch)?,
            (other, Some(_)) => {
                return Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!("the fake API server does not know patch type {other:?}"),
                ));
            }
        };
        Ok(self.write(&mut store, target, old, new))
    }

    fn delete(&self, target: &Target, options: &Value) -> Result<Value, ApiError> {
        let mut store = self.lock();
        let old = store
            .objects
            .get(&target.key())
            .cloned()
            .ok_or_else(|| ApiError::not_found(target))?;
        if let Some(version) = options["preconditions"]["resourceVersion"].as_str()
            && Some(version) != old["metadata"]["resourceVersion"].as_str()
        {
            return Err(ApiError::conflict(target));
        }
        let finalizers = old["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if !finalizers {
            return Ok(self.commit(&mut store, target.key(), None, Some(&old)));
        }
        if old["metadata"].get("deletionTimestamp").is_some() {
            return Ok(old);
        }
        // Held by finalizers: marked, not removed; for custom resources this is a
        // metadata change that bumps the generation.
        let mut new = old.clone();
        new["metadata"]["deletionTimestamp"] = json!(now());
        let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
        new["metadata"]["generation"] = json!(generation + 1);
        Ok(self.commit(&mut store, target.key(), Some(new), Some(&old)))
    }
}

fn set_or_remove(object: &mut Value, field: &str, value: Option<Value>) {
    if let Some(map) = object.as_object_mut() {
        match value {
            Some(value) => {
                map.insert(field.to_string(), value);
            }
            None => {
                map.remove(field);
            }
        }
    }
}

fn without_meta_and_status(object: &Value) -> Value {
    let mut object = object.clone();
    set_or_remove(&mut object, "metadata", None);
    set_or_remove(&mut object, "status", None);
    object
}

fn in_collection(target: &Target, key: &Key) -> bool {
    let (resource, namespace, _) = target.key();
    key.0 == resource && (target.namespace.is_none() || key.1 == namespace)
}

/// `labelSelector` with the forms the controller and tests use: `k`, `!k`, `k=v`,
/// `k==v`, `k!=v`, comma-separated (all must hold).
fn selected(object: &Value, selector: Option<&str>) -> bool {
    let labels = &object["metadata"]["labels"];
    let label = |key: &str| labels.get(key).and_then(Value::as_str);
    selector
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|term| !term.is_empty())
        .all(|term| {
            if let Some((key, value)) = term.split_once("!=") {
                label(key.trim()) != Some(value.trim())
            } else if let Some((key, value)) = term.split_once('=') {
                label(key.trim()) == Some(value.trim_start_matches('=').trim())
            } else if let Some(key) = term.strip_prefix('!') {
                label(key).is_none()
            } else {
                label(term).is_some()
            }
        })
}

/// RFC 7386: objects merge, `null` removes, anything else replaces.
fn merge(target: &mut Value, patch: &Value) {
    let Some(patch) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Some(target) = target.as_object_mut() {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// RFC 6902 with `add`, `remove`, `replace` and `test`. A `test` of `null` against a
/// missing member passes, as on the real API server: kube-runtime's finalizer helper
/// relies on it for objects without finalizers.
fn json_patch(object: &Value, patch: &Value) -> Result<Value, ApiError> {
    let invalid = |message: String| ApiError::new(422, "Invalid", message);
    let operations = patch
        .as_array()
        .ok_or_else(|| invalid("a JSON patch is an array".into()))?;
    let mut object = object.clone();
    for operation in operations {
        let op = operation["op"].as_str().unwrap_or_default();
        let path = operation["path"].as_str().unwrap_or_default();
        let value = operation.get("value").cloned().unwrap_or(Value::Null);
        let (parent_path, last) = path
            .rsplit_once('/')
            .ok_or_else(|| invalid(format!("bad path {path:?}")))?;
        let last = last.replace("~1", "/").replace("~0", "~");
        match op {
            "test" => {
                let current = object.pointer(path).cloned().unwrap_or(Value::Null);
                if current != value {
                    return Err(invalid(format!(
                        "the test of {path} failed: it is {current}, not {value}"
                    )));
                }
            }
            "add" | "replace" | "remove" => {
                let parent = object
                    .pointer_mut(parent_path)
                    .ok_or_else(|| invalid(format!("{parent_path} does not exist")))?;
                match parent {
                    Value::Object(map) => {
                        let existed = match op {
                            "remove" => map.remove(&last).is_some(),
                            _ => map.insert(last.clone(), value).is_some(),
                        };
                        if op != "add" && !existed {
                            return Err(invalid(format!("{path} does not exist")));
                        }
                    }
                    Value::Array(items) => {
                        let index = if last == "-" {
                            items.len()
                        } else {
                            last.parse::<usize>()
                                .map_err(|_| invalid(format!("bad index in {path}")))?
                        };
                        let in_range = match op {
                            "add" => index <= items.len(),
                            _ => index < items.len(),
                        };
                        if !in_range {
                            return Err(invalid(format!("{path} is out of range")));
                        }
                        match op {
                            "add" => items.insert(index, value),
                            "replace" => items[index] = value,
                            _ => {
                                items.remove(index);
                            }
                        }
                    }
                    _ => return Err(invalid(format!("{parent_path} is not a container"))),
                }
            }
            other => return Err(invalid(format!("unsupported JSON patch op {other:?}"))),
        }
    }
    Ok(object)
}

fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// The fake API server, serving until dropped.
pub struct FakeApi {
    inner: Arc<Inner>,
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FakeApi {
    /// Starts on a free loopback port.
    pub fn start() -> FakeApi {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime for the fake API server");
        let (changed, _) = watch::channel(0);
        let inner = Arc::new(Inner {
            store: Mutex::default(),
            changed,
        });
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("binding the fake API server");
        let addr = listener.local_addr().expect("its address");
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(inner.clone());
        runtime.spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("fake API server stopped: {e}");
            }
        });
        FakeApi {
            inner,
            addr,
            runtime: Some(runtime),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig for this server (default namespace `namespace`) to `path`. The
    /// server checks no credentials; `bearer` tells whose requests are whose in
    /// [`FakeApi::requests`].
    pub fn write_kubeconfig(&self, path: &std::path::Path, namespace: &str, bearer: &str) {
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\nusers:\n- name: e2e\n  user:\n    token: {bearer}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: e2e\n    namespace: {namespace}\ncurrent-context: fake\n",
            self.url()
        );
        std::fs::write(path, config).expect("writing the kubeconfig");
    }

    /// The object at API path `path`, if it exists.
    pub fn get(&self, path: &str) -> Option<Value> {
        self.inner.get(&target(path)).ok()
    }

    /// The objects of the collection at `path` (every namespace when it names none).
    pub fn list(&self, path: &str) -> Vec<Value> {
        self.inner.list(&target(path), None)["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// `kubectl apply`: creates the object at `path`, or deep-merges `object` into it
    /// (its `status` is ignored, as the API server does for the main resource).
    pub fn apply(&self, path: &str, object: Value) -> Value {
        let body = serde_json::to_vec(&object).expect("JSON");
        self.inner
            .patch(&target(path), "application/apply-patch+yaml", &body)
            .unwrap_or_else(|e| panic!("applying {path}: {}", e.message))
    }

    /// `kubectl delete --wait=false`: removes the object, or marks it deleted while
    /// finalizers hold it. Whether it existed.
    pub fn delete(&self, path: &str) -> bool {
        self.inner.delete(&target(path), &Value::Null).is_ok()
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Request> {
        self.inner.lock().log.clone()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        // Ends open watches with the connections; clients see the server go away.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn target(path: &str) -> Target {
    Target::parse(path).unwrap_or_else(|| panic!("{path} is not an API path"))
}

async fn handle(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_string();
    inner.lock().log.push(Request {
        method: method.to_string(),
        path: uri.path().to_string(),
        query: uri.query().unwrap_or_default().to_string(),
        content_type: content_type.clone(),
        body: String::from_utf8_lossy(&body).into_owned(),
        bearer,
    });
    let Some(target) = Target::parse(uri.path()) else {
        return ApiError::new(404, "NotFound", format!("no API at {}", uri.path())).into_response();
    };
    let object = || -> Result<Value, ApiError> {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::new(400, "BadRequest", format!("the body is not JSON: {e}")))
    };
    let ok = |value: Value| (StatusCode::OK, value);
    let result = match (&method, target.name.is_some()) {
        (&Method::GET, false) if query.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            return watch_response(inner, target, &query);
        }
        (&Method::GET, false) => Ok(ok(
            inner.list(&target, query.get("labelSelector").map(String::as_str))
        )),
        (&Method::GET, true) => inner.get(&target).map(ok),
        (&Method::POST, false) => object()
            .and_then(|o| inner.create(&target, o))
            .map(|o| (StatusCode::CREATED, o)),
        (&Method::PUT, true) => object().and_then(|o| inner.replace(&target, o)).map(ok),
        (&Method::PATCH, true) => inner.patch(&target, &content_type, &body).map(ok),
        (&Method::DELETE, true) => {
            // Delete options (preconditions) come in the body.
            let options = serde_json::from_slice(&body).unwrap_or(Value::Null);
            inner.delete(&target, &options).map(ok)
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported on {}", uri.path()),
        )),
    };
    match result {
        Ok((code, value)) => (code, axum::Json(value)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Streams the changes after `resourceVersion` as newline-delimited watch events until
/// `timeoutSeconds` pass or the server stops. Without a version (or `0`) it starts with
/// the current objects as `ADDED`, as the API server does.
fn watch_response(inner: Arc<Inner>, target: Target, query: &HashMap<String, String>) -> Response {
    let selector = query.get("labelSelector").cloned();
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(Duration::from_secs(290), Duration::from_secs);
    let since: Option<u64> = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .filter(|v| *v > 0);
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    let mut changed = inner.changed.subscribe();
    tokio::spawn(async move {
        let line = |type_: &str, object: &Value| {
            let mut text = json!({"type": type_, "object": object}).to_string();
            text.push('\n');
            Ok(Bytes::from(text))
        };
        let mut seen = match since {
            Some(version) => version,
            None => {
                let (version, initial) = {
                    let store = inner.lock();
                    let initial: Vec<Value> = store
                        .objects
                        .iter()
                        .filter(|(key, o)| {
                            in_collection(&target, key) && selected(o, selector.as_deref())
                        })
                        .map(|(_, o)| o.clone())
                        .collect();
                    (store.version, initial)
                };
                for object in initial {
                    if tx.send(line("ADDED", &object)).await.is_err() {
                        return;
                    }
                }
                version
            }
        };
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let pending: Vec<Change> = inner
                .lock()
                .changes
                .iter()
                .filter(|c| c.version > seen && in_collection(&target, &c.key))
                .cloned()
                .collect();
            for change in pending {
                seen = change.version;
                if !selected(&change.object, selector.as_deref()) {
                    continue;
                }
                if tx.send(line(change.type_, &change.object)).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                _ = tx.closed() => return,
                result = changed.changed() => if result.is_err() { return },
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_collections_objects_and_status() {
        let t = Target::parse("/apis/micromine.dev/v1alpha1/namespaces/plant/microminers/a/status")
            .expect("parses");
        assert_eq!(t.namespace.as_deref(), Some("plant"));
        assert_eq!(t.name.as_deref(), Some("a"));
        assert!(t.status);
        let all = Target::parse("/apis/micromine.dev/v1alpha1/microminers").expect("parses");
        assert_eq!((all.namespace, all.name), (None, None));
        let ns = Target::parse("/api/v1/namespaces/plant").expect("parses");
        assert_eq!(
            (ns.resource.as_str(), ns.name.as_deref()),
            ("namespaces", Some("plant"))
        );
    }

    #[test]
    fn generation_follows_the_spec_and_finalizers_hold_deletion() {
        let api = FakeApi::start();
        let path = "/apis/micromine.dev/v1alpha1/namespaces/plant/microminers/a";
        let created = api.apply(path, json!({"spec": {"x": 1}, "status": {"ignored": true}}));
        assert_eq!(created["metadata"]["generation"], 1);
        assert!(created.get("status").is_none(), "status is a subresource");
        let target = target(path);
        let labelled = api.apply(path, json!({"metadata": {"labels": {"a": "b"}}}));
        assert_eq!(labelled["metadata"]["generation"], 1);
        let status = api
            .inner
            .patch(
                &Target {
                    status: true,
                    ..target.clone()
                },
                "application/merge-patch+json",
                br#"{"status":{"ok":true},"spec":{"x":9}}"#,
            )
            .expect("status patch");
        assert_eq!(
            (status["status"]["ok"].clone(), status["spec"]["x"].clone()),
            (json!(true), json!(1))
        );
        assert_eq!(status["metadata"]["generation"], 1);
        let finalized = api
            .inner
            .patch(
                &target,
                "application/json-patch+json",
                br#"[{"op":"test","path":"/metadata/finalizers","value":null},{"op":"add","path":"/metadata/finalizers","value":["f"]}]"#,
            )
            .expect("finalizer added");
        assert_eq!(finalized["metadata"]["finalizers"], json!(["f"]));
        let changed = api.apply(path, json!({"spec": {"x": 2}}));
        assert_eq!(changed["metadata"]["generation"], 2);
        assert!(api.delete(path));
        let deleting = api.get(path).expect("held by the finalizer");
        assert!(deleting["metadata"]["deletionTimestamp"].is_string());
        assert_eq!(deleting["metadata"]["generation"], 3);
        api.inner
            .patch(
                &target,
                "application/json-patch+json",
                br#"[{"op":"test","path":"/metadata/finalizers/0","value":"f"},{"op":"remove","path":"/metadata/finalizers/0"}]"#,
            )
            .expect("finalizer removed");
        assert!(api.get(path).is_none(), "gone with its last finalizer");
    }

    #[test]
    fn stale_versions_conflict() {
        let api = FakeApi::start();
        let path = "/api/v1/namespaces/micromine/secrets/s";
        let created = api.apply(path, json!({"data": {}}));
        let version = created["metadata"]["resourceVersion"].clone();
        api.apply(path, json!({"data": {"k": "dg=="}}));
        let t = target(path);
        let stale = api
            .inner
            .replace(&t, json!({"metadata": {"resourceVersion": version}}))
            .expect_err("stale");
        assert_eq!(stale.code, 409);
        let stale = api
            .inner
            .delete(&t, &json!({"preconditions": {"resourceVersion": version}}))
            .expect_err("stale");
        assert_eq!(stale.code, 409);
    }

    #[test]
    fn label_selectors() {
        let object = json!({"metadata": {"labels": {"a": "1"}}});
        assert!(selected(&object, Some("a")));
        assert!(selected(&object, Some("a=1,!b")));
        assert!(!selected(&object, Some("a!=1")));
        assert!(!selected(&object, Some("b")));
    }
}
