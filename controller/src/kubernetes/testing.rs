//! A scripted API server for the reconciler tests: each test says which request comes
//! next (method and path), looks at its query and body, and answers it. Every request is
//! also checked against [`super::rbac::RULES`], so code that calls the API without a
//! permission the chart grants fails here rather than in a cluster.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};

/// The test's end of the mocked connection.
pub type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
/// Answers one request.
pub type Responder = tower_test::mock::SendResponse<Response<Body>>;

/// A client whose every request goes to the returned handle.
pub fn client(default_namespace: &str) -> (kube::Client, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(service, default_namespace), handle)
}

/// One request as the test sees it.
pub struct Seen {
    /// The query string, empty when there is none.
    pub query: String,
    /// The body as JSON, `Null` when empty.
    pub body: Value,
    /// The `Content-Type` header, empty when absent.
    pub content_type: String,
    /// Answers the request.
    pub respond: Responder,
}

impl Seen {
    /// Answers with `status` and a JSON body.
    pub fn answer(self, status: StatusCode, body: &Value) {
        answer(self.respond, status, body);
    }
}

/// The next request, which must have `method` and `path` and be allowed by the RBAC rules.
/// Waits at most 5 s: a request that never comes is a failure, not a hang.
pub async fn expect(api: &mut Handle, method: Method, path: &str) -> Seen {
    expect_as(api, method, path, true).await
}

/// [`expect`] for a call the command line makes with the operator's own credentials,
/// which the controller's RBAC does not cover (e.g. creating a token Secret).
pub async fn expect_operator(api: &mut Handle, method: Method, path: &str) -> Seen {
    expect_as(api, method, path, false).await
}

async fn expect_as(api: &mut Handle, method: Method, path: &str, controller: bool) -> Seen {
    let (request, respond) = tokio::time::timeout(Duration::from_secs(5), api.next_request())
        .await
        .unwrap_or_else(|_| panic!("no {method} {path} within 5 s"))
        .expect("the client is still there");
    assert_eq!(request.method(), method, "{}", request.uri());
    assert_eq!(request.uri().path(), path);
    let query = request.uri().query().unwrap_or_default().to_string();
    if controller {
        assert_permitted(&method, path, &query);
    }
    let content_type = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let bytes = request.into_body().collect_bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    Seen {
        query,
        body,
        content_type,
        respond,
    }
}

/// Expects a request and answers it at once; returns its body.
pub async fn exchange(
    api: &mut Handle,
    method: Method,
    path: &str,
    status: StatusCode,
    reply: Value,
) -> Value {
    let seen = expect(api, method, path).await;
    let body = seen.body.clone();
    seen.answer(status, &reply);
    body
}

/// Sends a JSON answer.
pub fn answer(respond: Responder, status: StatusCode, body: &Value) {
    respond.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap(),
    );
}

/// A `Status` failure as the API server sends it.
pub fn failure(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": message})
}

fn assert_permitted(method: &Method, path: &str, query: &str) {
    if let Err(refusal) = super::rbac::permits(method.as_str(), path, query) {
        panic!("{refusal}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "does not grant")]
    fn a_request_without_a_rule_fails_the_test() {
        assert_permitted(&Method::GET, "/api/v1/namespaces/a/secrets", "");
    }
}
