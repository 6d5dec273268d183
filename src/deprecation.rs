//! Deprecation and sunset of API operations, from one table in configuration
//! (`APP_DEPRECATIONS`), applied alike to REST routes and gRPC methods.
//!
//! Before its sunset a deprecated operation still works, and every response says so:
//! `Deprecation: @<unix seconds>` (RFC 9745), `Sunset: <IMF-fixdate>` (RFC 8594) and `Link`s
//! to the documentation (`rel="deprecation"`, `rel="sunset"`) and to the successor
//! (`rel="successor-version"`); gRPC responses carry the same as metadata. From the sunset
//! on, REST answers 410 Gone (problem type `gone`) and gRPC `UNIMPLEMENTED` with a
//! `google.rpc.ErrorInfo` (reason `API_SUNSET`), without running the handler. Every call is
//! counted per caller (`deprecated_calls_total`), so the owners know who still has to move.
//!
//! The table is validated at startup: a sunset that does not follow its deprecation, an
//! operation this service does not serve, or a link that cannot be a header value stops the
//! process with a message naming `APP_DEPRECATIONS`.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use axum::extract::MatchedPath;
use chrono::{DateTime, Utc};
use http::{HeaderName, HeaderValue};
use prometheus::IntCounterVec;

/// The built-in table: the legacy status lookup, kept for clients written before the full
/// order was returned, in its REST and gRPC forms. The link is a placeholder: point it at
/// your own migration guide.
pub const DEFAULT_TABLE: &str = r#"[{"operation":"GET /v1/orders/{id}/status","deprecation":"2026-12-01T00:00:00Z","sunset":"2027-12-01T00:00:00Z","link":"https://docs.example.com/orders-service/deprecations#order-status","successor":"/v1/orders/{id}"},{"operation":"/orders.v1.OrderService/GetOrderStatus","deprecation":"2026-12-01T00:00:00Z","sunset":"2027-12-01T00:00:00Z","link":"https://docs.example.com/orders-service/deprecations#order-status","successor":"/orders.v1.OrderService/GetOrder"}]"#;

/// One deprecated operation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deprecation {
    /// `GET /v1/orders/{id}/status` (REST: method and route template, as in `openapi.yaml`)
    /// or `/orders.v1.OrderService/GetOrderStatus` (gRPC: the method's path).
    pub operation: String,
    /// When it is (or was) deprecated; may lie in the future, to announce it.
    pub deprecation: DateTime<Utc>,
    /// When it stops working; must follow the deprecation.
    pub sunset: DateTime<Utc>,
    /// Documentation of the deprecation and the migration (an absolute or relative URI).
    pub link: String,
    /// What to use instead: a URI (REST; `{name}` takes the value of the same path
    /// parameter of the request) or a gRPC method path.
    #[serde(default)]
    pub successor: Option<String>,
}

impl Deprecation {
    /// The `Deprecation` header value: `@` and the Unix time in seconds (RFC 9745).
    pub fn deprecation_header(&self) -> String {
        format!("@{}", self.deprecation.timestamp())
    }

    /// The `Sunset` header value: an IMF-fixdate in GMT (RFC 8594, RFC 9110).
    pub fn sunset_header(&self) -> String {
        self.sunset.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
    }

    /// The successor of this request: the configured URI with the request's path
    /// parameters filled in, matching `template` (the route) against `path` (the request).
    fn successor_for(&self, template: Option<&str>, path: &str) -> Option<String> {
        let mut successor = self.successor.clone()?;
        let Some(template) = template else { return Some(successor) };
        for (pattern, value) in template.split('/').zip(path.split('/')) {
            let Some(name) = pattern.strip_prefix('{').and_then(|p| p.strip_suffix('}')) else { continue };
            // Only plain values are copied into a header; anything else leaves the template.
            if value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')) {
                successor = successor.replace(&format!("{{{name}}}"), value);
            }
        }
        Some(successor)
    }
}

/// Parses and validates a table (the value of `APP_DEPRECATIONS`) against the operations
/// this service serves; the error says which entry is wrong and why.
pub fn parse_table(raw: &str, known: &[String]) -> Result<Vec<Deprecation>, String> {
    let table: Vec<Deprecation> = serde_json::from_str(raw).map_err(|e| {
        format!("not a JSON array of {{operation, deprecation, sunset, link, successor?}}: {e}")
    })?;
    let mut seen = std::collections::HashSet::new();
    for entry in &table {
        let op = &entry.operation;
        if !known.contains(op) {
            return Err(format!("{op:?} is not an operation of this service (known: {})", known.join(", ")));
        }
        if !seen.insert(op) {
            return Err(format!("{op:?} is listed twice"));
        }
        if entry.sunset <= entry.deprecation {
            return Err(format!(
                "{op:?}: the sunset ({}) must come after the deprecation ({})",
                entry.sunset.to_rfc3339(),
                entry.deprecation.to_rfc3339()
            ));
        }
        for (what, uri) in [("link", Some(&entry.link)), ("successor", entry.successor.as_ref())] {
            let Some(uri) = uri else { continue };
            let valid =
                !uri.is_empty() && uri.bytes().all(|b| b.is_ascii_graphic() && !b"<>\"\\^`|".contains(&b));
            if !valid {
                return Err(format!("{op:?}: {what} {uri:?} is not a URI that can go in a Link header"));
            }
        }
    }
    Ok(table)
}

/// Where the current time comes from: the system clock, or a fixed one in tests.
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// The table in force, with what it needs to answer: a clock, the trusted caller-identity
/// header and the call counter.
pub struct Deprecations {
    by_operation: HashMap<String, Deprecation>,
    clock: Clock,
    identity_header: String,
    calls: IntCounterVec,
}

impl Deprecations {
    /// Builds the table; `identity_header` (lower case, may be empty) names the caller.
    pub fn new(
        table: Vec<Deprecation>,
        clock: Clock,
        identity_header: String,
        calls: IntCounterVec,
    ) -> Arc<Self> {
        let by_operation = table.into_iter().map(|d| (d.operation.clone(), d)).collect();
        Arc::new(Self { by_operation, clock, identity_header, calls })
    }

    /// The entry for an operation, if it is deprecated.
    pub fn get(&self, operation: &str) -> Option<&Deprecation> {
        self.by_operation.get(operation)
    }

    /// Every deprecated operation.
    pub fn entries(&self) -> impl Iterator<Item = &Deprecation> {
        self.by_operation.values()
    }
}

impl From<&Deprecation> for crate::error::ApiError {
    fn from(entry: &Deprecation) -> Self {
        Self::Gone {
            operation: entry.operation.clone(),
            sunset: entry.sunset.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            successor: entry.successor.clone(),
            link: entry.link.clone(),
        }
    }
}

/// Builds the answer to a call made after its operation's sunset, in the listener's protocol.
pub type Gone<B> = fn(&Deprecation) -> http::Response<B>;

/// The REST answer after a sunset: 410 Gone, problem type `gone`.
pub fn rest_gone(entry: &Deprecation) -> http::Response<axum::body::Body> {
    axum::response::IntoResponse::into_response(crate::error::ApiError::from(entry))
}

/// The gRPC answer after a sunset: `UNIMPLEMENTED` with `google.rpc.ErrorInfo` (reason
/// `API_SUNSET`, metadata `sunset`, `link`, `successor`); clients do not retry it.
pub fn grpc_gone(entry: &Deprecation) -> http::Response<tonic::body::Body> {
    tonic::Status::from(crate::error::ApiError::from(entry)).into_http()
}

/// Every operation this service serves, as the table names them: `METHOD /route` from the
/// OpenAPI document (which a test keeps equal to the router) and gRPC method paths from the
/// compiled descriptors.
pub fn known_operations() -> Vec<String> {
    use prost::Message;
    let doc = <crate::http::ApiDoc as utoipa::OpenApi>::openapi();
    let mut known: Vec<String> = doc
        .paths
        .paths
        .iter()
        .flat_map(|(path, item)| {
            [
                ("GET", &item.get),
                ("POST", &item.post),
                ("PUT", &item.put),
                ("PATCH", &item.patch),
                ("DELETE", &item.delete),
            ]
            .into_iter()
            .filter(|(_, op)| op.is_some())
            .map(move |(method, _)| format!("{method} {path}"))
        })
        .collect();
    let descriptors =
        prost_types::FileDescriptorSet::decode(crate::pb::FILE_DESCRIPTOR_SET).unwrap_or_default();
    for file in descriptors.file {
        for service in &file.service {
            for method in &service.method {
                known.push(format!("/{}.{}/{}", file.package(), service.name(), method.name()));
            }
        }
    }
    known
}

/// The tower layer; on the REST router it goes in `route_layer` (it reads the matched route
/// template), on the gRPC server around everything (it reads the method path).
pub struct DeprecationLayer<B> {
    table: Arc<Deprecations>,
    gone: Gone<B>,
}

impl<B> Clone for DeprecationLayer<B> {
    fn clone(&self) -> Self {
        Self { table: self.table.clone(), gone: self.gone }
    }
}

impl<B> DeprecationLayer<B> {
    /// A layer applying `table`, answering with `gone` after a sunset.
    pub fn new(table: Arc<Deprecations>, gone: Gone<B>) -> Self {
        Self { table, gone }
    }
}

impl<S, B> tower::Layer<S> for DeprecationLayer<B> {
    type Service = Deprecated<S, B>;
    fn layer(&self, inner: S) -> Self::Service {
        Deprecated { inner, layer: self.clone() }
    }
}

/// The service [`DeprecationLayer`] produces.
pub struct Deprecated<S, B> {
    inner: S,
    layer: DeprecationLayer<B>,
}

impl<S: Clone, B> Clone for Deprecated<S, B> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone(), layer: self.layer.clone() }
    }
}

impl<S, ReqB, B> tower::Service<http::Request<ReqB>> for Deprecated<S, B>
where
    S: tower::Service<http::Request<ReqB>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<B>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqB>) -> Self::Future {
        let table = &self.layer.table;
        let template = request.extensions().get::<MatchedPath>().map(|m| m.as_str().to_owned());
        let operation = match &template {
            Some(route) => format!("{} {route}", request.method()),
            None => request.uri().path().to_owned(),
        };
        let Some(entry) = table.get(&operation) else { return Box::pin(self.inner.call(request)) };
        let headers = response_headers(entry, entry.successor_for(template.as_deref(), request.uri().path()));
        let caller = match table.identity_header.as_str() {
            "" => None,
            name => request.headers().get(name).and_then(|v| v.to_str().ok()).filter(|v| !v.is_empty()),
        }
        .unwrap_or("anonymous");
        let gone = (table.clock)() >= entry.sunset;
        let outcome = if gone { "gone" } else { "served" };
        table.calls.with_label_values(&[operation.as_str(), caller, outcome]).inc();
        if gone {
            let mut response = (self.layer.gone)(entry);
            append(&mut response, headers);
            return Box::pin(async move { Ok(response) });
        }
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            append(&mut response, headers);
            Ok(response)
        })
    }
}

/// Adds `headers` to a response, keeping repeated names (several `Link`s) as separate fields.
fn append<B>(response: &mut http::Response<B>, headers: Vec<(HeaderName, HeaderValue)>) {
    for (name, value) in headers {
        response.headers_mut().append(name, value);
    }
}

/// The headers (gRPC: metadata) of a response from a deprecated operation, in a fixed order.
fn response_headers(entry: &Deprecation, successor: Option<String>) -> Vec<(HeaderName, HeaderValue)> {
    let mut values = vec![
        ("deprecation", entry.deprecation_header()),
        ("sunset", entry.sunset_header()),
        ("link", format!("<{}>; rel=\"deprecation\"", entry.link)),
        ("link", format!("<{}>; rel=\"sunset\"", entry.link)),
    ];
    if let Some(successor) = successor {
        values.push(("link", format!("<{successor}>; rel=\"successor-version\"")));
    }
    values
        .into_iter()
        .filter_map(|(name, value)| {
            // Validated at startup; a value that still cannot be a header is left out.
            Some((HeaderName::from_static(name), HeaderValue::try_from(value).ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Deprecation {
        Deprecation {
            operation: "GET /v1/orders/{id}/status".into(),
            deprecation: "2026-12-01T00:00:00Z".parse().expect("a time"),
            sunset: "2027-12-01T00:00:00Z".parse().expect("a time"),
            link: "https://docs.example/deprecations".into(),
            successor: Some("/v1/orders/{id}".into()),
        }
    }

    #[test]
    fn header_values_follow_the_rfcs() {
        assert_eq!(entry().deprecation_header(), "@1796083200");
        assert_eq!(entry().sunset_header(), "Wed, 01 Dec 2027 00:00:00 GMT");
        let headers = response_headers(&entry(), Some("/v1/orders/1".into()));
        let lines: Vec<String> =
            headers.iter().map(|(n, v)| format!("{n}: {}", v.to_str().expect("ascii"))).collect();
        assert_eq!(
            lines,
            [
                "deprecation: @1796083200",
                "sunset: Wed, 01 Dec 2027 00:00:00 GMT",
                "link: <https://docs.example/deprecations>; rel=\"deprecation\"",
                "link: <https://docs.example/deprecations>; rel=\"sunset\"",
                "link: </v1/orders/1>; rel=\"successor-version\"",
            ]
        );
    }

    #[test]
    fn successors_take_the_requests_path_parameters() {
        let e = entry();
        assert_eq!(
            e.successor_for(Some("/v1/orders/{id}/status"), "/v1/orders/abc-1/status").as_deref(),
            Some("/v1/orders/abc-1")
        );
        // Anything that is not a plain value stays out of the header.
        assert_eq!(
            e.successor_for(Some("/v1/orders/{id}/status"), "/v1/orders/a%3E%0d/status").as_deref(),
            Some("/v1/orders/{id}")
        );
    }

    /// On a fixed clock: one second before the sunset the route is served with the headers,
    /// at the sunset instant it is gone.
    #[tokio::test]
    async fn the_sunset_instant_switches_served_to_gone() {
        use std::sync::atomic::{AtomicI64, Ordering};
        use tower::ServiceExt;

        let now = Arc::new(AtomicI64::new(entry().sunset.timestamp() - 1));
        let clock_now = now.clone();
        let clock: Clock = Arc::new(move || {
            DateTime::from_timestamp(clock_now.load(Ordering::SeqCst), 0).expect("in range")
        });
        let calls = IntCounterVec::new(prometheus::Opts::new("c", "c"), &["operation", "caller", "outcome"])
            .expect("counter");
        let table = Deprecations::new(vec![entry()], clock, String::new(), calls.clone());
        let router = axum::Router::new()
            .route("/v1/orders/{id}/status", axum::routing::get(|| async { "ran" }))
            .route_layer(DeprecationLayer::new(table, rest_gone));
        let call = |router: axum::Router| async move {
            let request = http::Request::get("/v1/orders/o-1/status").body(axum::body::Body::empty());
            router.oneshot(request.expect("request")).await.expect("infallible")
        };

        let served = call(router.clone()).await;
        assert_eq!(served.status(), 200);
        assert_eq!(served.headers()["deprecation"], "@1796083200");
        assert_eq!(
            served.headers().get_all("link").iter().next_back().expect("successor"),
            "</v1/orders/o-1>; rel=\"successor-version\""
        );

        now.fetch_add(1, Ordering::SeqCst);
        let gone = call(router).await;
        assert_eq!(gone.status(), 410);
        assert_eq!(gone.headers()["sunset"], "Wed, 01 Dec 2027 00:00:00 GMT");
        let op = "GET /v1/orders/{id}/status";
        assert_eq!(calls.with_label_values(&[op, "anonymous", "served"]).get(), 1);
        assert_eq!(calls.with_label_values(&[op, "anonymous", "gone"]).get(), 1);
    }

    /// The proto's `option deprecated = true` and the built-in table name the same methods.
    #[test]
    fn deprecated_in_proto_is_deprecated_in_the_table() {
        use prost::Message;
        let files =
            prost_types::FileDescriptorSet::decode(crate::pb::FILE_DESCRIPTOR_SET).expect("descriptors");
        let mut in_proto: Vec<String> = files
            .file
            .iter()
            .flat_map(|f| f.service.iter().map(move |s| (f.package(), s)))
            .flat_map(|(package, s)| s.method.iter().map(move |m| (package, s.name(), m)))
            .filter(|(_, _, m)| m.options.as_ref().is_some_and(|o| o.deprecated()))
            .map(|(package, service, m)| format!("/{package}.{service}/{}", m.name()))
            .collect();
        let mut in_table: Vec<String> = parse_table(DEFAULT_TABLE, &known_operations())
            .expect("valid")
            .into_iter()
            .map(|d| d.operation)
            .filter(|op| op.starts_with('/'))
            .collect();
        in_proto.sort();
        in_table.sort();
        assert_eq!(in_proto, in_table);
        assert_eq!(in_table, ["/orders.v1.OrderService/GetOrderStatus"]);
    }

    #[test]
    fn the_table_is_validated() {
        let known = vec![
            "GET /v1/orders/{id}/status".to_owned(),
            "/orders.v1.OrderService/GetOrderStatus".to_owned(),
        ];
        assert_eq!(parse_table(DEFAULT_TABLE, &known).expect("the default table is valid").len(), 2);
        let with = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut table: serde_json::Value = serde_json::from_str(DEFAULT_TABLE).expect("json");
            edit(&mut table[0]);
            parse_table(&table.to_string(), &known)
        };
        let early = with(&|e| e["sunset"] = "2026-11-30T23:59:59Z".into()).expect_err("sunset first");
        assert!(early.contains("must come after the deprecation"), "{early}");
        assert!(with(&|e| e["sunset"] = e["deprecation"].clone()).is_err());
        assert!(
            with(&|e| e["operation"] = "GET /v1/nope".into())
                .expect_err("unknown")
                .contains("not an operation")
        );
        assert!(
            with(&|e| e["link"] = "https://x/>; rel=\"next\"".into())
                .expect_err("injection")
                .contains("link")
        );
        assert!(with(&|e| e["extra"] = 1.into()).expect_err("typo").contains("unknown field"));
        assert!(parse_table("{}", &known).is_err());
        let twice = format!(
            "[{0},{0}]",
            serde_json::to_string(
                &serde_json::from_str::<serde_json::Value>(DEFAULT_TABLE).expect("json")[0]
            )
            .expect("json")
        );
        assert!(parse_table(&twice, &known).expect_err("duplicate").contains("twice"));
    }
}
