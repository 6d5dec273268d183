//! Authenticated callers: optional JWT bearer tokens on REST (`Authorization`) and gRPC
//! (`authorization` metadata), verified against a JWKS (a file, or a URL fetched, cached
//! and refetched when a token names a key it does not hold: key rotation), with `iss`,
//! `aud`, `exp` and `nbf` checked under a small leeway and a scope required per operation.
//! `jsonwebtoken` does the cryptography (RS256, ES256, EdDSA); nothing here is hand-rolled.
//!
//! The verified subject (`iss` + `sub`) becomes the caller identity that scopes
//! Idempotency-Keys. Probes, `/metrics` and the admin port are not behind this: they have
//! their own ports and rules.

use std::{
    collections::HashSet,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use jsonwebtoken::{
    Algorithm, DecodingKey, Validation,
    jwk::{Jwk, JwkSet},
};
use serde::Deserialize;

/// Where the signing keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// A JWKS document on disk (a mounted Secret or ConfigMap), read at startup.
    File(PathBuf),
    /// An `https://` (or `http://`) JWKS endpoint (the identity provider's), refetched every
    /// `refresh` and when a token names an unknown key (at most every 10 s).
    Url(String),
}

/// The scopes each operation requires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scopes {
    /// `CreateOrder`, `POST /v1/orders`.
    pub create: String,
    /// Reads: get, list, the legacy status.
    pub read: String,
    /// `CancelOrder`, `POST /v1/orders/{id}/cancel`.
    pub cancel: String,
}

/// `APP_AUTH__*`.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// The signing keys.
    pub jwks: JwksSource,
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud` (one of the token's audiences).
    pub audience: String,
    /// Clock skew tolerated on `exp` and `nbf`.
    pub leeway: Duration,
    /// Per-operation scopes.
    pub scopes: Scopes,
    /// How long a fetched JWKS is used before it is fetched again.
    pub refresh: Duration,
    /// A PEM CA for an `https://` JWKS endpoint with a private certificate (an in-cluster
    /// identity provider); the webpki roots otherwise.
    pub jwks_ca: Option<PathBuf>,
}

/// The verified caller, put into the request's extensions for the layers behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// `iss` and `sub`, so two issuers' subjects never collide.
    pub identity: String,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No token, or one that does not verify: 401 / UNAUTHENTICATED.
    Unauthenticated(String),
    /// A valid token without the scope this operation needs: 403 / PERMISSION_DENIED.
    InsufficientScope(String),
}

impl Refusal {
    /// The RFC 6750 challenge for `WWW-Authenticate`.
    pub fn challenge(&self) -> String {
        match self {
            Self::Unauthenticated(why) if why == MISSING => r#"Bearer realm="orders-service""#.to_owned(),
            Self::Unauthenticated(why) => {
                format!(r#"Bearer realm="orders-service", error="invalid_token", error_description="{why}""#)
            }
            Self::InsufficientScope(scope) => {
                format!(r#"Bearer realm="orders-service", error="insufficient_scope", scope="{scope}""#)
            }
        }
    }

    /// What the client is told.
    pub fn detail(&self) -> String {
        match self {
            Self::Unauthenticated(why) => why.clone(),
            Self::InsufficientScope(scope) => format!("this operation needs the scope {scope}"),
        }
    }
}

const MISSING: &str = "a bearer token is required";

#[derive(Debug, Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    /// RFC 8693 `scope`: space-separated.
    #[serde(default)]
    scope: Option<String>,
    /// Some providers send `scp` as a list instead.
    #[serde(default)]
    scp: Option<Vec<String>>,
}

struct Keys {
    set: JwkSet,
    fetched: Instant,
}

/// Verifies bearer tokens.
pub struct Authenticator {
    settings: AuthSettings,
    keys: Arc<RwLock<Keys>>,
    /// Serializes refetches and rate-limits them: when the last one ran, if any did.
    refetch: tokio::sync::Mutex<Option<Instant>>,
    client: reqwest::Client,
}

/// The algorithms accepted; `none` and the HMAC ones never are (a JWKS holds public keys).
const ALGORITHMS: [Algorithm; 3] = [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA];

impl Authenticator {
    /// Loads the keys (startup fails if they cannot be read or fetched).
    pub async fn new(settings: AuthSettings) -> anyhow::Result<Arc<Self>> {
        use anyhow::Context as _;
        let mut client = reqwest::Client::builder().timeout(Duration::from_secs(5));
        if let Some(path) = &settings.jwks_ca {
            let pem = tokio::fs::read(path)
                .await
                .with_context(|| format!("reading APP_AUTH__JWKS_CA_FILE {}", path.display()))?;
            let ca = reqwest::Certificate::from_pem(&pem).with_context(|| {
                format!("APP_AUTH__JWKS_CA_FILE {} is not a PEM certificate", path.display())
            })?;
            client = client.add_root_certificate(ca);
        }
        let client = client.build()?;
        let set = load(&settings.jwks, &client).await?;
        let now = Instant::now();
        Ok(Arc::new(Self {
            settings,
            keys: Arc::new(RwLock::new(Keys { set, fetched: now })),
            refetch: tokio::sync::Mutex::new(None),
            client,
        }))
    }

    /// Verifies the `Authorization` value and checks the scope `required`.
    pub async fn verify(&self, authorization: Option<&str>, required: &str) -> Result<Caller, Refusal> {
        let token = authorization
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Refusal::Unauthenticated(MISSING.to_owned()))?;
        let invalid = |why: &str| Refusal::Unauthenticated(why.to_owned());
        let header = jsonwebtoken::decode_header(token).map_err(|_| invalid("the token is not a JWT"))?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err(invalid("the token's algorithm is not accepted"));
        }
        let kid = header.kid.ok_or_else(|| invalid("the token names no key (kid)"))?;
        let jwk = match self.key(&kid) {
            Some(jwk) => jwk,
            None => {
                self.refetch_for_unknown_key().await;
                self.key(&kid).ok_or_else(|| invalid("the token is signed by an unknown key"))?
            }
        };
        let key = DecodingKey::from_jwk(&jwk).map_err(|_| invalid("the signing key is unusable"))?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.settings.leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.settings.issuer]);
        validation.set_audience(&[&self.settings.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind as K;
                invalid(match e.kind() {
                    K::ExpiredSignature => "the token has expired",
                    K::ImmatureSignature => "the token is not valid yet",
                    K::InvalidIssuer => "the token is from another issuer",
                    K::InvalidAudience => "the token is for another audience",
                    K::InvalidSignature => "the token's signature does not verify",
                    K::MissingRequiredClaim(_) => "the token lacks a required claim (exp, iss, aud, sub)",
                    _ => "the token is invalid",
                })
            })?
            .claims;
        let scopes: HashSet<&str> = claims
            .scope
            .iter()
            .flat_map(|s| s.split_whitespace())
            .chain(claims.scp.iter().flatten().map(String::as_str))
            .collect();
        if !scopes.contains(required) {
            return Err(Refusal::InsufficientScope(required.to_owned()));
        }
        Ok(Caller { identity: format!("{}|{}", claims.iss, claims.sub) })
    }

    /// The scope an operation needs: REST `METHOD /route`, or a gRPC path.
    pub fn scope_for(&self, operation: &str) -> Option<&str> {
        let s = &self.settings.scopes;
        match operation {
            "POST /v1/orders" | "/orders.v1.OrderService/CreateOrder" => Some(&s.create),
            "POST /v1/orders/{id}/cancel" | "/orders.v1.OrderService/CancelOrder" => Some(&s.cancel),
            "GET /v1/orders"
            | "GET /v1/orders/{id}"
            | "GET /v1/orders/{id}/status"
            | "/orders.v1.OrderService/GetOrder"
            | "/orders.v1.OrderService/ListOrders"
            | "/orders.v1.OrderService/GetOrderStatus" => Some(&s.read),
            _ => None,
        }
    }

    fn key(&self, kid: &str) -> Option<Jwk> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let stale = matches!(self.settings.jwks, JwksSource::Url(_))
            && keys.fetched.elapsed() > self.settings.refresh;
        let found = keys.set.find(kid).cloned();
        if stale {
            drop(keys);
            // Refresh in the background; the cached key still serves this request.
            if let Ok(mut last) = self.refetch.try_lock() {
                *last = Some(Instant::now());
                drop(last);
                self.spawn_refresh();
            }
        }
        found
    }

    fn spawn_refresh(&self) {
        let (source, client) = (self.settings.jwks.clone(), self.client.clone());
        let keys = self.keys.clone();
        tokio::spawn(async move {
            match load(&source, &client).await {
                Ok(set) => {
                    *keys.write().unwrap_or_else(|p| p.into_inner()) = Keys { set, fetched: Instant::now() }
                }
                Err(e) => tracing::warn!(
                    error = format!("{e:#}"),
                    "auth: refreshing the JWKS failed; keeping the cached keys"
                ),
            }
        });
    }

    /// A token named a key we do not hold: the provider may have rotated. Refetch now,
    /// at most every 10 s (a flood of made-up kids must not hammer the provider).
    async fn refetch_for_unknown_key(&self) {
        let JwksSource::Url(_) = &self.settings.jwks else { return };
        let mut last = self.refetch.lock().await;
        if last.is_some_and(|at| at.elapsed() < Duration::from_secs(10)) {
            return;
        }
        *last = Some(Instant::now());
        match load(&self.settings.jwks, &self.client).await {
            Ok(set) => {
                *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Keys { set, fetched: Instant::now() }
            }
            Err(e) => tracing::warn!(error = format!("{e:#}"), "auth: refetching the JWKS failed"),
        }
    }
}

async fn load(source: &JwksSource, client: &reqwest::Client) -> anyhow::Result<JwkSet> {
    use anyhow::Context as _;
    let text = match source {
        JwksSource::File(path) => tokio::fs::read_to_string(path)
            .await
            .with_context(|| format!("reading APP_AUTH__JWKS_FILE {}", path.display()))?,
        JwksSource::Url(url) => {
            client
                .get(url)
                .send()
                .await
                .and_then(reqwest::Response::error_for_status)
                .with_context(|| format!("fetching APP_AUTH__JWKS_URL {url}"))?
                .text()
                .await?
        }
    };
    serde_json::from_str(&text).context("the JWKS is not a JSON Web Key Set")
}

impl From<Refusal> for crate::error::ApiError {
    fn from(refusal: Refusal) -> Self {
        let (challenge, detail) = (refusal.challenge(), refusal.detail());
        match refusal {
            Refusal::Unauthenticated(_) => Self::Unauthenticated { challenge, detail },
            Refusal::InsufficientScope(_) => Self::Forbidden { challenge, detail },
        }
    }
}

/// REST: every API route verifies its caller before anything else runs (a `route_layer`,
/// so only matched routes; one with no scope configured is refused: fail closed).
pub async fn rest(
    axum::extract::State(auth): axum::extract::State<Arc<Authenticator>>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let route = request.extensions().get::<axum::extract::MatchedPath>().map(|p| p.as_str().to_owned());
    let operation = format!("{} {}", request.method(), route.unwrap_or_default());
    let authorization = request.headers().get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let verified = match auth.scope_for(&operation) {
        Some(scope) => auth.verify(authorization, scope).await,
        None => Err(Refusal::InsufficientScope(format!("(none configured for {operation})"))),
    };
    match verified {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(refusal) => crate::error::ApiError::from(refusal).into_response(),
    }
}

/// gRPC: the same check as a server layer. Health checks stay open (they are the probes);
/// every other method needs a scope, reflection included.
#[derive(Clone)]
pub struct GrpcAuthLayer(pub Arc<Authenticator>);

impl<S> tower::Layer<S> for GrpcAuthLayer {
    type Service = GrpcAuth<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcAuth { inner, auth: self.0.clone() }
    }
}

/// The service [`GrpcAuthLayer`] produces.
#[derive(Clone)]
pub struct GrpcAuth<S> {
    inner: S,
    auth: Arc<Authenticator>,
}

impl<S, ReqB, ResB> tower::Service<http::Request<ReqB>> for GrpcAuth<S>
where
    S: tower::Service<http::Request<ReqB>, Response = http::Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqB: Send + 'static,
    ResB: Default + Send + 'static,
{
    type Response = http::Response<ResB>;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqB>) -> Self::Future {
        let path = request.uri().path().to_owned();
        if path.starts_with("/grpc.health.v1.Health/") {
            return Box::pin(self.inner.call(request));
        }
        // The ready inner service is this one; a clone takes its place for the next call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        Box::pin(async move {
            let authorization = request
                .headers()
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let verified = match auth.scope_for(&path) {
                Some(scope) => auth.verify(authorization.as_deref(), scope).await,
                None => Err(Refusal::InsufficientScope(format!("(none configured for {path})"))),
            };
            match verified {
                Ok(caller) => {
                    request.extensions_mut().insert(caller);
                    inner.call(request).await
                }
                Err(refusal) => {
                    let code = match refusal {
                        Refusal::Unauthenticated(_) => tonic::Code::Unauthenticated,
                        Refusal::InsufficientScope(_) => tonic::Code::PermissionDenied,
                    };
                    let mut status = tonic::Status::new(code, refusal.detail());
                    if let Ok(value) = refusal.challenge().parse() {
                        status.metadata_mut().insert("www-authenticate", value);
                    }
                    Ok(status.into_http())
                }
            }
        })
    }
}
