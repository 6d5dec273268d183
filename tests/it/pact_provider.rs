//! Pact provider verification: every contract in `pacts/` whose provider is `orders-service`
//! is verified against the running service (PostgreSQL, Kafka) with the verifier of the
//! pact CLI (`PACT_CLI`, installed by `scripts/tools.sh` from npm). A failed verification
//! fails the test, and so the test command: the first layer of the can-i-deploy gate.
//!
//! The verifier reaches the service through two test-only hooks served here, never by the
//! service itself:
//! - provider states (`POST /provider-states`): each state is set up through the real REST
//!   API, and its values (the order id) fill the pact's provider-state generators;
//! - messages (`POST /`): the verifier names an event; the hook makes the service emit it
//!   for real (a create, a cancel, a payment captured on `payments.events`) and answers
//!   with the record as the relay published it to Kafka: its value as the body, its
//!   CloudEvents headers as `Pact-Message-Metadata`.

use std::{path::PathBuf, sync::Arc, time::Duration};

use axum::{Json, extract::State, http::HeaderMap, response::IntoResponse, routing::post};
use base64::Engine;
use serde_json::{Value, json};

use crate::{
    inbox::{Topics, event, produce},
    kafka,
    support::TestApp,
};

/// The pact CLI binary (`pact verifier …`).
fn pact_cli() -> PathBuf {
    std::env::var_os("PACT_CLI").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("pact"))
}

/// A running service with Kafka, and what the hooks need to drive it.
struct Provider {
    app: TestApp,
    events: kafka::Tail,
    payments_topic: String,
}

async fn provider() -> Arc<Provider> {
    let topics = Topics::create().await;
    let orders_topic = kafka::fresh_topic().await;
    let brokers = kafka::brokers();
    let app = TestApp::spawn_configured(&[
        ("APP_KAFKA__BROKERS", &brokers),
        ("APP_KAFKA__MESSAGE_TIMEOUT_MS", "2000"),
        ("APP_EVENTS__TOPIC", &orders_topic),
        ("APP_KAFKA__GROUP_ID", &topics.group),
        ("APP_INBOX__PAYMENTS_TOPIC", &topics.payments),
        ("APP_INBOX__CUSTOMERS_TOPIC", &topics.customers),
    ])
    .await;
    let events = kafka::Tail::start(&brokers, &orders_topic);
    Arc::new(Provider { app, events, payments_topic: topics.payments })
}

impl Provider {
    async fn create(&self) -> Value {
        self.app.create_ok().await
    }

    async fn cancel(&self, id: &str) {
        assert_eq!(self.app.post_empty(&format!("/v1/orders/{id}/cancel")).await.status(), 200);
    }

    /// Waits for the event of `ce_type` about order `id` on the orders topic.
    async fn published(&self, id: &str, ce_type: &str) -> kafka::Record {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let found = self.events.find(|r| {
                r.headers.get("ce_subject").map(String::as_str) == Some(id)
                    && r.headers.get("ce_type").map(String::as_str) == Some(ce_type)
            });
            if let Some(record) = found {
                return record;
            }
            assert!(tokio::time::Instant::now() < deadline, "{ce_type} for {id} was never published");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `POST /provider-states`: sets up a named state through the real API.
async fn provider_state(
    State(p): State<Arc<Provider>>,
    Json(request): Json<Value>,
) -> axum::response::Response {
    if request["action"] == "teardown" {
        return Json(json!({})).into_response();
    }
    match request["state"].as_str().unwrap_or_default() {
        "an order exists" | "a pending order exists" => {
            let order = p.create().await;
            Json(json!({"id": order["id"]})).into_response()
        }
        // No state, and message states: the message hook itself makes the service emit the event.
        ""
        | "no order exists"
        | "an order was created"
        | "an order was cancelled"
        | "a payment was captured for an order" => Json(json!({})).into_response(),
        other => {
            (axum::http::StatusCode::BAD_REQUEST, format!("unknown provider state {other:?}")).into_response()
        }
    }
}

/// `POST /`: produces the named message through the service and returns it as published.
async fn message(State(p): State<Arc<Provider>>, Json(request): Json<Value>) -> axum::response::Response {
    let order = p.create().await;
    let id = order["id"].as_str().expect("id").to_owned();
    let ce_type = match request["description"].as_str().unwrap_or_default() {
        "an OrderCreated event" => "orders.events.v1.OrderCreated",
        "an OrderCancelled event" => {
            p.cancel(&id).await;
            "orders.events.v1.OrderCancelled"
        }
        "an OrderPaid event" => {
            let data = json!({"paymentId": format!("pay-{id}"), "orderId": id,
                              "amountMinor": order["total_minor"].to_string(), "currency": order["currency"]});
            let ce_id = format!("pact-{id}");
            produce(vec![event(&p.payments_topic, "payments.events.v1.PaymentCaptured", &ce_id, &id, data)])
                .await;
            "orders.events.v1.OrderPaid"
        }
        other => {
            return (axum::http::StatusCode::BAD_REQUEST, format!("unknown message {other:?}"))
                .into_response();
        }
    };
    let record = p.published(&id, ce_type).await;
    let mut metadata = serde_json::Map::new();
    for (key, value) in &record.headers {
        metadata.insert(key.clone(), Value::String(value.clone()));
    }
    let encoded = base64::engine::general_purpose::STANDARD.encode(Value::Object(metadata).to_string());
    let mut headers = HeaderMap::new();
    let content_type = record.headers.get("content-type").cloned().unwrap_or_default();
    headers.insert("content-type", content_type.parse().expect("header value"));
    headers.insert("pact-message-metadata", encoded.parse().expect("base64 is a header value"));
    (headers, record.payload).into_response()
}

/// Serves the hooks on a free port; returns `http://127.0.0.1:<port>`.
async fn hooks(provider: Arc<Provider>) -> String {
    let router = axum::Router::new()
        .route("/provider-states", post(provider_state))
        .route("/", post(message))
        .with_state(provider);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

/// Where the verifier takes the pacts from.
enum Pacts<'a> {
    /// Files: the committed contracts, or a derived negative one (the test command).
    Files(&'a [PathBuf]),
    /// The Pact Broker at `PACT_BROKER_BASE_URL` (CI: `.github/workflows/contracts.yml`):
    /// the pacts of the consumers' main branches and deployed versions, with the results
    /// published for `PACT_PROVIDER_VERSION` on `PACT_PROVIDER_BRANCH`, which is what
    /// `can-i-deploy` later asks about.
    Broker { url: String, version: String, branch: String },
}

impl Pacts<'static> {
    /// The broker, when `PACT_VERIFY_FROM_BROKER=true` asks for it.
    fn from_broker() -> Option<Self> {
        if std::env::var("PACT_VERIFY_FROM_BROKER").ok().as_deref() != Some("true") {
            return None;
        }
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| panic!("PACT_VERIFY_FROM_BROKER needs {name}"))
        };
        Some(Self::Broker {
            url: var("PACT_BROKER_BASE_URL"),
            version: var("PACT_PROVIDER_VERSION"),
            branch: var("PACT_PROVIDER_BRANCH"),
        })
    }
}

/// Runs the verifier, HTTP interactions against the service and message interactions
/// against the hooks, in one run; returns whether it passed and what it printed.
async fn verify(pacts: &Pacts<'_>, provider: &Provider, hooks: &str) -> (bool, String) {
    let port = |url: &str| url.rsplit(':').next().expect("port").to_owned();
    let mut command = tokio::process::Command::new(pact_cli());
    command
        .args(["verifier", "--no-colour", "--provider-name", "orders-service", "--hostname", "127.0.0.1"])
        .args(["--transports", &format!("http:{}", port(&provider.app.http))])
        .args(["--transports", &format!("message:{}", port(hooks))])
        .args(["--state-change-url", &format!("{hooks}/provider-states")])
        // A message round trip (create, relay, broker, read back) outlasts the 5 s default.
        .args(["--request-timeout", "30000"])
        .env("PACT_DO_NOT_TRACK", "true");
    match pacts {
        Pacts::Files(files) => {
            // The verifier would also fetch from a broker named in the environment.
            command.env_remove("PACT_BROKER_BASE_URL");
            for file in *files {
                command.arg("--file").arg(file);
            }
        }
        Pacts::Broker { url, version, branch } => {
            command
                .args(["--broker-url", url, "--provider-version", version, "--provider-branch", branch])
                .args(["--publish", "--enable-pending"])
                .args(["--consumer-version-selectors", r#"{"mainBranch": true}"#])
                .args(["--consumer-version-selectors", r#"{"deployedOrReleased": true}"#])
                .args(["--consumer-version-selectors", r#"{"matchingBranch": true}"#]);
        }
    }
    let output = command.output().await.unwrap_or_else(|e| {
        panic!("cannot run {} (set PACT_CLI; scripts/tools.sh installs it): {e}", pact_cli().display())
    });
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

/// The committed contracts with this service as provider.
fn committed_pacts() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("pacts");
    let mut pacts: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("pacts/")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            let pact: Value = serde_json::from_slice(&std::fs::read(p).expect("read")).expect("pact json");
            pact["provider"]["name"] == "orders-service"
        })
        .collect();
    pacts.sort();
    pacts
}

/// The committed contracts (or, in CI with `PACT_VERIFY_FROM_BROKER=true`, the broker's,
/// with the results published) hold against the service.
#[tokio::test]
async fn every_consumer_contract_holds_against_the_running_service() {
    let files = committed_pacts();
    let pacts = Pacts::from_broker().unwrap_or_else(|| {
        let names: Vec<_> = files.iter().map(|p| p.file_name().expect("name").to_string_lossy()).collect();
        assert_eq!(names, ["billing-service-orders-service.json", "web-app-orders-service.json"]);
        Pacts::Files(&files)
    });
    let provider = provider().await;
    let hooks = hooks(provider.clone()).await;
    let (passed, output) = verify(&pacts, &provider, &hooks).await;
    assert!(passed, "verification failed:\n{output}");
    if matches!(pacts, Pacts::Files(_)) {
        for consumer in ["billing-service", "web-app"] {
            let header = format!("Verifying a pact between {consumer} and orders-service");
            assert!(output.contains(&header), "{consumer}'s pact was not verified:\n{output}");
        }
    } else {
        println!("{output}"); // the CI log shows what the broker handed out
    }
}

/// The gate bites: a consumer that needs a field the service does not provide (as if it
/// had been removed) fails verification, naming the field, for HTTP and for messages.
#[tokio::test]
async fn verification_fails_when_a_field_the_consumer_needs_is_missing() {
    let provider = provider().await;
    let hooks = hooks(provider.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            "web-app-orders-service.json",
            "a request for an order",
            "/response/body/content",
            "shipping_address",
        ),
        (
            "billing-service-orders-service.json",
            "an OrderCreated event",
            "/contents/content",
            "loyaltyPoints",
        ),
    ];
    for (file, description, body, field) in cases {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("pacts").join(file);
        let mut pact: Value = serde_json::from_slice(&std::fs::read(path).expect("pact")).expect("json");
        let interactions = pact["interactions"].as_array_mut().expect("interactions");
        interactions.retain(|i| i["description"] == description);
        assert_eq!(interactions.len(), 1, "{file} has {description:?}");
        interactions[0]
            .pointer_mut(body)
            .expect("body")
            .as_object_mut()
            .expect("object")
            .insert(field.into(), json!("x"));
        let negative = dir.path().join(file);
        std::fs::write(&negative, pact.to_string()).expect("write");
        let (passed, output) = verify(&Pacts::Files(&[negative]), &provider, &hooks).await;
        assert!(!passed, "{file} without {field} passed verification:\n{output}");
        assert!(output.contains(field), "the failure does not name {field}:\n{output}");
    }
}
